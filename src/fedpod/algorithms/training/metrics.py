"""Validation metrics by name. Scores may be probabilities (one column or one per class) or
values; classification metrics derive labels from them (threshold 0.5, or argmax)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np


@functools.cache
def _sk() -> ModuleType:
    """scikit-learn loads with the first validation, not with every pod."""
    return importlib.import_module("sklearn.metrics")


def _labels(scores: np.ndarray) -> np.ndarray:
    if scores.ndim == 2 and scores.shape[1] > 1:
        return np.asarray(np.argmax(scores, axis=1))
    return np.asarray(scores.reshape(-1) >= 0.5, dtype=int)


def _auc(y: np.ndarray, scores: np.ndarray, **kwargs: Any) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    if scores.ndim == 2 and scores.shape[1] > 1:
        if len(np.unique(y)) < scores.shape[1]:
            return float("nan")  # one-vs-rest needs every class in the validation rows
        return float(_sk().roc_auc_score(y, scores, multi_class="ovr", **kwargs))
    return float(_sk().roc_auc_score(y, scores.reshape(-1), **kwargs))


def _averaged(metric: str) -> Callable[..., float]:
    """F1, precision or recall: of class 1 for two classes, macro-averaged over classes for more
    (unless `test_metric_args` choose another `average`)."""

    def score(y: np.ndarray, s: np.ndarray, **kwargs: Any) -> float:
        kwargs.setdefault("average", "macro" if s.ndim == 2 and s.shape[1] > 1 else "binary")
        return float(getattr(_sk(), f"{metric}_score")(y, _labels(s), zero_division=0, **kwargs))

    return score


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": lambda y, s, **k: float(_sk().accuracy_score(y, _labels(s), **k)),
    "f1": _averaged("f1"),
    "precision": _averaged("precision"),
    "recall": _averaged("recall"),
    "auc": _auc,
    "mse": lambda y, s, **k: float(_sk().mean_squared_error(y, s.reshape(len(y), -1).squeeze(-1), **k)),
    "mae": lambda y, s, **k: float(_sk().mean_absolute_error(y, s.reshape(len(y), -1).squeeze(-1), **k)),
    "r2": lambda y, s, **k: float(_sk().r2_score(y, s.reshape(len(y), -1).squeeze(-1), **k)),
}


def evaluate(name: str, target: np.ndarray, scores: np.ndarray, **kwargs: Any) -> float:
    return METRICS[name](np.asarray(target).reshape(-1), np.asarray(scores), **kwargs)
