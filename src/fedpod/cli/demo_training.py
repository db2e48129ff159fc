"""The training half of `fedpod demo`: federated logistic regression over the three pods,
against the same model trained centrally on the pooled rows, both scored on held-out patients.

Feature standardisation uses global means and standard deviations computed exactly with
federated SQL, so every pod scales its features the same way without sharing rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from fedpod.algorithms.training.centralised import holdout_scores, train_centrally
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.modeller.standardise import global_standardisation

FEATURES = ["age", "bmi", "smoker", "diabetes", "systolic_bp", "cholesterol", "hba1c"]
ROUNDS = 5
UPDATES = 40
TRAINING_ARGS: dict[str, Any] = {
    "num_updates": UPDATES, "loader_args": {"batch_size": 32}, "optimizer_args": {"lr": 0.05}, "random_seed": 7,
    "test_ratio": 0.2, "test_metric": "auc", "test_on_global_updates": True,
}


def run_training(modeller: Modeller, identifiers: list[str], pooled: pd.DataFrame,
                 holdout: pd.DataFrame, out: Path, console: Console) -> dict[str, dict[str, float]]:
    model_args = {"target": "outcome"} | global_standardisation(modeller, modeller.resolve(identifiers), FEATURES)
    experiment = Experiment(datasets=identifiers, training_plan_class="logistic_regression", model_args=model_args,
                            training_args=TRAINING_ARGS, round_limit=ROUNDS, modeller=modeller,
                            experiments_root=out / "experiments", console=console)
    experiment.run()
    central = train_centrally("logistic_regression", pooled, model_args, TRAINING_ARGS,
                              UPDATES * ROUNDS * len(identifiers))
    return {"federated": holdout_scores(experiment.training_plan(), model_args, holdout),
            "centralised": holdout_scores(central, model_args, holdout)}
