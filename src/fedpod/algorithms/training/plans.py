"""Training plans, Fed-BioMed style: the modeller writes a class; each pod runs it on its data.

A plan defines `init_model(model_args)`, `training_data()` returning a `DataManager`, and for
PyTorch `training_step(data, target) -> loss` and optionally `init_optimizer(optimizer_args)`
and `init_dependencies()`. The pod injects what the plan may read: `self.dataset_path` (the
dataset's file, as in Fed-BioMed, where it has one) and `self.dataset`, a handle that gives
the dataset as a DataFrame whatever its source.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpod.aggregation.base import Params
from fedpod.algorithms.training.args import TrainingArgs
from fedpod.errors import ConfigError

if TYPE_CHECKING:  # pandas loads with the first DataFrame: array-only plans never need it
    import pandas as pd

    from fedpod.algorithms.training.privacy import PrivacyRound


@dataclass(frozen=True)
class DatasetHandle:
    """What a pod hands a plan: the dataset's name and schema, and its rows on request; for an
    events dataset also its static table (one row per patient)."""

    name: str
    columns: dict[str, str]
    load: Callable[[], pd.DataFrame]
    load_static: Callable[[], pd.DataFrame] | None = None

    def to_pandas(self) -> pd.DataFrame:
        return self.load()

    def static(self) -> pd.DataFrame:
        if self.load_static is None:
            raise ConfigError(f"dataset {self.name} has no static table", hint="journey models need an events "
                              "dataset with --static")
        return self.load_static()


class DataManager:
    """A plan's training data: tensors, arrays or a DataFrame, with the target given as a
    column name (for DataFrames) or as its own array/tensor. Extra keyword arguments are
    loader arguments (`batch_size`, `shuffle`); the modeller's `loader_args` take precedence."""

    def __init__(self, dataset: Any, target: Any = None, **loader_kwargs: Any) -> None:
        self.dataset = dataset
        self.target = target
        self.loader_kwargs = loader_kwargs

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        data, target = self.dataset, self.target
        pandas = sys.modules.get("pandas")  # a DataFrame cannot exist unless pandas was imported
        if pandas is not None and isinstance(data, pandas.DataFrame):
            if isinstance(target, str):
                if target not in data.columns:
                    raise ConfigError(f"target column {target!r} is not in the dataset",
                                      hint=f"columns: {', '.join(map(str, data.columns))}")
                target = data[target].to_numpy()
                data = data.drop(columns=[self.target])
            data = data.to_numpy()
        return _as_numpy(data), None if target is None else _as_numpy(target)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)


@dataclass
class LocalResult:
    params: Params
    num_samples: int
    metrics: dict[str, float]
    extra: dict[str, Params]
    feature_layout: str | None = None  # digest of the input features' names (fedpod.algorithms.training.layout)


class TrainingPlan:
    """Common base of the PyTorch and scikit-learn plans."""

    dataset_path: Path | None = None
    dataset: DatasetHandle | None = None

    def __init__(self) -> None:
        self.model_args: dict[str, Any] = {}
        self.training_args = TrainingArgs()

    def init_dependencies(self) -> list[str]:
        """Import lines the plan's source needs when it is sent to pods (Fed-BioMed's hook)."""
        return []

    def training_data(self) -> DataManager:
        raise NotImplementedError(f"{type(self).__name__} must define training_data()")

    def post_init(self, model_args: dict[str, Any], training_args: TrainingArgs) -> None:
        raise NotImplementedError

    def model(self) -> Any:
        raise NotImplementedError

    def get_params(self) -> Params:
        raise NotImplementedError

    def set_params(self, params: Params) -> None:
        raise NotImplementedError

    def adopt_params(self, params: Params) -> None:
        """`set_params` for arrays the caller hands over: the plan may keep and train them in
        place instead of copying them (a pod's received model, the modeller's global model), so a
        400 MB model is not held twice. The default copies, as `set_params` does."""
        self.set_params(params)

    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def train_round(self, features: np.ndarray, target: np.ndarray, args: TrainingArgs,
                    round_config: dict[str, Any], device: str, state: dict[str, Params],
                    privacy: PrivacyRound | None = None) -> LocalResult:
        """`privacy`: train with DP-SGD (local DP), charging its ledger first; plans that cannot
        refuse it."""
        raise NotImplementedError

    def export_model(self, path: Path) -> None:
        """Write the current parameters as safetensors."""
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in self.get_params().items()}, str(path))
