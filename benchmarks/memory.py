"""Peak memory of a system of processes, as the benchmarks report it."""

from __future__ import annotations

import contextlib
import threading
import time

import psutil


class PeakMemory:
    """Samples the summed RSS of this process (unless `include_self=False`) and its descendants
    (pods, nats-server; or Flower's superlink, supernodes and the processes they start), and each
    process's own peak (`by_process`: pid -> command line, peak), to tell where the memory goes."""

    def __init__(self, *, include_self: bool = True) -> None:
        self.peak = 0
        self.by_process: dict[int, tuple[str, int]] = {}
        self.include_self = include_self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)] if self.include_self else me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss = process.memory_info().rss
                    total += rss
                    if rss > self.by_process.get(process.pid, ("", 0))[1]:
                        self.by_process[process.pid] = (" ".join(process.cmdline()), rss)
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling (before the `with` block ends, where only part of it is measured)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
