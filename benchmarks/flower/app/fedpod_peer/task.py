"""What both of Flower's apps share with fedpod: the same model code and the same arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.local import seed_everything
from fedpod.algorithms.training.plans import DatasetHandle, TrainingPlan
from fedpod.algorithms.training.registry import builtin_plan


def arguments(run_config: dict[str, Any]) -> tuple[dict[str, Any], TrainingArgs]:
    spec = json.loads(Path(str(run_config["spec"])).read_text())
    return spec["model_args"], TrainingArgs.parse(spec["training_args"])


def logistic_plan(run_config: dict[str, Any], data: str | None) -> TrainingPlan:
    """fedpod's built-in logistic regression, initialised as fedpod's modeller does (seed, then post_init)."""
    model_args, training_args = arguments(run_config)
    seed_everything(training_args.random_seed)
    plan = builtin_plan("logistic_regression")()
    if data is not None:
        plan.dataset = DatasetHandle("data", {}, lambda: pd.read_csv(data))
    plan.post_init(model_args, training_args)
    return plan
