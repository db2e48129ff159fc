"""A federated round with a 100M-parameter model (400 MB of float32) across 3 pods.

    python -m benchmarks.rounds.large_model     # rewrites benchmarks/rounds/large_model.md

The built-in MLP with hidden layers [10000, 10000] on the 7 synthetic features has
100,030,001 parameters. Each round sends the global model to every pod (encrypted for each),
trains one local step there, and brings three 400 MB updates back to be averaged. Reports
seconds per round and the peak resident memory of every process (modeller, pods, broker).
"""

from __future__ import annotations

import argparse
import tempfile
import time
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


def role(command: str) -> str:
    """A process's part in the run, from its command line."""
    if "nats-server" in command:
        return "broker"
    if "fedpod.data.catalog" in command:
        return "a pod's start-up reader of its datasets (data.catalog)"
    pod = next((name for name in PODS if f"/{name}/" in command), None)
    return f"pod {pod}" if pod else "modeller (this process)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpod-bench-large-"))
    files = [f / "patients.csv" for f in write(generate(3, 900, seed=1), work / "data")]
    identity = Identity.generate("modeller")
    identity.save(work / "keys")
    with PeakMemory() as memory, EmbeddedBroker() as broker:
        configs = []
        for pod, file in zip(PODS, files, strict=True):
            configs.append(write_pod(work / pod, pod, broker,
                                     [DatasetSpec(name="ehr", kind="csv", path=str(file), tags=["ehr"])], [identity]))
        with pod_processes(configs, work / "logs") as processes, \
                Modeller(identity, broker=broker.url, keystore=work / "keys", timeout_s=900) as modeller:
            wait_for_pods(modeller, set(PODS), processes, deadline_s=120)
            experiment = Experiment(tags=["ehr"], training_plan_class="mlp",
                                    model_args={"target": "outcome", "features": FEATURES,
                                                "hidden": [args.hidden, args.hidden]},
                                    training_args={"num_updates": 1, "loader_args": {"batch_size": 32},
                                                   "optimizer_args": {"lr": 1e-4}},
                                    round_limit=args.rounds, modeller=modeller, experiments_root=work / "experiments",
                                    standardize=False)
            parameters = sum(v.size for v in experiment.training_plan().get_params().values())
            seconds = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                experiment.run_once()
                seconds.append(time.perf_counter() - started)
    lines = [
        "# A 100M-parameter model across 3 pods",
        "",
        f"`python -m benchmarks.rounds.large_model` — built-in MLP, hidden layers [{args.hidden}, {args.hidden}], "
        f"{parameters:,} parameters ({parameters * 4 / 1e6:.0f} MB float32); 3 pods as processes, embedded NATS "
        f"(stock 1 MiB max_payload), one local step per round. Machine: {machine()}.",
        "",
        "| round | seconds |",
        "|---:|---:|",
        *[f"| {i + 1} | {s:.1f} |" for i, s in enumerate(seconds)],
        "",
        f"Peak resident memory of all processes together (modeller, 3 pods, broker): "
        f"**{memory.peak / 2**30:.1f} GiB**. Each process's own peak:",
        "",
        "| process | peak GiB |",
        "|---|---:|",
        *[f"| {role(command)} | {peak / 2**30:.2f} |" for command, peak in sorted(memory.by_process.values(),
                                                                              key=lambda item: -item[1])[:5]],
        "",
    ]
    publish(HERE / "large_model.md", lines)


if __name__ == "__main__":
    main()
