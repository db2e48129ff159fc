"""Running a training task file (`fedpod run` with protocol FederatedAveraging).

Before any training: the datasets' schemas are checked against `schema_requirements`
(`full`: the same columns with the same types everywhere; `partial`: the same column names;
`empty`: no check), and for built-in tabular models the features are standardised with global
means and standard deviations computed exactly by federated SQL.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fedpod.aggregation import aggregator_from_config
from fedpod.algorithms.training.registry import BUILTIN_PLANS
from fedpod.errors import ConfigError
from fedpod.modeller.client import Modeller
from fedpod.modeller.discovery import Target
from fedpod.modeller.experiment import Experiment
from fedpod.modeller.standardise import global_standardisation, numeric_features
from fedpod.tasks.model import TrainingTask


def check_schemas(targets: list[Target], requirement: str, target_column: str) -> None:
    for t in targets:
        if target_column not in t.dataset.columns:
            raise ConfigError(f"target column {target_column!r} is not in {t.identifier}",
                              hint=f"its columns: {', '.join(t.dataset.columns)}")
    if requirement == "empty" or len(targets) < 2:
        return
    reference = targets[0].dataset.columns
    for t in targets[1:]:
        columns = t.dataset.columns
        if requirement == "full" and columns != reference:
            raise ConfigError(f"schema_requirements 'full': {t.identifier} differs from {targets[0].identifier}",
                              hint=f"{sorted(columns.items())} vs {sorted(reference.items())}")
        if requirement == "partial" and set(columns) != set(reference):
            raise ConfigError(f"schema_requirements 'partial': {t.identifier} has columns "
                              f"{sorted(set(columns) ^ set(reference))} that {targets[0].identifier} lacks or adds")


def check_journeys(targets: list[Target]) -> None:
    for t in targets:
        if t.dataset.kind != "events":
            raise ConfigError(f"{t.identifier} is a {t.dataset.kind} dataset; journey models read events datasets",
                              hint="`fedpod dataset add --type events ...` at the pod, or choose a tabular model")


def run_training_task(task: TrainingTask, modeller: Modeller, out: Path, console: Console,
                      min_datasets: int | None = None) -> Experiment:
    targets = modeller.resolve(task.targets.identifiers or None, task.targets.tags or None,
                               min_datasets=min_datasets)
    builtin = BUILTIN_PLANS.get(task.plan) if task.plan_path is None else None
    if builtin is not None and getattr(builtin, "needs_vocabulary", False):
        check_journeys(targets)  # the target is an expression over each pod's static table
    else:
        check_schemas(targets, task.schema_requirements, task.model_args["target"])
    model_args = dict(task.model_args)
    if builtin is not None and getattr(builtin, "standardisable", False) and task.standardize:
        # here, not in the Experiment: a task file may leave `features` to the datasets' numeric
        # columns, and the plan's shape depends on them
        model_args |= global_standardisation(modeller, targets, numeric_features(targets[0], model_args))
    experiment = Experiment(datasets=[t.identifier for t in targets], training_plan_class=task.plan,
                            training_plan_path=task.plan_path, model_args=model_args,
                            training_args=task.training_args, round_limit=task.rounds,
                            aggregator=aggregator_from_config(task.aggregator), modeller=modeller,
                            min_pods=min_datasets, standardize=task.standardize,
                            secagg=task.secagg if task.secagg is not None else False,
                            experiments_root=out, console=console)
    experiment.run()
    return experiment
