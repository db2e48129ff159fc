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
        return float(_sk().roc_auc_score(y, scores, multi_class="ovr", **kwargs))
    return float(_sk().roc_auc_score(y, scores.reshape(-1), **kwargs))


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": lambda y, s, **k: float(_sk().accuracy_score(y, _labels(s), **k)),
    "f1": lambda y, s, **k: float(_sk().f1_score(y, _labels(s), zero_division=0, **k)),
    "precision": lambda y, s, **k: float(_sk().precision_score(y, _labels(s), zero_division=0, **k)),
    "recall": lambda y, s, **k: float(_sk().recall_score(y, _labels(s), zero_division=0, **k)),
    "auc": _auc,
    "mse": lambda y, s, **k: float(_sk().mean_squared_error(y, s.reshape(len(y), -1).squeeze(-1), **k)),
    "mae": lambda y, s, **k: float(_sk().mean_absolute_error(y, s.reshape(len(y), -1).squeeze(-1), **k)),
    "r2": lambda y, s, **k: float(_sk().r2_score(y, s.reshape(len(y), -1).squeeze(-1), **k)),
}


def evaluate(name: str, target: np.ndarray, scores: np.ndarray, **kwargs: Any) -> float:
    return METRICS[name](np.asarray(target).reshape(-1), np.asarray(scores), **kwargs)
