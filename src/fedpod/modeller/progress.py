"""What each pod is doing during a training round, live: sending, waiting, preparing (the first
round pays PyTorch's import), training, uploading, done or failed, with the seconds in each.
Shown as a table that redraws in place on a terminal (nothing extra in logs or notebooks'
captured output); every transition is kept, for `Experiment.round_progress()`."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

# The pod's words (heartbeat phases, `exchange`'s own) in the round's terms.
SHOWN = {"sending": "sending model", "sent": "waiting", "queued": "waiting", "running": "training",
         "replying": "uploading"}


class RoundProgress:
    def __init__(self, round_number: int, pods: list[str], console: Console) -> None:
        self.round_number = round_number
        self.console = console
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.transitions: dict[str, list[tuple[str, float]]] = {pod: [("waiting", 0.0)] for pod in pods}

    def update(self, pod: str, phase: str) -> None:
        """Called from the modeller's event loop as phases arrive; repeated phases are one."""
        shown = SHOWN.get(phase, phase)
        with self._lock:
            steps = self.transitions.setdefault(pod, [])
            if steps and steps[-1][0] in ("done", "failed"):
                return
            if not steps or steps[-1][0] != shown:
                steps.append((shown, round(time.monotonic() - self.started, 3)))

    def __rich__(self) -> Table:
        now = time.monotonic() - self.started
        table = Table(title=f"round {self.round_number} — {now:.1f}s", title_justify="left")
        for column in ("pod", "doing", "for (s)"):
            table.add_column(column, justify="right" if column == "for (s)" else "left")
        with self._lock:
            for pod, steps in sorted(self.transitions.items()):
                phase, since = steps[-1]
                table.add_row(escape(pod), phase, f"{now - since:.1f}")
        return table

    @contextlib.contextmanager
    def shown(self) -> Iterator[RoundProgress]:
        if not self.console.is_terminal:
            yield self
            return
        with Live(self, console=self.console, refresh_per_second=4, transient=True):
            yield self
