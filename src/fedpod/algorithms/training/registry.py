"""The built-in models by name, as task files and `Experiment` refer to them: tabular and
journey models alike, so that neither module has to import the other's registry."""

from __future__ import annotations

from fedpod.algorithms.training.builtin import (
    MLP,
    LogisticRegression,
    TabularPerceptron,
    TabularSGDClassifier,
    TabularSGDRegressor,
)
from fedpod.algorithms.training.journey_plans import JourneyGRU, JourneyMLP
from fedpod.algorithms.training.plans import TrainingPlan
from fedpod.errors import ConfigError

BUILTIN_PLANS: dict[str, type[TrainingPlan]] = {
    "logistic_regression": LogisticRegression,
    "mlp": MLP,
    "sgd_classifier": TabularSGDClassifier,
    "sgd_regressor": TabularSGDRegressor,
    "perceptron": TabularPerceptron,
    "journey_mlp": JourneyMLP,
    "journey_gru": JourneyGRU,
}


def builtin_plan(name: str) -> type[TrainingPlan]:
    try:
        return BUILTIN_PLANS[name.lower()]
    except KeyError:
        known = ", ".join(BUILTIN_PLANS)
        raise ConfigError(f"unknown built-in model {name!r}", hint=f"choose one of {known}") from None
