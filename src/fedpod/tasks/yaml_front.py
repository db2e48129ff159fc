"""Bitfount-style task files (`fedpod run task.yaml`).

Names may carry Bitfount's `bitfount.` prefix (`bitfount.ResultsOnly`, `bitfount.SqlQuery`)
so that files written for Bitfount run unchanged. Anything fedpod does not support is an
error that lists what is supported, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fedpod.aggregation.base import aggregator_from_config
from fedpod.errors import ConfigError, invalid_fields, yaml_syntax
from fedpod.tasks.model import SqlTask, Targets, TrainingTask
from fedpod.tasks.strict import MODEL_ARGUMENTS, check_keys

SECAGG_SETTINGS = ("num_shares", "reconstruction_threshold", "clipping_range", "quantization_range")

PROTOCOLS = {"ResultsOnly", "FederatedAveraging"}
ALGORITHMS = {"SqlQuery", "FederatedModelTraining"}


def canonical(name: str) -> str:
    return name.removeprefix("bitfount.")


class Named(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: dict[str, Any] = {}


class TaskSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    protocol: Named
    algorithm: Named | list[Named]
    aggregator: dict[str, Any] | None = None
    data_structure: dict[str, Any] | None = None


class TaskFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pods: Targets
    task: TaskSection
    modeller: dict[str, Any] | None = None


def load_task(path: Path) -> SqlTask | TrainingTask:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read task file: {exc}", where=str(path)) from exc
    except yaml.YAMLError as exc:
        raise yaml_syntax(exc, str(path)) from exc
    check_keys(raw, str(path))
    try:
        spec = TaskFile.model_validate(raw)
    except ValidationError as exc:
        raise invalid_fields(exc, "task file", str(path)) from exc
    try:
        return compile_task(spec, where=str(path), base=path.parent)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        # Sections still typed as free-form mappings (data_structure, hyperparameters, model) can
        # hold a value of the wrong kind; found by fuzzing. Say so instead of crashing.
        raise ConfigError(f"invalid task file: a value has the wrong type ({type(exc).__name__}: {exc})",
                          where=str(path), hint="compare with examples/*.yaml") from exc


def compile_task(spec: TaskFile, *, where: str, base: Path = Path()) -> SqlTask | TrainingTask:
    protocol = canonical(spec.task.protocol.name)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {spec.task.protocol.name!r} is not supported for this task",
                          where=where, hint=f"supported: {', '.join(sorted(PROTOCOLS))}")
    if protocol == "FederatedAveraging":
        return compile_training(spec, where=where, base=base)
    training_only = sorted({"steps_between_parameter_updates", "epochs_between_parameter_updates"}
                           & set(spec.task.protocol.arguments))
    if training_only:
        raise ConfigError(f"{', '.join(training_only)} belong(s) to FederatedAveraging, not {protocol}", where=where,
                          hint="remove it, or use protocol bitfount.FederatedAveraging to train")
    save = spec.task.protocol.arguments.get("save_location", ["Modeller"])
    if [s for s in save if s != "Modeller"]:
        raise ConfigError(f"save_location {save} is not supported: results are saved at the modeller only",
                          where=where)
    algorithms = spec.task.algorithm if isinstance(spec.task.algorithm, list) else [spec.task.algorithm]
    if len(algorithms) != 1 or canonical(algorithms[0].name) != "SqlQuery":
        raise ConfigError(f"algorithm {[a.name for a in algorithms]} is not supported with {protocol}",
                          where=where, hint=f"supported: {', '.join(sorted(ALGORITHMS))}")
    query = algorithms[0].arguments.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("SqlQuery needs arguments.query", where=where)
    aggregator = dict(spec.task.aggregator or {}) if spec.task.aggregator is not None else None
    secure = bool(aggregator.pop("secure", False)) if aggregator is not None else False
    secagg = {key: aggregator.pop(key) for key in SECAGG_SETTINGS if key in aggregator} if aggregator else {}
    if secagg and not secure:
        raise ConfigError(f"{', '.join(secagg)} set without `secure: true`", where=f"{where}: task.aggregator",
                          hint="add `secure: true`, or remove the secure aggregation settings")
    table = ((spec.task.data_structure or {}).get("table_config") or {}).get("table")
    return SqlTask(targets=spec.pods, query=query, aggregate=aggregator is not None, table=table,
                   secagg=secagg if secure else None)


def _model_reference(algorithm: Named, where: str, base: Path) -> tuple[str, str | None]:
    """`model: {name: logistic_regression}` or Bitfount's `model: {bitfount_model: {model_ref: ...}}`.
    A `model_ref` is a built-in name, or `path/to/plan.py:ClassName` (relative to the task
    file) for a custom plan, which each pod runs only once its custodian approved it."""
    model = (algorithm.model_extra or {}).get("model") or {}
    reference = model.get("name") or (model.get("bitfount_model") or {}).get("model_ref")
    if not isinstance(reference, str) or not reference:
        raise ConfigError("FederatedModelTraining needs `model: {name: <built-in>}` or "
                          "`model: {bitfount_model: {model_ref: <built-in or file.py:Class>}}`", where=where)
    if ":" in reference:
        file, _, class_name = reference.rpartition(":")
        path = Path(file) if Path(file).is_absolute() else base / file
        return class_name, str(path)
    return reference, None


def compile_training(spec: TaskFile, *, where: str, base: Path) -> TrainingTask:
    arguments = spec.task.protocol.arguments
    algorithms = spec.task.algorithm if isinstance(spec.task.algorithm, list) else [spec.task.algorithm]
    if len(algorithms) != 1 or canonical(algorithms[0].name) != "FederatedModelTraining":
        raise ConfigError(f"FederatedAveraging needs one FederatedModelTraining algorithm, got "
                          f"{[a.name for a in algorithms]}", where=where)
    algorithm = algorithms[0]
    hyper = dict((algorithm.model_extra or {}).get("hyperparameters") or {})
    step_keys = sorted(({"steps"} & set(hyper)) | ({"steps_between_parameter_updates"} & set(arguments)))
    epoch_keys = sorted(({"epochs"} & set(hyper)) | ({"epochs_between_parameter_updates"} & set(arguments)))
    if step_keys and epoch_keys:
        raise ConfigError(f"mixing steps ({step_keys}) and epochs ({epoch_keys}) is not allowed: "
                          "training is measured in one or the other", where=where)
    if step_keys:
        total, between = int(hyper.get("steps", 0)), int(arguments.get("steps_between_parameter_updates", 0))
        if total <= 0 or between <= 0 or total % between:
            raise ConfigError("`steps` must be a positive multiple of `steps_between_parameter_updates`", where=where)
        training_args: dict[str, Any] = {"num_updates": between}
    else:
        total, between = int(hyper.get("epochs", 1)), int(arguments.get("epochs_between_parameter_updates", 1))
        if total <= 0 or between <= 0 or total % between:
            raise ConfigError("`epochs` must be a positive multiple of `epochs_between_parameter_updates`", where=where)
        training_args = {"epochs": between}
    training_args["loader_args"] = {"batch_size": int(hyper.get("batch_size", 32))}
    training_args["optimizer_args"] = {"lr": float(hyper.get("learning_rate", 1e-3))}
    if "random_seed" in hyper:
        training_args["random_seed"] = int(hyper["random_seed"])
    aggregator = dict(spec.task.aggregator or {})
    secure = aggregator.pop("secure", False)
    secagg = {key: aggregator.pop(key) for key in SECAGG_SETTINGS if key in aggregator}
    if secagg and not secure:
        raise ConfigError(f"{', '.join(secagg)} set without `secure: true`", where=f"{where}: task.aggregator",
                          hint="add `secure: true`, or remove the secure aggregation settings")
    try:
        aggregator_from_config({"name": "fedavg", **aggregator})  # its arguments are checked now, not at round 1
    except ConfigError as exc:
        raise ConfigError(exc.message, where=f"{where}: task.aggregator", hint=exc.hint) from exc
    structure = spec.task.data_structure or {}
    target = (structure.get("assign") or {}).get("target")
    if not target:
        raise ConfigError("data_structure.assign.target names the column to predict", where=where)
    select = structure.get("select") or {}
    model_args: dict[str, Any] = {"target": target}
    if select.get("include"):
        model_args["features"] = list(select["include"])
    if select.get("exclude"):
        model_args["exclude"] = list(select["exclude"])
    model = (algorithm.model_extra or {}).get("model") or {}
    model_args |= {key: model[key] for key in MODEL_ARGUMENTS if key in model}
    plan, plan_path = _model_reference(algorithm, where, base)
    return TrainingTask(targets=spec.pods, plan=plan, plan_path=plan_path, model_args=model_args,
                        training_args=training_args, rounds=total // between,
                        aggregator={"name": "fedavg", **aggregator}, secagg=secagg if secure else None,
                        schema_requirements=structure.get("schema_requirements", "partial"))
