"""The training half of `fedpod demo`: federated logistic regression over the three pods,
against the same model trained centrally on the pooled rows, both scored on held-out patients.

Feature standardisation uses global means and standard deviations computed exactly with
federated SQL, so every pod scales its features the same way without sharing rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.builtin import builtin_plan
from fedpod.algorithms.training.local import run_local_round
from fedpod.algorithms.training.metrics import evaluate
from fedpod.algorithms.training.plans import DatasetHandle, TrainingPlan
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment

FEATURES = ["age", "bmi", "smoker", "diabetes", "systolic_bp", "cholesterol", "hba1c"]
ROUNDS = 5
UPDATES = 40
TRAINING_ARGS: dict[str, Any] = {
    "num_updates": UPDATES, "loader_args": {"batch_size": 32}, "optimizer_args": {"lr": 0.05}, "random_seed": 7,
    "test_ratio": 0.2, "test_metric": "auc", "test_on_global_updates": True,
}


def global_standardisation(modeller: Modeller, identifiers: list[str], dataset: str) -> dict[str, Any]:
    columns = ", ".join(f"AVG({f}) AS m_{f}, STDDEV_POP({f}) AS s_{f}" for f in FEATURES)
    row = modeller.sql(f"SELECT {columns} FROM `{dataset}`", datasets=identifiers, aggregate=True)
    assert isinstance(row, pd.DataFrame)
    return {"target": "outcome", "features": FEATURES, "feature_means": [float(row[f"m_{f}"][0]) for f in FEATURES],
            "feature_stds": [float(row[f"s_{f}"][0]) for f in FEATURES]}


def scores(plan: TrainingPlan, model_args: dict[str, Any], holdout: pd.DataFrame) -> dict[str, float]:
    x = (holdout[FEATURES].to_numpy() - np.array(model_args["feature_means"])) / np.array(model_args["feature_stds"])
    predicted = plan.predict_scores(x.astype(np.float32))
    target = holdout["outcome"].to_numpy()
    return {"auc": evaluate("auc", target, predicted), "accuracy": evaluate("accuracy", target, predicted)}


def train_centrally(pooled: pd.DataFrame, model_args: dict[str, Any], pods: int) -> TrainingPlan:
    """The centralised limit: the same model and optimizer, as many optimizer steps as all pods took together."""
    args = TrainingArgs.parse({**TRAINING_ARGS, "num_updates": UPDATES * ROUNDS * pods,
                               "test_ratio": 0.0, "test_on_global_updates": False})
    plan = builtin_plan("logistic_regression")()
    plan.dataset = DatasetHandle("pooled", {}, lambda: pooled)
    plan.post_init(model_args, args)
    result = run_local_round(plan, plan.get_params(), args, {})
    plan.set_params(result.params)
    return plan


def run_training(modeller: Modeller, identifiers: list[str], dataset: str, pooled: pd.DataFrame,
                 holdout: pd.DataFrame, out: Path, console: Console) -> dict[str, dict[str, float]]:
    model_args = global_standardisation(modeller, identifiers, dataset)
    experiment = Experiment(datasets=identifiers, training_plan_class="logistic_regression", model_args=model_args,
                            training_args=TRAINING_ARGS, round_limit=ROUNDS, modeller=modeller,
                            experiments_root=out / "experiments", console=console)
    experiment.run()
    central = train_centrally(pooled, model_args, len(identifiers))
    return {"federated": scores(experiment.training_plan(), model_args, holdout),
            "centralised": scores(central, model_args, holdout)}
