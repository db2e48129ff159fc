"""FedAvg rounds with large models across 3 pods, and the memory they take.

    python -m benchmarks.rounds.large_model     # rewrites benchmarks/rounds/large_model.md

The built-in MLP with two hidden layers of width H on the 7 synthetic features has about H²
parameters: H = 10,000 gives 100M parameters (400 MB of float32), H = 15,800 gives 250M (1 GB).
Each round casts the global model once to the pods (sealed once, fanned out by NATS), trains
one local step there and brings three updates back to be averaged. Each configuration runs on
its own broker and pods, so each peak is its own. Reported: seconds per round, and the peak
resident memory of all processes together (modeller, pods, broker) and of each.

Local SGD is FedAvg's own local optimizer (McMahan et al.); Adam keeps two moments per
parameter, which costs each pod twice the model's size more — a configuration shows how much.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.memory import PeakMemory
from benchmarks.report import machine, publish
from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.pod.local import pod_processes, wait_for_pods, write_pod
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

HERE = Path(__file__).parent
PODS = ["alice", "bob", "charlie"]
FEATURES = ["age", "bmi", "smoker", "diabetes", "systolic_bp", "cholesterol", "hba1c"]
TARGET_GIB = 6.0  # issue 11: a 100M-parameter round across 3 pods peaks at no more than this over all processes


@dataclass(frozen=True)
class Configuration:
    hidden: int
    optimizer: str
    rounds: int
    judged: bool  # the configuration the memory target is about


@dataclass
class Outcome:
    configuration: Configuration
    parameters: int
    seconds: list[float]
    peak: int
    by_role: dict[str, int]


CONFIGURATIONS = [Configuration(10_000, "sgd", 2, judged=True), Configuration(10_000, "adam", 1, judged=False),
                  Configuration(15_800, "sgd", 1, judged=False)]


def role(command: str) -> str:
    """A process's part in the run, from its command line."""
    if "nats-server" in command:
        return "broker"
    if "fedpod.data.catalog" in command:
        return "a pod's start-up reader of its datasets"
    pod = next((name for name in PODS if f"/{name}/" in command), None)
    return f"pod {pod}" if pod else "modeller (this process)"


def run(configuration: Configuration, work: Path, files: list[Path], identity: Identity) -> Outcome:
    with PeakMemory(refresh_s=1.0) as memory, EmbeddedBroker() as broker:
        configs = [write_pod(work / pod, pod, broker, [DatasetSpec(name="ehr", kind="csv", path=str(file),
                                                                   tags=["ehr"])], [identity])
                   for pod, file in zip(PODS, files, strict=True)]
        with pod_processes(configs, work / "logs") as processes, \
                Modeller(identity, broker=broker.url, keystore=work / "keys", timeout_s=1800) as modeller:
            wait_for_pods(modeller, set(PODS), processes, deadline_s=120)
            experiment = Experiment(
                tags=["ehr"], training_plan_class="mlp",
                model_args={"target": "outcome", "features": FEATURES,
                            "hidden": [configuration.hidden, configuration.hidden]},
                training_args={"num_updates": 1, "loader_args": {"batch_size": 32},
                               "optimizer_args": {"name": configuration.optimizer, "lr": 1e-4}},
                round_limit=configuration.rounds, modeller=modeller, experiments_root=work / "experiments",
                standardize=False)
            parameters = sum(v.size for v in experiment.training_plan().get_params().values())
            seconds = []
            for _ in range(configuration.rounds):
                started = time.perf_counter()
                experiment.run_once()
                seconds.append(time.perf_counter() - started)
    by_role: dict[str, int] = {}
    for command, peak in memory.by_process.values():
        name = role(command)
        by_role[name] = max(by_role.get(name, 0), peak)
    return Outcome(configuration, parameters, seconds, memory.peak, by_role)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only-judged", action="store_true", help="run the 400 MB SGD configuration alone")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpod-bench-large-"))
    files = [f / "patients.csv" for f in write(generate(3, 900, seed=1), work / "data")]
    identity = Identity.generate("modeller")
    identity.save(work / "keys")
    outcomes = [run(c, work / f"run{i}", files, identity)
                for i, c in enumerate(CONFIGURATIONS) if c.judged or not args.only_judged]
    judged = next(o for o in outcomes if o.configuration.judged)
    met = judged.peak / 2**30 <= TARGET_GIB
    roles = sorted({name for o in outcomes for name in o.by_role}, key=lambda n: (not n.startswith("pod"), n))
    lines = [
        "# Large models across 3 pods",
        "",
        "`python -m benchmarks.rounds.large_model` — built-in MLP with two hidden layers, 3 pods as processes, "
        "embedded NATS (stock 1 MiB max_payload), one local step per round (batch 32), each configuration on its "
        f"own broker and pods. Machine: {machine()}.",
        "",
        "| hidden | parameters | float32 size | local optimizer | rounds: seconds each | peak memory, all processes "
        "(GiB) | peak / model size |",
        "|---:|---:|---:|---|---|---:|---:|",
        *[f"| {o.configuration.hidden:,} | {o.parameters:,} | {o.parameters * 4 / 1e9:.2f} GB | "
          f"{o.configuration.optimizer} | {', '.join(f'{s:.1f}' for s in o.seconds)} | {o.peak / 2**30:.2f} | "
          f"{o.peak / (o.parameters * 4):.1f}x |" for o in outcomes],
        "",
        "Each process's own peak (GiB):",
        "",
        "| process | " + " | ".join(f"{o.configuration.hidden:,} {o.configuration.optimizer}" for o in outcomes) + " |",
        "|---|" + "---:|" * len(outcomes),
        *[f"| {name} | " + " | ".join(f"{o.by_role.get(name, 0) / 2**30:.2f}" for o in outcomes) + " |"
          for name in roles],
        "",
        f"Target (issue 11): a 100M-parameter FedAvg round across 3 pods peaks at no more than {TARGET_GIB:g} GiB "
        f"over all processes (before: 14.2 GiB, then 11.7 GiB with the model cast once): "
        f"**{judged.peak / 2**30:.2f} GiB, {'met' if met else 'not met'}**; the 1 GB model "
        f"{'completes its round' if any(o.configuration.hidden == 15_800 for o in outcomes) else 'was not run'}.",
        "",
        "Where the memory goes: a pod holds the model once (the received arrays become its tensors and are "
        "trained in place), its gradients while it trains, and the sealed reply while it sends; the modeller "
        "holds the global model once (its plan's tensors are the global arrays), the pods' updates as they "
        "arrive, and the new average.",
        "",
    ]
    publish(HERE / "large_model.md", lines)


if __name__ == "__main__":
    main()
