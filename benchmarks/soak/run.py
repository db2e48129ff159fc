"""Soak: many small rounds and many SQL queries against the same pods, watching for leaks.

    python -m benchmarks.soak.run       # rewrites benchmarks/soak/results.md (--rounds, --queries)

3 pods as processes on the embedded NATS broker (authentication on). First 1,000 FedAvg rounds
of a 1,000-parameter model (the rounds benchmark's w + 1 plan, benchmarks/rounds/add_one_plan.py),
then 1,000 exact aggregate SQL queries (five WHERE selections in turn, so the differencing
ledger sees repeats as well as new cohorts); each phase goes on past its count until it has
lasted `--min-seconds` (420): every party remembers the envelopes it accepted for the replay
window (330 s), so memory legitimately grows until that window is full. Every 50 operations the
resident memory and open file descriptors of every process — modeller (this process), broker,
each pod — are sampled. Reported per process and phase: memory after the first tenth (the
warm-up) and at the end, the slope of a least-squares line through the samples after the
warm-up and through those after the replay window filled (MiB per 1,000 operations), and
descriptors at the first and last sample; then the seconds per operation early and late, and
whether every pod's audit log verifies after the pods stop.
Targets: every slope once the replay window is full under 2 MiB per 1,000 operations, no
descriptor growth after the first batch, the audit logs verify.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console

from benchmarks.report import machine, publish
from benchmarks.rounds.run import PLAN
from fedpod.data.datasets import DatasetSpec
from fedpod.governance.audit import AuditLog
from fedpod.governance.plans import PlanRegistry
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.pod.local import pod_processes, wait_for_pods, write_pod
from fedpod.security.envelope import DEFAULT_MAX_AGE_S, DEFAULT_MAX_SKEW_S
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

HERE = Path(__file__).parent
PODS = ["alice", "bob", "charlie"]
EVERY = 50
QUERIES = [f"SELECT grp, AVG(value) AS mean_value, COUNT(*) AS n FROM measurements WHERE value < {limit} GROUP BY grp"
           for limit in (200, 400, 600, 800, 1000)]
SLOPE_TARGET_MIB = 2.0
REPLAY_WINDOW_S = DEFAULT_MAX_AGE_S + DEFAULT_MAX_SKEW_S


@dataclass
class Series:
    """One process's samples in one phase: operations done, seconds since the phase began,
    resident MiB, open descriptors."""

    done: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    mib: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def slope(self, after_s: float | None = None) -> float | None:
        """MiB per 1,000 operations by least squares: after the first tenth of the samples, or
        after `after_s` seconds (None if fewer than three samples are left)."""
        start = max(1, len(self.done) // 10) if after_s is None else \
            next((i for i, t in enumerate(self.seconds) if t >= after_s), len(self.done))
        x, y = np.array(self.done[start:], dtype=float), np.array(self.mib[start:])
        return float(np.polyfit(x, y, 1)[0] * 1000) if len(x) >= 3 else None


def sample(processes: dict[str, psutil.Process], phase: dict[str, Series], done: int, seconds: float) -> None:
    for name, process in processes.items():
        series = phase.setdefault(name, Series())
        series.done.append(done)
        series.seconds.append(seconds)
        series.mib.append(process.memory_info().rss / 2**20)
        series.fds.append(process.num_fds())


def soak(batch: Callable[[int], None], count: int, min_seconds: float,
         processes: dict[str, psutil.Process]) -> tuple[dict[str, Series], list[float]]:
    """Run at least `count` operations, and for at least `min_seconds`, in batches of EVERY
    (`batch(n)` runs n), sampling after each; returns the samples and each batch's seconds per
    operation."""
    phase: dict[str, Series] = {}
    seconds = []
    began = time.monotonic()
    sample(processes, phase, 0, 0.0)
    done = 0
    while done < count or time.monotonic() - began < min_seconds:
        started = time.perf_counter()
        batch(EVERY)
        seconds.append((time.perf_counter() - started) / EVERY)
        done += EVERY
        sample(processes, phase, done, time.monotonic() - began)
    return phase, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--min-seconds", type=float, default=420.0, help="each phase lasts at least this long")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpod-bench-soak-"))
    identity = Identity.generate("modeller")
    identity.save(work / "keys")
    rng = np.random.default_rng(3)
    with EmbeddedBroker() as broker:
        configs = []
        for name in PODS:
            folder = work / name
            folder.mkdir()
            (folder / "data.csv").write_text("x,y\n0.0,0\n")
            rows = "\n".join(f"{g},{v:.3f}" for g, v in zip(rng.integers(0, 8, 5000), rng.uniform(0, 1000, 5000),
                                                            strict=True))
            (folder / "measurements.csv").write_text("grp,value\n" + rows + "\n")
            configs.append(write_pod(folder, name, broker, [
                DatasetSpec(name="data", kind="csv", path=str(folder / "data.csv"), tags=["bench"]),
                DatasetSpec(name="measurements", kind="csv", path=str(folder / "measurements.csv"))], [identity]))
            registry = PlanRegistry(folder / "storage" / "plans")
            registry.decide(registry.submit(PLAN.read_text(), "AddOne", "benchmark")[0], "approved")
        with pod_processes(configs, work / "logs") as pods, \
                Modeller(identity, broker=broker.url, keystore=work / "keys", timeout_s=120) as modeller:
            wait_for_pods(modeller, set(PODS), pods)
            watched = {"modeller": psutil.Process(), "broker": psutil.Process(broker.pid),
                       **{name: psutil.Process(p.pid) for name, p in zip(PODS, pods, strict=True)}}
            experiment = Experiment(tags=["bench"], training_plan_class="AddOne", training_plan_path=PLAN,
                                    model_args={"parameters": 1000}, training_args={"num_updates": 1},
                                    round_limit=args.rounds, modeller=modeller,
                                    experiments_root=work / "experiments", console=Console(quiet=True))
            experiment_rounds = experiment.run

            def rounds_batch(count: int) -> None:
                experiment_rounds(count, increase=True)

            rounds, round_seconds = soak(rounds_batch, args.rounds, args.min_seconds, watched)
            identifiers = [f"{name}/measurements" for name in PODS]

            def queries(count: int) -> None:
                for turn in range(count):
                    modeller.sql(QUERIES[turn % len(QUERIES)], datasets=identifiers, aggregate=True)

            sql, query_seconds = soak(queries, args.queries, args.min_seconds, watched)
    audits = {name: AuditLog.verify(work / name / "storage" / "audit.jsonl").ok for name in PODS}
    report(args, {"rounds": (rounds, round_seconds), "SQL queries": (sql, query_seconds)}, audits)


def report(args: argparse.Namespace, phases: dict[str, tuple[dict[str, Series], list[float]]],
           audits: dict[str, bool]) -> None:
    done = {phase: series["modeller"].done[-1] for phase, (series, _) in phases.items()}
    lines = ["# Soak: memory, descriptors and audit logs over many operations", "",
             f"`python -m benchmarks.soak.run` — 3 pods as processes, {done['rounds']:,} FedAvg rounds of a "
             f"1,000-parameter model, then {done['SQL queries']:,} exact aggregate SQL queries, each phase at least "
             f"{args.min_seconds:.0f} s (the replay window, during which every party remembers the envelopes it "
             f"accepted, is {REPLAY_WINDOW_S:.0f} s); every {EVERY} operations each process's resident memory and "
             f"open descriptors sampled. Machine: {machine()}.", "",
             "| phase | process | MiB after warm-up | MiB at end | slope after warm-up | slope once the replay "
             "window is full | descriptors after the first batch → last |",
             "|---|---|---:|---:|---:|---:|---|"]
    verdicts = list(audits.values())
    for phase, (series_by_process, _) in phases.items():
        for name, series in series_by_process.items():
            warm = series.mib[max(1, len(series.mib) // 10)]
            steady = series.slope(REPLAY_WINDOW_S)
            verdicts += [steady is not None and steady < SLOPE_TARGET_MIB, series.fds[-1] <= series.fds[1]]
            lines.append(f"| {phase} | {name} | {warm:.0f} | {series.mib[-1]:.0f} | {series.slope():+.2f} | "
                         f"{'n/a' if steady is None else f'{steady:+.2f}'} | {series.fds[1]} → {series.fds[-1]} |")
    lines += ["", "Slopes in MiB per 1,000 operations.", "",
              f"| phase | s/op, first {EVERY} | s/op, median over the batches of {EVERY} | s/op, last {EVERY} |",
              "|---|---:|---:|---:|"]
    for phase, (_, seconds) in phases.items():
        lines.append(f"| {phase} | {seconds[0]:.4f} | {statistics.median(seconds):.4f} | {seconds[-1]:.4f} |")
    verified = ", ".join(f"{name} {'verifies' if ok else 'FAILS'}" for name, ok in audits.items())
    lines += ["", f"Audit logs after the pods stopped: {verified}.",
              "", f"Targets (every slope once the replay window is full under {SLOPE_TARGET_MIB:g} MiB per 1,000 "
              "operations, no descriptor growth after the first batch, audit logs verify): "
              f"**{'all met' if all(verdicts) else 'NOT all met'}**.", ""]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    main()
