"""Why a pod's task costs more CPU when many pods share the machine: the same 3-pod rounds, alone
and beside two processes that compete for the cores, with and without sweeping memory.

    python -m benchmarks.rounds.contention     # rewrites benchmarks/rounds/contention.md

At 100 pods on 2 cores a pod spends about twice the CPU per task it spends at 3 (the many-pods
table of results.md), for the same messages and about as many context switches per task. This
runs the small-model rounds of `benchmarks.rounds.run` with 3 pods three times: alone; beside two
processes that each add to a 1 MiB array in a loop (they take CPU time, and little cache); and
beside two that sweep a 64 MiB array each (CPU time, and the caches). If the pods' CPU per task
rises with the sweeping more than with the CPU use alone, a task's cost on a crowded machine is
mostly in refilling the caches the other processes evicted.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchmarks.report import machine, publish
from benchmarks.rounds.run import RoundTimes, measure_fedpod

HERE = Path(__file__).parent
ROUNDS = 400
REPEATS = 3  # each case's figures: the median of its runs
COMPETITORS = 2
SWEEP = "import numpy; a = numpy.ones({mib} * 131072)\nwhile True: a += 1.0"
CASES = [("alone", 0), ("beside 2 processes using CPU (1 MiB each)", 1),
         ("beside 2 processes sweeping 64 MiB each", 64)]


@contextlib.contextmanager
def competitors(mib: int) -> Iterator[None]:
    """Two processes busy adding to a `mib` MiB array each (none for 0) while the block runs."""
    processes = [subprocess.Popen([sys.executable, "-c", SWEEP.format(mib=mib)]) for _ in range(COMPETITORS)] \
        if mib else []
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="fedpod-bench-contention-"))
    lines = ["# A pod's CPU per task on a crowded machine", "",
             f"`python -m benchmarks.rounds.contention` — 3 pods, {ROUNDS} FedAvg rounds of the 1,000-parameter model "
             "(`benchmarks.rounds.run`); CPU time (user and system, all threads) per pod and round after the first, "
             f"averaged over the pods, and seconds per round; {REPEATS} runs of each case, alternating, medians. "
             f"Machine: {machine()}.", "",
             "| pods' company | pod CPU per task (ms) | modeller CPU per round (ms) | s/round |",
             "|---|---:|---:|---:|"]
    runs: dict[str, list[RoundTimes]] = {label: [] for label, _ in CASES}
    for repeat in range(REPEATS):  # the cases alternate, so that the machine's drift touches each alike
        for index, (label, mib) in enumerate(CASES):
            with competitors(mib):
                runs[label].append(measure_fedpod(3, 1_000, ROUNDS, work / f"case{index}-{repeat}")[0])
            print(label, runs[label][-1].pod_cpu_ms, flush=True)
    for label, times in runs.items():
        lines.append(f"| {label} | {statistics.median(t.pod_cpu_ms for t in times):.2f} | "
                     f"{statistics.median(t.modeller_cpu_ms for t in times):.2f} | "
                     f"{statistics.median(statistics.median(t.seconds) for t in times):.4f} |")
    lines += ["", "At 100 pods (results.md) each pod's task has 99 other pods' processes for company, each with a "
              "Python heap of its own: the rows above show how much of its higher cost that company alone explains.",
              ""]
    publish(HERE / "contention.md", lines)


if __name__ == "__main__":
    main()
