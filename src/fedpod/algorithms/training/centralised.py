"""The yardstick of federated training: the same built-in model trained on the pooled rows
with as many optimizer steps as all pods took together, and both scored on held-out rows.
Used by `fedpod demo` and the quality benchmark; only meaningful where pooling is allowed
(synthetic or public data)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.builtin import tabular_arrays
from fedpod.algorithms.training.local import run_local_round
from fedpod.algorithms.training.metrics import evaluate
from fedpod.algorithms.training.plans import DatasetHandle, TrainingPlan
from fedpod.algorithms.training.registry import builtin_plan


def train_centrally(model: str, pooled: pd.DataFrame, model_args: dict[str, Any], training_args: dict[str, Any],
                    num_updates: int, pooled_static: pd.DataFrame | None = None) -> TrainingPlan:
    """`pooled_static`: for journey models, the pooled static table beside the pooled events."""
    args = TrainingArgs.parse({**training_args, "num_updates": num_updates, "test_ratio": 0.0,
                               "test_on_global_updates": False})
    plan = builtin_plan(model)()
    plan.dataset = DatasetHandle("pooled", {}, lambda: pooled,
                                 None if pooled_static is None else lambda: pooled_static)
    plan.post_init(model_args, args)
    plan.set_params(run_local_round(plan, plan.get_params(), args, {}).params)
    return plan


def holdout_scores(plan: TrainingPlan, model_args: dict[str, Any], holdout: pd.DataFrame) -> dict[str, float]:
    """AUC and accuracy on rows no training saw, with the features prepared as in training."""
    features, target = tabular_arrays(holdout, model_args, "held-out rows")
    predicted = plan.predict_scores(features)
    return {"auc": evaluate("auc", target, predicted), "accuracy": evaluate("accuracy", target, predicted)}
