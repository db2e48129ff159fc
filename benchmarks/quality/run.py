"""Model quality: fedpod's federated training vs centralised training vs Flower's FedAvg.

    python -m benchmarks.quality.run        # rewrites benchmarks/quality/results.md
                                            # (installs Flower into benchmarks/flower/.venv first)

(a) the three synthetic centres (non-IID: sizes, age mix and case mix differ), scored on
    held-out patients generated from the same centres with another seed;
(b) scikit-learn's breast-cancer data, 75% split over 5 pods, 25% held out.
Same model (built-in logistic regression), seed, batch size and learning rate. Federated: FedAvg
over pods running as processes on a real NATS broker, R rounds of U local steps per pod.
Centralised: the same model trained on the pooled training rows for the same total number of
local steps (R x U x pods). Features are standardised with global statistics computed by
federated SQL (the centralised model uses the same ones). Target for (a): federated AUC >= 0.98
x centralised AUC. Flower: Flower 1.42's deployment engine (superlink, one supernode per pod,
`flwr run`) with its FedAvg over the same splits, the same model args and training args, its
ClientApp running fedpod's own model code and local round (benchmarks/flower/app/), so that
only the federation framework differs. Target: fedpod not worse than Flower.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from safetensors.numpy import load_file
from sklearn.datasets import load_breast_cancer

from benchmarks.flower.deployment import FlowerFederation
from benchmarks.report import machine, publish
from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.centralised import holdout_scores, train_centrally
from fedpod.algorithms.training.plans import TrainingPlan
from fedpod.algorithms.training.registry import builtin_plan
from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.modeller.standardise import global_standardisation, numeric_features
from fedpod.pod.local import pod_processes, wait_for_pods, write_pod
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

HERE = Path(__file__).parent


@dataclass
class Case:
    name: str
    parts: list[pd.DataFrame]
    holdout: pd.DataFrame
    target: str
    exclude: list[str]
    rounds: int
    updates: int
    lr: float


def synthetic_case() -> Case:
    centres = generate(3, 6000, seed=21)
    holdout = pd.concat([c.patients for c in generate(3, 3000, seed=22)])
    return Case("synthetic centres (3 pods, non-IID)", [c.patients.drop(columns=["centre"]) for c in centres],
                holdout, "outcome", ["patient_id"], rounds=10, updates=20, lr=0.05)


def breast_cancer_case() -> Case:
    data = load_breast_cancer(as_frame=True).frame
    data.columns = [c.replace(" ", "_") for c in data.columns]
    shuffled = data.sample(frac=1.0, random_state=0).reset_index(drop=True)
    cut = int(len(shuffled) * 0.75)
    train, holdout = shuffled.iloc[:cut], shuffled.iloc[cut:]
    bounds = np.linspace(0, len(train), 6).astype(int)
    parts = [train.iloc[a:b] for a, b in itertools.pairwise(bounds)]
    return Case("breast cancer (5 pods, random split)", parts, holdout, "target", [],
                rounds=10, updates=10, lr=0.05)


def centralised(case: Case, model_args: dict, training_args: dict) -> TrainingPlan:  # type: ignore[type-arg]
    return train_centrally("logistic_regression", pd.concat(case.parts), model_args, training_args,
                           case.rounds * case.updates * len(case.parts))


def flower(case: Case, work: Path, model_args: dict, training_args: dict) -> TrainingPlan:  # type: ignore[type-arg]
    """Flower's FedAvg on the same CSVs the pods serve; returns fedpod's plan holding its final weights."""
    spec = work / "flower-spec.json"
    spec.write_text(json.dumps({"model_args": model_args, "training_args": training_args}))
    data = [{"data": str(work / f"pod{i + 1}" / "data.csv")} for i in range(len(case.parts))]
    with FlowerFederation(len(case.parts), work / "flower", data) as federation:
        federation.run(work / "flower" / "out", {"task": "logistic", "rounds": case.rounds, "nodes": len(case.parts),
                                                 "spec": str(spec)})
    plan = builtin_plan("logistic_regression")()
    plan.post_init(model_args, TrainingArgs.parse(training_args))
    plan.set_params(load_file(str(work / "flower" / "out" / "final.safetensors")))
    return plan


def run_case(case: Case, work: Path, seed: int) -> dict[str, float]:
    identity = Identity.generate("modeller")
    identity.save(work / "keys")
    names = [f"pod{i + 1}" for i in range(len(case.parts))]
    training_args = {"num_updates": case.updates, "loader_args": {"batch_size": 32},
                     "optimizer_args": {"lr": case.lr}, "random_seed": seed}
    with EmbeddedBroker() as broker:
        configs = []
        for name, part in zip(names, case.parts, strict=True):
            folder = work / name
            folder.mkdir(parents=True)
            part.to_csv(folder / "data.csv", index=False)
            configs.append(write_pod(folder, name, broker, [DatasetSpec(
                name="data", kind="csv", path=str(folder / "data.csv"), tags=["bench"])], [identity]))
        with pod_processes(configs, work / "logs") as processes, \
                Modeller(identity, broker=broker.url, keystore=work / "keys", timeout_s=300) as modeller:
            wait_for_pods(modeller, set(names), processes, deadline_s=120)
            targets = modeller.resolve(tags=["bench"])
            model_args = {"target": case.target, "exclude": case.exclude}
            model_args |= global_standardisation(modeller, targets, numeric_features(targets[0], model_args))
            experiment = Experiment(tags=["bench"], training_plan_class="logistic_regression", model_args=model_args,
                                    training_args=training_args, round_limit=case.rounds, modeller=modeller,
                                    experiments_root=work / "experiments", console=Console(quiet=True))
            experiment.run()
            federated = holdout_scores(experiment.training_plan(), model_args, case.holdout)
    central = holdout_scores(centralised(case, model_args, training_args), model_args, case.holdout)
    peer = holdout_scores(flower(case, work, model_args, training_args), model_args, case.holdout)
    return {"federated_auc": federated["auc"], "centralised_auc": central["auc"], "flower_auc": peer["auc"],
            "federated_accuracy": federated["accuracy"], "centralised_accuracy": central["accuracy"],
            "flower_accuracy": peer["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for index, case in enumerate([synthetic_case(), breast_cancer_case()]):
        work = Path(tempfile.mkdtemp(prefix=f"fedpod-bench-quality-{index}-"))
        rows.append((case, run_case(case, work, args.seed)))
    lines = [
        "# Model quality: fedpod vs centralised vs Flower",
        "",
        f"`python -m benchmarks.quality.run` — built-in logistic regression, FedAvg, batch 32, seed {args.seed}; "
        "centralised training gets the same total number of local steps on the pooled training rows; both "
        "scored on held-out rows. Flower: 1.42's deployment engine and FedAvg on the same splits, its ClientApp "
        f"running fedpod's model code and local round. Machine: {machine()}.",
        "",
        "| data | rounds x local steps | fedpod AUC | centralised AUC | Flower FedAvg AUC | fedpod / centralised | "
        "fedpod accuracy | centralised accuracy | Flower accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, result in rows:
        ratio = result["federated_auc"] / result["centralised_auc"]
        lines.append(f"| {case.name} | {case.rounds} x {case.updates} | {result['federated_auc']:.4f} | "
                     f"{result['centralised_auc']:.4f} | {result['flower_auc']:.4f} | {ratio:.3f} | "
                     f"{result['federated_accuracy']:.4f} | {result['centralised_accuracy']:.4f} | "
                     f"{result['flower_accuracy']:.4f} |")
    synthetic_ratio = rows[0][1]["federated_auc"] / rows[0][1]["centralised_auc"]
    verdict = "met" if synthetic_ratio >= 0.98 else "NOT met"
    not_worse = all(result["federated_auc"] >= result["flower_auc"] - 1e-3 for _, result in rows)
    lines += ["", f"Target (a) federated AUC >= 0.98 x centralised: **{verdict}** ({synthetic_ratio:.3f}). "
              f"Not worse than Flower's FedAvg (AUC within 0.001 or better, both cases): "
              f"**{'met' if not_worse else 'NOT met'}**.", ""]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    main()
