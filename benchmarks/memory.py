"""Peak memory and CPU time of a system of processes, as the benchmarks report them."""

from __future__ import annotations

import contextlib
import threading
import time

import psutil

SAMPLE_S = 0.05
READS_PER_S = 200  # the sampler's own cost: a /proc read of ~50-100 us each, in the measured process


class PeakMemory:
    """Samples the summed RSS of this process (unless `include_self=False`) and its descendants
    (pods, nats-server; or Flower's superlink, supernodes and the processes they start), and each
    process's own peak (`by_process`: pid -> command line, peak), to tell where the memory goes.
    `refresh_s`: how often the process tree is walked again (every sample unless set): a system
    whose processes all start before the measured work (fedpod's) can be walked once a second."""

    def __init__(self, *, include_self: bool = True, refresh_s: float = SAMPLE_S) -> None:
        self.peak = 0
        self.by_process: dict[int, tuple[str, int]] = {}
        self.include_self = include_self
        self.refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        """Every SAMPLE_S, each known process's RSS (one small /proc read each), the process tree
        walked again every `refresh_s`. A walk reads every process's /proc entry: done every
        sample inside a fedpod modeller's process, it took a quarter of a core there, holding the
        GIL the modeller's event loop needs. Reading 100 pods every 50 ms still took a fifth of a
        core (py-spy, 100 pods): with many processes the interval grows to keep READS_PER_S, so a
        system of n processes is sampled every max(SAMPLE_S, n / READS_PER_S) seconds (0.5 s at 100
        pods, whose small-model memory is steady; a few processes are still sampled every 50 ms)."""
        me = psutil.Process()
        processes: list[psutil.Process] = []
        refreshed = float("-inf")
        while not self._stop.is_set():
            if time.monotonic() - refreshed >= self.refresh_s:
                with contextlib.suppress(psutil.Error):
                    processes = [me, *me.children(recursive=True)] if self.include_self else me.children(recursive=True)
                refreshed = time.monotonic()
            total = 0
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    rss = process.memory_info().rss
                    total += rss
                    if rss > self.by_process.get(process.pid, ("", 0))[1]:
                        self.by_process[process.pid] = (" ".join(process.cmdline()), rss)
            self.peak = max(self.peak, total)
            time.sleep(max(SAMPLE_S, len(processes) / READS_PER_S))

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


def cpu_seconds(processes: list[psutil.Process]) -> list[float]:
    """Each process's user plus system CPU time so far, all its threads (DuckDB's workers too)."""
    return [sum(p.cpu_times()[:2]) for p in processes]
