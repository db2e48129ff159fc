"""Fed-BioMed's TanaT tutorial, end to end with fedpod, offline, in one command:

    fedpod demo --journeys [--out journeys-tutorial] [--patients 3000] [--model journey_gru]
    python examples/journeys/run.py   (the same, as a script)

Stage A, one centre on its own: its events and static table, the temporal tensor (shape,
sparsity), and a model trained locally (loss per epoch).
Stage B, three hospitals as pods (separate processes on a local NATS broker): the vocabulary
agreed by federated count, FedAverage rounds (loss per round), the final model evaluated at
each centre, and the same model trained centrally on the pooled tensors for comparison. Plots
and a summary land in --out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.centralised import train_centrally
from fedpod.algorithms.training.journey_plans import journey_tensor
from fedpod.algorithms.training.local import run_local_round, split
from fedpod.algorithms.training.metrics import evaluate
from fedpod.algorithms.training.plans import DatasetHandle
from fedpod.algorithms.training.registry import builtin_plan
from fedpod.data.catalog import inspect
from fedpod.data.datasets import DatasetSpec
from fedpod.data.journeys import Journeys, generate_journeys, write_journeys
from fedpod.journeys import to_tensor, top_codes
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.pod.local import pod_processes, wait_for_pods, write_pod
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

ROUNDS = 10
UPDATES = 40
TRAINING_ARGS: dict[str, Any] = {"num_updates": UPDATES, "loader_args": {"batch_size": 64},
                                 "optimizer_args": {"lr": 0.01}, "random_seed": 3, "test_ratio": 0.3,
                                 "test_metric": "auc", "test_on_global_updates": True}


def model_args(target: str) -> dict[str, Any]:
    return {"target": target, "bin_size": "180D", "max_bins": 8, "anchor": "index_date", "top_k": 30}


def stage_a(centre: Journeys, model: str, target: str) -> dict[str, Any]:
    """One centre alone, as the tutorial's first half: pool, tensor, a local model."""
    print(f"== stage A: centre {centre.name} on its own")
    print(f"{len(centre.events):,} events of {len(centre.patients):,} patients, "
          f"{centre.events['code'].nunique()} distinct codes")
    codes = top_codes(centre.events, 30)  # alone, a centre may pick its own codes
    tensor = to_tensor(centre.events, centre.patients, codes=codes, bin_size="180D", max_bins=8,
                       anchor="index_date").tensor
    sparsity = float((tensor == 0).mean())
    print(f"tensor {tensor.shape} (patients x time bins x codes), {sparsity:.1%} zeros")
    arguments = model_args(target) | {"codes": codes}
    plan = builtin_plan(model)()
    plan.dataset = DatasetHandle(centre.name, {}, lambda: centre.events, lambda: centre.patients)
    epoch_args = {k: v for k, v in TRAINING_ARGS.items() if k != "num_updates"}
    args = TrainingArgs.parse(epoch_args | {"epochs": 1, "test_on_local_updates": True})
    plan.post_init(arguments, args)
    losses = []
    for epoch in range(5):
        result = run_local_round(plan, plan.get_params(), args, {})
        plan.set_params(result.params)
        losses.append(result.metrics.get("loss", float("nan")))
        print(f"epoch {epoch}: loss {losses[-1]:.4f}, held-out AUC {result.metrics.get('local_auc', float('nan')):.3f}")
    return {"tensor_shape": list(tensor.shape), "sparsity": sparsity, "local_losses": losses}


def pooled_training_rows(centres: list[Journeys]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The patients the pods trained on, pooled: each pod holds `test_ratio` of its patients out
    (the same split every round), so the centralised yardstick must not learn from them either."""
    events, static = [], []
    for centre in centres:
        train_rows, _ = split(len(centre.patients), TRAINING_ARGS["test_ratio"], TRAINING_ARGS["random_seed"])
        patients = centre.patients.iloc[train_rows]
        static.append(patients)
        events.append(centre.events[centre.events["patient_id"].isin(patients["patient_id"])])
    return pd.concat(events, ignore_index=True), pd.concat(static, ignore_index=True)


def stage_b(centres: list[Journeys], folders: list[Path], out: Path, model: str, target: str) -> dict[str, Any]:
    print("== stage B: three pods, an agreed vocabulary, FedAverage")
    keystore = out / "keys"
    lab = Identity.generate("lab")
    lab.save(keystore)
    with EmbeddedBroker() as broker:
        configs = []
        for centre, folder in zip(centres, folders, strict=True):
            spec = inspect(DatasetSpec(name="ehr", kind="events", path=str((folder / "events.parquet").resolve()),
                                       static=str((folder / "patients.parquet").resolve()), tags=["journeys"]),
                           out / "pods" / centre.name)
            configs.append(write_pod(out / "pods" / centre.name, centre.name, broker, [spec], [lab], heartbeat_s=0.5))
        with pod_processes(configs, out / "logs") as processes, \
                Modeller(lab, broker=broker.url, keystore=keystore, known_pods=out / "known_pods.json",
                         timeout_s=120) as modeller:
            wait_for_pods(modeller, {c.name for c in centres}, processes)
            experiment = Experiment(tags=["journeys"], training_plan_class=model, model_args=model_args(target),
                                    training_args=TRAINING_ARGS, round_limit=ROUNDS, modeller=modeller,
                                    experiments_root=out / "experiments")
            experiment.run()
            arguments = experiment.model_args()
            print(f"vocabulary agreed over the three pods: {len(arguments['codes'])} codes, "
                  f"first {arguments['codes'][:5]}")
            replies = experiment.training_replies()
            losses = {r: float(np.mean([p["loss"] for p in pods.values() if "loss" in p]))
                      for r, pods in replies.items()}
            for round_number, loss in losses.items():
                print(f"round {round_number}: mean loss {loss:.4f}")
            federated = {pod: reply["global_auc"] for pod, reply in experiment.evaluate().items()
                         if "global_auc" in reply}
            federated_plan = experiment.training_plan()
            experiment.close()
    pooled_events, pooled_static = pooled_training_rows(centres)
    holdout = generate_journeys(len(centres), sum(len(c.patients) for c in centres), seed=99)
    central = train_centrally(model, pooled_events, arguments, TRAINING_ARGS, UPDATES * ROUNDS * len(centres),
                              pooled_static)
    scores = {}
    for name, plan in (("federated", federated_plan), ("centralised", central)):
        tensor, labels = journey_tensor(pd.concat([h.events for h in holdout]),
                                        pd.concat([h.patients for h in holdout]), arguments)
        features = tensor.mean(axis=1) if getattr(plan, "time_averaged", False) else tensor
        scores[name] = evaluate("auc", labels, plan.predict_scores(features.astype(np.float32)))
    print(f"held-out AUC on new patients of all centres: federated {scores['federated']:.3f}, "
          f"centralised {scores['centralised']:.3f} ({scores['federated'] / scores['centralised']:.1%})")
    print("federated model evaluated at each centre: " + ", ".join(f"{p} {a:.3f}" for p, a in federated.items()))
    return {"round_losses": losses, "per_centre_auc": federated, "holdout_auc": scores,
            "vocabulary": arguments["codes"]}


def plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(summary["stage_a"]["local_losses"], marker="o")
    left.set(title="stage A: one centre, local training", xlabel="epoch", ylabel="loss")
    rounds = summary["stage_b"]["round_losses"]
    right.plot(list(rounds), list(rounds.values()), marker="o")
    right.set(title="stage B: FedAverage over three pods", xlabel="round", ylabel="mean loss")
    figure.tight_layout()
    figure.savefig(out / "losses.png", dpi=120)


def run_journeys_demo(out: Path, *, patients: int = 3000, model: str = "journey_gru",
                      target: str = "diabetes_next_year", seed: int = 1) -> dict[str, Any]:
    """Both stages; writes `summary.json` and `losses.png` to `out` and returns the summary."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    centres = generate_journeys(3, patients, seed)
    folders = write_journeys(centres, out / "data", "parquet")
    summary: dict[str, Any] = {"stage_a": stage_a(centres[0], model, target),
               "stage_b": stage_b(centres, folders, out, model, target)}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    plot(summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {summary['seconds']} s; summary.json and losses.png in {out}")
    return summary
