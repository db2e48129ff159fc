"""Seconds per round and peak memory of a federation on one machine, fedpod vs Flower.

    python -m benchmarks.rounds.run         # rewrites benchmarks/rounds/results.md
                                            # (installs Flower into benchmarks/flower/.venv first)

FedAvg where "training" is w + 1, for 3, 10, 30 and 100 pods/nodes and a 1,000-parameter model,
and 3 and 10 with a 10M-parameter (40 MB) one, measured in the same run (Flower up to 30 nodes):
- fedpod: pods as processes on the embedded NATS broker, plan benchmarks/rounds/add_one_plan.py
  approved on the pods beforehand;
- Flower 1.42's deployment engine: flower-superlink, one flower-supernode per pod and
  `flwr run` over loopback (benchmarks/flower/), FedAvg without federated evaluation, a
  ClientApp that returns w + 1 (benchmarks/flower/app/).
fedpod runs as it is deployed — broker authentication (nkeys, per-party subject permissions)
and signed transfer tickets — and, in the same run, on an open broker, so the table states what
authentication costs per round.
Seconds per round: median over the rounds, the first excluded (it pays one-time imports).
Peak memory: summed resident memory of every process of the system, sampled every 50 ms, from
start-up to the last round — for fedpod the modeller (a fresh process running an Experiment),
pods and broker (not the SQL queries timed after the rounds, which load pyarrow into every pod:
Flower runs none); for Flower its superlink, supernodes, the processes they start, and `flwr run`.
The run also states the transport throughput against raw nats-py on the same machine (benchmarks/transport/), the bytes
the modeller sends per round (a round's model is cast: sent once for all its pods), and, for the
small model, each idle pod's memory, a federated SQL aggregate as pods are added, the CPU a pod
spends per task, and the floor that bare nats-py processes passing the round's messages set
(benchmarks/rounds/bare.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
from rich.console import Console

from benchmarks.flower.deployment import FlowerFederation
from benchmarks.memory import PeakMemory, cpu_seconds
from benchmarks.report import machine, publish
from benchmarks.rounds import bare
from fedpod.data.datasets import DatasetSpec
from fedpod.governance.plans import PlanRegistry
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.modeller.results import load_params
from fedpod.pod.local import pod_processes, wait_for_pods, write_pod
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

HERE = Path(__file__).parent
T = TypeVar("T")
PLAN = HERE / "add_one_plan.py"
OPEN_BROKER = "FEDPOD_BENCH_OPEN_BROKER"  # set for the open-broker comparison run
DROP_OUT = "x,y,drop_out\n0.0,0,1\n"  # a pod holding this fails its training step (add_one_plan.py)
ROWS = "x,y\n" + "0.0,0\n" * 20  # enough rows for a SQL aggregate to pass min_group_size
SQL = "SELECT COUNT(*) AS n, AVG(x) AS mean_x FROM data"
SQL_QUERIES = 10


@dataclass(frozen=True)
class RoundTimes:
    seconds: list[float]  # each round after the first
    wire_bytes: float  # per round, through the broker (received plus sent), all rounds averaged
    first_s: float = 0.0  # the first round, which pays the pods' first-task imports and data loading
    idle_mib: list[float] = field(default_factory=list)  # each pod's resident memory once discovered, before any task
    sql_s: list[float] = field(default_factory=list)  # each federated SQL aggregate after the first
    modeller_sent: float = 0.0  # bytes the modeller sent per round, all rounds averaged
    peak_bytes: int = 0  # summed resident memory of the modeller, pods and broker, from start-up to the last round
    pod_cpu_ms: float = 0.0  # CPU time (user + system, all threads) per pod and round, rounds after the first
    modeller_cpu_ms: float = 0.0  # the modeller's process (and its memory sampler), per round after the first


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def time_rounds(pods: int, parameters: int, rounds: int, work: Path, secagg: bool = False,
                dropouts: int = 0) -> RoundTimes:
    """fedpod's side, run as its own process (the modeller) by `measure_fedpod`. `secagg`: under
    secure aggregation; `dropouts`: that many pods fail every round after the key exchange (their
    data says so to the plan), and the round completes without them (benchmarks/secagg)."""
    identity = Identity.generate("modeller")
    identity.save(work / "keys")
    names = [f"pod{i + 1:03d}" for i in range(pods)]
    source = PLAN.read_text()
    with PeakMemory(include_self=True, refresh_s=1.0) as memory, \
            EmbeddedBroker(open=bool(os.environ.get(OPEN_BROKER)), monitor=True) as broker:
        configs = []
        for index, name in enumerate(names):
            folder = work / name
            folder.mkdir(parents=True)
            (folder / "data.csv").write_text(DROP_OUT if index < dropouts else ROWS)
            configs.append(write_pod(folder, name, broker, [DatasetSpec(
                name="data", kind="csv", path=str(folder / "data.csv"), tags=["bench"])], [identity]))
            registry = PlanRegistry(folder / "storage" / "plans")
            sha, _ = registry.submit(source, "AddOne", "benchmark")
            registry.decide(sha, "approved")
        with pod_processes(configs, work / "logs") as processes, \
                Modeller(identity, broker=broker.url, keystore=work / "keys", timeout_s=600) as modeller:
            wait_for_pods(modeller, set(names), processes, deadline_s=max(180, 3 * pods))
            time.sleep(2.0)  # let start-up settle: the pods are idle now, discovered but given no task yet
            idle = [resident_mib(process.pid) for process in processes]
            experiment = Experiment(tags=["bench"], training_plan_class="AddOne", training_plan_path=PLAN,
                                    model_args={"parameters": parameters}, training_args={"num_updates": 1},
                                    round_limit=rounds, modeller=modeller, experiments_root=work / "experiments",
                                    console=Console(quiet=True), secagg=secagg, min_pods=pods - dropouts)
            before, (sent_before, _) = broker.traffic(), modeller.traffic()
            experiment.run_once()  # the first round pays the pods' imports: its CPU is not counted below
            measured = [psutil.Process(process.pid) for process in processes]
            pods_cpu, (own_cpu,) = sum(cpu_seconds(measured)), cpu_seconds([psutil.Process()])
            experiment.run()
            counted = max(rounds - 1, 1)
            pod_cpu_ms = (sum(cpu_seconds(measured)) - pods_cpu) / counted / pods * 1000
            modeller_cpu_ms = (cpu_seconds([psutil.Process()])[0] - own_cpu) / counted * 1000
            memory.stop()  # the peak until the last round: the SQL queries below are not Flower's workload
            wire_bytes = (broker.traffic() - before) / rounds
            modeller_sent = (modeller.traffic()[0] - sent_before) / rounds
            final = load_params(experiment.experimentation_path() / "model.safetensors")["w"]
            assert np.all(final == rounds), "FedAvg of w + 1 must add exactly one per round"
            by_round = experiment.round_seconds()
            sql = []
            if not dropouts:
                for _ in range(SQL_QUERIES + 1):
                    started = time.perf_counter()
                    answer = modeller.sql(SQL, datasets=[f"{name}/data" for name in names], aggregate=True)
                    sql.append(time.perf_counter() - started)
                    assert int(answer["n"][0]) == 20 * pods, answer  # type: ignore[call-overload]
            return RoundTimes([s for r, s in sorted(by_round.items()) if r > 0], wire_bytes, by_round[0], idle,
                              sql[1:], modeller_sent, memory.peak, pod_cpu_ms, modeller_cpu_ms)


def measure_fedpod(pods: int, parameters: int, rounds: int, work: Path, *,
                   open_broker: bool = False) -> tuple[RoundTimes, float]:
    """The modeller runs as a fresh process, like Flower's ServerApp: this harness's own memory
    (and what earlier measurements left in it) counts for neither system."""
    work.mkdir(parents=True)
    environment = {**os.environ, OPEN_BROKER: "1"} if open_broker else dict(os.environ)
    done = subprocess.run([sys.executable, "-m", "benchmarks.rounds.run", "--one", str(pods), str(parameters),
                           str(rounds), str(work)], capture_output=True, text=True, timeout=3600, env=environment)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}, no output"])[-1]
        raise RuntimeError(f"fedpod run failed: {last[:300]}\n{done.stderr[-3000:]}")
    times = RoundTimes(**json.loads(done.stdout.strip().splitlines()[-1]))
    return times, times.peak_bytes / 2**30


def measure_flower(nodes: int, parameters: int, rounds: int, work: Path) -> tuple[float, float]:
    with PeakMemory(include_self=False) as memory, FlowerFederation(nodes, work) as flower:
        stamps = flower.run(work / "out", {"task": "add-one", "parameters": parameters, "rounds": rounds,
                                           "nodes": nodes})
    seconds = [after - before for before, after in itertools.pairwise(stamps)][1:]
    return statistics.median(seconds), memory.peak / 2**30


TRIES = 2  # Flower's engine now and then ends a 30-node run without a result; 100 pods on 2 cores may lose one


def tried(what: str, measure: Callable[[Path], T], work: Path) -> T | str:
    """`measure(work / "try0")`, once more if it fails; why the last try failed if both did — the
    table says so, rather than the whole benchmark (half an hour of measurements) ending there."""
    failure = ""
    for attempt in range(TRIES):
        try:
            return measure(work / f"try{attempt}")
        except RuntimeError as exc:
            print(f"{what}, try {attempt + 1}: {exc}", file=sys.stderr, flush=True)
            failure = str(exc).splitlines()[0][:300]
    return failure


CASES = [(3, 1_000), (3, 10_000_000), (10, 1_000), (10, 10_000_000), (30, 1_000), (100, 1_000)]
FLOWER_MAX_NODES = 30
IDLE_POD_MIB = 60.0  # targets for many pods (issue 11, item 5)
MANY_PODS_S = 0.2


def many_pods_table(runs: list[tuple[int, RoundTimes]], floors: dict[int, tuple[float, float] | str],
                    verdicts: list[bool]) -> list[str]:
    """Lean pods: each pod's memory when idle, and a SQL aggregate and a FedAvg round as pods are
    added — beside what a pod's task costs in CPU, and the floor bare messaging sets (`bare`)."""
    lines = ["## Many pods: idle memory, SQL and FedAvg as pods are added", "",
             "The small-model runs above. Idle pod: resident memory of each pod process once discovered, before "
             "its first task (median and largest). SQL: a federated `COUNT`/`AVG` aggregate over every pod, median "
             f"of {SQL_QUERIES} after the first. First round: the FedAvg round that pays each pod's first-task "
             "imports (numpy, DuckDB, the plan) and data loading. CPU per task: each pod's CPU time (user and "
             "system, all threads) per FedAvg round after the first, averaged over the pods; the modeller's per "
             "round (its process also samples every process's memory, at most 200 /proc reads a second). "
             "Bare nats-py: as many Python processes that only pass messages of the round's sizes, in the "
             "same run (`python -m benchmarks.rounds.bare`): one request and its answer per pod — fedpod's shape "
             "for a task done within 0.25 s, whose update rides on the task's acknowledgement — then two "
             "acknowledged deliveries — the task acknowledged, the update sent back as an acknowledged request, "
             "fedpod's shape for a longer task — with no sealing, audit log, policy or training: the floor under "
             "any round of these shapes on this machine.", "",
             "| pods | idle pod MiB (median / max) | SQL s/query | FedAvg s/round | first round s | "
             "per added pod (SQL / FedAvg, ms) | pod CPU per task (ms) | modeller CPU per round (ms) | "
             "bare nats-py s/round (one exchange / two acknowledged) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base_pods, base = runs[0]
    for pods, times in runs:
        sql, fedavg = statistics.median(times.sql_s), statistics.median(times.seconds)
        slope = "—" if pods == base_pods else (
            f"{(sql - statistics.median(base.sql_s)) / (pods - base_pods) * 1000:.2f} / "
            f"{(fedavg - statistics.median(base.seconds)) / (pods - base_pods) * 1000:.2f}")
        floor = floors.get(pods, "—")
        bare = f"{floor[0]:.3f} / {floor[1]:.3f}" if isinstance(floor, tuple) else f"failed: {floor}"
        lines.append(f"| {pods} | {statistics.median(times.idle_mib):.1f} / {max(times.idle_mib):.1f} | {sql:.3f} | "
                     f"{fedavg:.3f} | {times.first_s:.2f} | {slope} | {times.pod_cpu_ms:.2f} | "
                     f"{times.modeller_cpu_ms:.1f} | {bare} |")
        verdicts.append(max(times.idle_mib) <= IDLE_POD_MIB)
        if pods >= 100:
            verdicts += [sql < MANY_PODS_S, fedavg < MANY_PODS_S]
    return [*lines, "", f"Targets: every idle pod at most {IDLE_POD_MIB:.0f} MiB; at 100 pods a SQL aggregate and a "
            f"FedAvg round each under {MANY_PODS_S * 1000:.0f} ms.", ""]


def measure_floor(pods: int) -> tuple[float, float] | str:
    """`bare.measure`, or why it failed: the table says so rather than the benchmark ending there."""
    try:
        return bare.measure(pods)
    except (OSError, RuntimeError, AssertionError, TimeoutError) as exc:
        print(f"bare nats-py, {pods} pods: {exc}", file=sys.stderr, flush=True)
        return str(exc)[:200] or type(exc).__name__


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--flower-rounds", type=int, default=8, help="Flower takes seconds per round")
    parser.add_argument("--one", nargs=4, metavar=("PODS", "PARAMETERS", "ROUNDS", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        pods, parameters, rounds, work = args.one
        print(json.dumps(dataclasses.asdict(time_rounds(int(pods), int(parameters), int(rounds), Path(work)))))
        return
    from benchmarks.transport.run import throughput

    raw_rate, fedpod_rate, _ = throughput([40_000_000], {40_000_000: 5})[40_000_000]
    rows: list[tuple[int, int, tuple[RoundTimes, float], tuple[float, float] | str | None, RoundTimes]] = []
    failed: list[str] = []  # fedpod cases that failed twice: no row, a line saying why, a target not met
    for pods, parameters in CASES:
        work = Path(tempfile.mkdtemp(prefix=f"fedpod-bench-rounds-{pods}-{parameters}-"))
        case = f"{pods} x {parameters:,}"
        fedpod = tried(f"fedpod, {case}", functools.partial(measure_fedpod, pods, parameters, args.rounds),
                       work / "fedpod")
        open_run = tried(f"fedpod on an open broker, {case}", functools.partial(
            measure_fedpod, pods, parameters, args.rounds, open_broker=True), work / "open")
        if isinstance(fedpod, str) or isinstance(open_run, str):
            failed.append(f"{case}: {fedpod if isinstance(fedpod, str) else open_run}")
            continue
        flower = tried(f"Flower, {case}", functools.partial(measure_flower, pods, parameters, args.flower_rounds),
                       work / "flower") if pods <= FLOWER_MAX_NODES else None
        rows.append((pods, parameters, fedpod, flower, open_run[0]))
        print(rows[-1][:2], statistics.median(fedpod[0].seconds), flower, flush=True)
    lines = [
        "# Seconds per round and memory: fedpod vs Flower",
        "",
        f"`python -m benchmarks.rounds.run` — FedAvg of w + 1; fedpod {args.rounds} rounds, Flower 1.42 deployment "
        f"engine {args.flower_rounds} rounds, both in this run; median seconds per round (first round excluded), "
        f"peak summed resident memory of all the system's processes from start-up to the last round (fedpod's "
        f"SQL queries after its rounds, timed below, are not counted: Flower runs none). Machine: {machine()}.",
        "",
        "| pods | parameters | fedpod s/round | Flower s/round | time ratio | target | fedpod memory (GiB) | "
        "Flower memory (GiB) | memory ratio | fedpod on an open broker s/round | modeller sent per round |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts, flower_failures = [not failed], []
    for pods, parameters, (times, peak), flower, unauthenticated in rows:
        seconds = statistics.median(times.seconds)
        model = parameters * 4
        sent = f"{times.modeller_sent / 1e6:.1f} MB ({times.modeller_sent / model:.2f} x model)"
        if parameters < 1_000_000 and pods == 10:
            verdicts.append(seconds < 0.1)
        if parameters >= 1_000_000:
            verdicts.append(times.modeller_sent < 1.5 * model)  # the model goes out once, not once per pod
        if not isinstance(flower, tuple):
            if flower is not None:  # a comparison that could not be made is not a target met
                verdicts.append(False)
                flower_failures.append(f"{pods} x {parameters:,}: {flower}")
            lines.append(f"| {pods} | {parameters:,} | {seconds:.3f} | {'—' if flower is None else 'failed'} | — | — | "
                         f"{peak:.2f} | — | — | {statistics.median(unauthenticated.seconds):.3f} | {sent} |")
            continue
        flower_seconds, flower_peak = flower
        time_ratio, memory_ratio = seconds / flower_seconds, peak / flower_peak
        target = 1 / 20 if parameters < 1_000_000 else 1 / 10 if pods >= 10 else 1 / 4
        verdicts += [time_ratio <= target, memory_ratio <= 0.5]
        lines.append(f"| {pods} | {parameters:,} | {seconds:.3f} | {flower_seconds:.2f} | 1/{1 / time_ratio:.0f} | "
                     f"1/{1 / target:.0f} | {peak:.2f} | {flower_peak:.2f} | {memory_ratio:.2f} | "
                     f"{statistics.median(unauthenticated.seconds):.3f} | {sent} |")
    lines += ["", f"Flower runs up to {FLOWER_MAX_NODES} nodes here: its superlink and supernodes need ~0.4 GiB "
              "per node, more than this machine holds at 100.", ""]
    if flower_failures:
        lines += [f"Flower failed {TRIES} times in a row at: " + "; ".join(flower_failures) + " (its logs "
                  "are under the run's temporary folder, and the benchmark printed them).", ""]
    if failed:
        lines += [f"fedpod failed {TRIES} times in a row at: " + "; ".join(failed) + " (no row; the benchmark "
                  "printed its output).", ""]
    small = [(pods, times) for pods, parameters, (times, _), _, _ in rows if parameters < 1_000_000]
    lines += many_pods_table(small, {pods: measure_floor(pods) for pods, _ in small}, verdicts)
    transport_ratio = fedpod_rate / raw_rate
    authentication = ", ".join(f"{statistics.median(times.seconds) / statistics.median(open_times.seconds) - 1:+.0%}"
                               for _, _, (times, _), _, open_times in rows)
    verdicts.append(transport_ratio >= 0.5)
    lines += ["", f"Transport in the same run, 40 MB payload: fedpod {fedpod_rate:.0f} MB/s, raw nats-py "
              f"{raw_rate:.0f} MB/s ({transport_ratio:.0%}; target >= 50%; fedpod's path includes the signed "
              "transfer ticket and a BLAKE3 digest of every chunk on both sides).", "",
              f"Authentication (the first time column against the last, same run): "
              f"{authentication} per round "
              "for the rows above. nats-server checks subject permissions per message, and a party signs the "
              "server's nonce once per connection; the small model's rounds last milliseconds, where this "
              "machine's noise alone moves them by tens of percent (earlier runs: +8% to +18%).", "",
              "Targets: time per round at most 1/20 of Flower's for the small model (and under 100 ms at 10 pods), "
              "at most 1/4 for the 40 MB model at 3 pods and 1/10 at 10 pods, the modeller sending a 40 MB round's "
              "model once (under 1.5 x its size, replies' acknowledgements included) rather than once per pod, at "
              "least half of raw NATS throughput, at most half of Flower's "
              f"memory, and the many-pods targets above: **{'all met' if all(verdicts) else 'NOT all met'}**.", ""]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    main()
