"""Built-in plans for tabular datasets; they need no approval at pods, only policy.

They read the pod's dataset as a DataFrame. `model_args`: `target` (column), `features`
(columns; default: every numeric column but the target and `exclude`), optional
`feature_means` / `feature_stds` to standardise with global statistics (which federated SQL
computes exactly), `n_classes` for classifiers (default 2; more gives a softmax model), `hidden`
for the MLP.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedpod.algorithms.training.layout import report_features
from fedpod.algorithms.training.plans import DataManager, DatasetHandle
from fedpod.algorithms.training.sklearn_plan import PerceptronPlan, SGDClassifierPlan, SGDRegressorPlan
from fedpod.algorithms.training.torch_plan import TorchTrainingPlan
from fedpod.errors import ConfigError


def tabular_features(frame: pd.DataFrame, model_args: dict[str, Any]) -> list[str]:
    target = model_args.get("target")
    if not target:
        raise ConfigError("built-in tabular models need model_args['target']")
    if model_args.get("features"):
        features = list(model_args["features"])
    else:  # the dataset's own column order, which may differ between pods: reported below
        excluded = {target, *model_args.get("exclude", [])}
        features = [c for c in frame.columns if c not in excluded and pd.api.types.is_numeric_dtype(frame[c])]
    report_features(features)
    return features


class TabularData:
    """Standardised by `Experiment` with global statistics (`standardisable`).

    `training_data()` for the built-ins: the configured features and target of the pod's
    dataset. A classifier's target must be class indices 0..n_classes-1 — anything else (a 10-class
    target given to a 2-class model, a continuous one) is refused before training, never learnt
    silently as something else."""

    model_args: dict[str, Any]
    standardisable = True

    def training_data(self) -> DataManager:
        handle = given_dataset(self)
        features, target = tabular_arrays(handle.to_pandas(), self.model_args, handle.name)
        if getattr(self, "classifies", False):  # set by the classifier bases
            check_classes(target, n_classes(self.model_args), str(self.model_args["target"]), handle.name)
        return DataManager(features, target)


def given_dataset(plan: object) -> DatasetHandle:
    """The dataset the pod injected into a built-in plan (`plan.dataset`)."""
    handle = getattr(plan, "dataset", None)
    if handle is None:
        raise ConfigError("no dataset was given to the plan")
    return handle  # type: ignore[no-any-return]


def mlp(inputs: int, hidden: list[int], outputs: int) -> torch.nn.Sequential:
    """Linear layers of the given widths with ReLU between them."""
    sizes = [inputs, *hidden]
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(sizes[-1], outputs))
    return torch.nn.Sequential(*layers)


def n_classes(model_args: dict[str, Any]) -> int:
    count = int(model_args.get("n_classes", 2))
    if count < 2:
        raise ConfigError(f"n_classes must be at least 2, not {count}")
    return count


def check_classes(target: np.ndarray, count: int, column: str, source: str) -> None:
    if not np.issubdtype(target.dtype, np.number):
        raise ConfigError(f"target column {column!r} of dataset {source} is not numeric",
                          hint=f"encode its classes as 0..{count - 1}, or use sgd_regressor for a numeric target")
    values = np.unique(target[~np.isnan(target)] if np.issubdtype(target.dtype, np.floating) else target)
    if len(values) and (np.any(values != np.round(values)) or values.min() < 0 or values.max() >= count):
        # which values, or how many, is not said: a target expression can make them a patient's
        raise ConfigError(f"target column {column!r} of dataset {source} holds values other than the labels of "
                          f"the {count} classes this model was set up for (0..{count - 1})",
                          hint="give model_args n_classes=K for K classes labelled 0..K-1, or use sgd_regressor "
                               "for a continuous target")


def tabular_arrays(frame: pd.DataFrame, model_args: dict[str, Any], source: str) -> tuple[np.ndarray, np.ndarray]:
    """The built-ins' view of a table: the configured features (standardised when model_args
    carry global means and standard deviations) as float32, and the target column."""
    features = tabular_features(frame, model_args)
    missing = [c for c in [*features, model_args["target"]] if c not in frame.columns]
    if missing:
        raise ConfigError(f"columns {missing} are not in dataset {source}")
    values = frame[features].astype("float64").fillna(0.0).to_numpy()
    if "feature_means" in model_args:
        means = np.asarray(model_args["feature_means"], dtype=np.float64)
        stds = np.asarray(model_args.get("feature_stds", np.ones(len(features))), dtype=np.float64)
        values = (values - means) / np.where(stds > 0, stds, 1.0)
    return values.astype(np.float32), frame[model_args["target"]].to_numpy()


def _n_features(model_args: dict[str, Any]) -> int:
    if "n_features" in model_args:
        return int(model_args["n_features"])
    if model_args.get("features"):
        return len(model_args["features"])
    raise ConfigError("give model_args['n_features'] or model_args['features']")


class ClassLogits(TorchTrainingPlan):
    """Logits for `n_classes` classes: with two, one logit, binary cross-entropy and the
    probability of class 1; with more, one logit per class, cross-entropy and softmax
    probabilities (which the metrics read as multi-class: argmax, macro averages, one-vs-rest AUC)."""

    classifies = True

    def outputs(self, model_args: dict[str, Any]) -> int:
        count = n_classes(model_args)
        return 1 if count == 2 else count

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.model()(data)
        if logits.shape[-1] == 1:
            return torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), target.float())
        return torch.nn.functional.cross_entropy(logits, target.long())

    def predict(self, data: torch.Tensor) -> torch.Tensor:
        logits = self.model()(data)
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits.squeeze(-1))
        return torch.softmax(logits, dim=-1)


class LogisticRegression(TabularData, ClassLogits):
    def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
        return torch.nn.Linear(_n_features(model_args), self.outputs(model_args))


class MLP(TabularData, ClassLogits):
    def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
        return mlp(_n_features(model_args), model_args.get("hidden", [32]), self.outputs(model_args))


class TabularSGDClassifier(TabularData, SGDClassifierPlan):
    classifies = True


class TabularSGDRegressor(TabularData, SGDRegressorPlan):
    pass


class TabularPerceptron(TabularData, PerceptronPlan):
    classifies = True
