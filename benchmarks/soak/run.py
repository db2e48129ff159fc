"""Soak: many small rounds and many SQL queries against the same pods, watching for leaks.

    python -m benchmarks.soak.run       # rewrites benchmarks/soak/results.md (--rounds, --queries)

3 pods as processes on the embedded NATS broker (authentication on). First 1,000 FedAvg rounds
of a 1,000-parameter model (the rounds benchmark's w + 1 plan, benchmarks/rounds/add_one_plan.py),
then 1,000 exact aggregate SQL queries (five WHERE selections in turn, so the differencing
ledger sees repeats as well as new cohorts). Every 50 operations the resident memory and open
file descriptors of every process — modeller (this process), broker, each pod — are sampled.
Reported per process and phase: memory after the first tenth (the warm-up) and at the end, the
slope of a least-squares line through the samples after the warm-up (MiB per 1,000 operations),
and descriptors at the first and last sample; then the seconds per operation early and late,
and whether every pod's audit log verifies after the pods stop.
Targets: every slope under 2 MiB per 1,000 operations, no descriptor growth, the audit logs
verify.
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
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

HERE = Path(__file__).parent
PODS = ["alice", "bob", "charlie"]
EVERY = 50
QUERIES = [f"SELECT grp, AVG(value) AS mean_value, COUNT(*) AS n FROM measurements WHERE value < {limit} GROUP BY grp"
           for limit in (200, 400, 600, 800, 1000)]
SLOPE_TARGET_MIB = 2.0


@dataclass
class Series:
    """One process's samples in one phase: operations done, resident MiB, open descriptors."""

    done: list[int] = field(default_factory=list)
    mib: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def slope(self) -> float:
        """MiB per 1,000 operations after the first tenth, by least squares."""
        start = max(1, len(self.done) // 10)
        x, y = np.array(self.done[start:], dtype=float), np.array(self.mib[start:])
        return float(np.polyfit(x, y, 1)[0] * 1000) if len(x) >= 2 else 0.0


def sample(processes: dict[str, psutil.Process], phase: dict[str, Series], done: int) -> None:
    for name, process in processes.items():
        series = phase.setdefault(name, Series())
        series.done.append(done)
        series.mib.append(process.memory_info().rss / 2**20)
        series.fds.append(process.num_fds())


def soak(batch: Callable[[int], None], count: int, processes: dict[str, psutil.Process]) -> tuple[dict[str, Series],
                                                                                              list[float]]:
    """Run `count` operations in batches of EVERY (`batch(n)` runs n), sampling after each;
    returns the samples and each batch's seconds per operation."""
    phase: dict[str, Series] = {}
    seconds = []
    sample(processes, phase, 0)
    for done in range(EVERY, count + 1, EVERY):
        started = time.perf_counter()
        batch(EVERY)
        seconds.append((time.perf_counter() - started) / EVERY)
        sample(processes, phase, done)
    return phase, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
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
            rounds, round_seconds = soak(experiment.run, args.rounds, watched)
            identifiers = [f"{name}/measurements" for name in PODS]

            def queries(count: int) -> None:
                for turn in range(count):
                    modeller.sql(QUERIES[turn % len(QUERIES)], datasets=identifiers, aggregate=True)

            sql, query_seconds = soak(queries, args.queries, watched)
    audits = {name: AuditLog.verify(work / name / "storage" / "audit.jsonl").ok for name in PODS}
    report(args, {"rounds": (rounds, round_seconds), "SQL queries": (sql, query_seconds)}, audits)


def report(args: argparse.Namespace, phases: dict[str, tuple[dict[str, Series], list[float]]],
           audits: dict[str, bool]) -> None:
    lines = ["# Soak: memory, descriptors and audit logs over many operations", "",
             f"`python -m benchmarks.soak.run` — 3 pods as processes, {args.rounds:,} FedAvg rounds of a "
             f"1,000-parameter model, then {args.queries:,} exact aggregate SQL queries; every {EVERY} operations "
             f"each process's resident memory and open descriptors sampled. Machine: {machine()}.", "",
             "| phase | process | MiB after warm-up | MiB at end | slope (MiB per 1,000 ops) | "
             "descriptors first → last |",
             "|---|---|---:|---:|---:|---|"]
    verdicts = list(audits.values())
    for phase, (series_by_process, _) in phases.items():
        for name, series in series_by_process.items():
            warm = series.mib[max(1, len(series.mib) // 10)]
            slope = series.slope()
            verdicts += [slope < SLOPE_TARGET_MIB, series.fds[-1] <= series.fds[0]]
            lines.append(f"| {phase} | {name} | {warm:.0f} | {series.mib[-1]:.0f} | {slope:+.2f} | "
                         f"{series.fds[0]} → {series.fds[-1]} |")
    lines += ["", f"| phase | s/op, first {EVERY} | s/op, median over the batches of {EVERY} | s/op, last {EVERY} |",
              "|---|---:|---:|---:|"]
    for phase, (_, seconds) in phases.items():
        lines.append(f"| {phase} | {seconds[0]:.4f} | {statistics.median(seconds):.4f} | {seconds[-1]:.4f} |")
    verified = ", ".join(f"{name} {'verifies' if ok else 'FAILS'}" for name, ok in audits.items())
    lines += ["", f"Audit logs after the pods stopped: {verified}.",
              "", f"Targets (every slope under {SLOPE_TARGET_MIB:g} MiB per 1,000 operations, no descriptor growth, "
              f"audit logs verify): **{'all met' if all(verdicts) else 'NOT all met'}**.", ""]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    main()
