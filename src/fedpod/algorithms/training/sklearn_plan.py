"""scikit-learn training plans (SGDClassifier, SGDRegressor, Perceptron) trained by `partial_fit`,
one call per batch, with `n_features` / `n_classes` model arguments as in Fed-BioMed."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from sklearn.linear_model import Perceptron, SGDClassifier, SGDRegressor

from fedpod.aggregation.base import Params
from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.plans import LocalResult, TrainingPlan
from fedpod.algorithms.training.privacy import PrivacyRound
from fedpod.errors import ConfigError

_FRAMEWORK_ARGS = {"n_features", "n_classes", "target", "features", "exclude", "feature_means", "feature_stds"}


class SKLearnTrainingPlan(TrainingPlan):
    model_class: ClassVar[type[Any]] = SGDClassifier

    def __init__(self) -> None:
        super().__init__()
        self._model: Any = None
        self.classes: np.ndarray | None = None

    @property
    def is_classifier(self) -> bool:
        return self.model_class is not SGDRegressor

    def init_model(self, model_args: dict[str, Any]) -> Any:
        arguments = {k: v for k, v in model_args.items() if k not in _FRAMEWORK_ARGS}
        return self.model_class(**arguments)

    def post_init(self, model_args: dict[str, Any], training_args: TrainingArgs) -> None:
        self.model_args = dict(model_args)
        self.training_args = training_args
        n_features = int(model_args.get("n_features") or len(model_args.get("features") or []))
        if n_features <= 0:
            raise ConfigError("scikit-learn plans need model_args['n_features'] (or the list of `features`)")
        self._model = self.init_model(self.model_args)
        # Everything a fitted estimator has, as Fed-BioMed sets it: the modeller's copy never sees
        # data, yet `training_plan().model().predict(X)` must work on the global parameters.
        self._model.n_features_in_ = n_features
        if self.is_classifier:
            n_classes = int(model_args.get("n_classes", 2))
            self.classes = np.arange(n_classes)
            self._model.classes_ = self.classes
            rows = 1 if n_classes == 2 else n_classes
            self._model.coef_ = np.zeros((rows, n_features))
            self._model.intercept_ = np.zeros(rows)
        else:
            self._model.coef_ = np.zeros(n_features)
            self._model.intercept_ = np.zeros(1)

    def model(self) -> Any:
        if self._model is None:
            raise ConfigError("the plan's model is not initialised yet (post_init was not called)")
        return self._model

    def get_params(self) -> Params:
        return {"coef_": np.array(self.model().coef_, dtype=np.float64),
                "intercept_": np.array(self.model().intercept_, dtype=np.float64)}

    def set_params(self, params: Params) -> None:
        self.model().coef_ = np.array(params["coef_"], dtype=np.float64)
        self.model().intercept_ = np.array(params["intercept_"], dtype=np.float64)

    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        model = self.model()
        if not self.is_classifier:
            return np.asarray(features @ np.ravel(model.coef_) + model.intercept_[0])
        scores = features @ np.atleast_2d(model.coef_).T + model.intercept_
        if scores.shape[1] == 1:
            return np.asarray(1 / (1 + np.exp(-scores[:, 0])))
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))  # softmax: one-vs-rest AUC needs probabilities
        return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))

    def train_round(self, features: np.ndarray, target: np.ndarray, args: TrainingArgs,
                    round_config: dict[str, Any], device: str, state: dict[str, Params],
                    privacy: PrivacyRound | None = None) -> LocalResult:
        if privacy is not None:
            raise ConfigError("local DP (DP-SGD, through Opacus) needs a PyTorch plan",
                              hint="use dp_args.type: central with scikit-learn plans")
        if round_config.get("scaffold_control") is not None or round_config.get("fedprox_mu"):
            raise ConfigError("Scaffold and FedProx need a PyTorch plan",
                              hint="scikit-learn plans use FedAvg-style aggregators")
        model = self.model()
        features = features.astype(np.float64, copy=False)  # the parameters are float64
        rng = np.random.default_rng(args.random_seed)
        batch = args.loader_args.batch_size
        updates, epochs, batch_maxnum = args.local_budget()

        def epoch_batches() -> list[np.ndarray]:
            order = rng.permutation(len(features)) if args.loader_args.shuffle else np.arange(len(features))
            return [order[i : i + batch] for i in range(0, len(order), batch)]

        plan: Iterator[np.ndarray]
        if updates is not None:
            plan = itertools.islice(itertools.chain.from_iterable(epoch_batches() for _ in itertools.count()), updates)
        else:
            plan = itertools.chain.from_iterable(itertools.islice(epoch_batches(), batch_maxnum) for _ in range(epochs))
        started = time.perf_counter()
        steps, losses = 0, []
        for indices in plan:
            x, y = features[indices], target[indices]
            if self.is_classifier:
                model.partial_fit(x, y, classes=self.classes)
                losses.append(_log_loss(self.predict_scores(x), y))
            else:
                model.partial_fit(x, y)
                losses.append(float(np.mean((self.predict_scores(x) - y) ** 2)))
            steps += 1
            if args.dry_run:
                break
        return LocalResult(self.get_params(), len(features),
                           {"loss": float(np.mean(losses)), "steps": float(steps),
                            "train_seconds": time.perf_counter() - started}, {})


def _log_loss(scores: np.ndarray, target: np.ndarray) -> float:
    """Cross-entropy of a batch: scores are probabilities (binary) or decision values (one per class)."""
    if scores.ndim == 2:
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        picked = probabilities[np.arange(len(target)), target.astype(int)]
        return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
    p = np.clip(scores, 1e-12, 1 - 1e-12)
    return float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p)))


class SGDClassifierPlan(SKLearnTrainingPlan):
    model_class = SGDClassifier


class SGDRegressorPlan(SKLearnTrainingPlan):
    model_class = SGDRegressor


class PerceptronPlan(SKLearnTrainingPlan):
    model_class = Perceptron
