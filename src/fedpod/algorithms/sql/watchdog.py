"""Deadlines for queries: DuckDB has no statement timeout, so a query that outlives its
deadline is stopped with `interrupt()` from another thread (FIELD-NOTES).

One thread serves every query of an engine. A `threading.Timer` per query started an OS thread
each time, about 0.2 ms: more than planning a small aggregate, and paid by every task.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(order=True)
class _Due:
    at: float  # time.monotonic()
    sequence: int
    interrupt: Callable[[], object] | None = field(compare=False)  # None once the query is over


class Watchdog:
    def __init__(self) -> None:
        self._due: list[_Due] = []
        self._over = 0  # entries in the heap whose query ended: dropped in bulk, not searched for
        self._sequence = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @contextlib.contextmanager
    def deadline(self, seconds: float, interrupt: Callable[[], object]) -> Iterator[None]:
        """`interrupt` is called if the block is still running after `seconds`, never after it
        has ended."""
        entry = _Due(time.monotonic() + seconds, next(self._sequence), interrupt)
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="sql-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._due, entry)
            if self._due[0] is entry:
                self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                if entry.interrupt is not None:  # still in the heap
                    entry.interrupt = None
                    self._over += 1
                if self._over > 64 and self._over * 2 > len(self._due):
                    self._due = [e for e in self._due if e.interrupt is not None]
                    heapq.heapify(self._due)
                    self._over = 0

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()

    def _serve(self) -> None:
        with self._changed:
            while not self._stopped:
                while self._due and self._due[0].interrupt is None:
                    heapq.heappop(self._due)
                    self._over -= 1
                if not self._due:
                    self._changed.wait()
                    continue
                wait = self._due[0].at - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                entry = heapq.heappop(self._due)
                interrupt, entry.interrupt = entry.interrupt, None
                if interrupt is not None:
                    interrupt()  # under the lock: the query's block cannot end, and its cursor close, meanwhile
