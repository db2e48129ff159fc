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

from fedpod.errors import ConfigError
from fedpod.tasks.model import SqlTask, Targets

PROTOCOLS = {"ResultsOnly"}
ALGORITHMS = {"SqlQuery"}


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


def load_task(path: Path) -> SqlTask:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read task file: {exc}", where=str(path)) from exc
    try:
        spec = TaskFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid task file: {exc}", where=str(path)) from exc
    return compile_task(spec, where=str(path))


def compile_task(spec: TaskFile, *, where: str) -> SqlTask:
    protocol = canonical(spec.task.protocol.name)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {spec.task.protocol.name!r} is not supported for this task",
                          where=where, hint=f"supported: {', '.join(sorted(PROTOCOLS))}")
    save = spec.task.protocol.arguments.get("save_location", ["Modeller"])
    if [s for s in save if s != "Modeller"]:
        raise ConfigError(f"save_location {save} is not supported: results are saved at the modeller only",
                          where=where)
    algorithms = spec.task.algorithm if isinstance(spec.task.algorithm, list) else [spec.task.algorithm]
    if len(algorithms) != 1 or canonical(algorithms[0].name) not in ALGORITHMS:
        raise ConfigError(f"algorithm {[a.name for a in algorithms]} is not supported with {protocol}",
                          where=where, hint=f"supported: {', '.join(sorted(ALGORITHMS))}")
    query = algorithms[0].arguments.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("SqlQuery needs arguments.query", where=where)
    aggregator = spec.task.aggregator
    if aggregator is not None and aggregator.get("secure"):
        raise ConfigError("secure aggregation of SQL results is not available yet", where=where,
                          hint="remove `aggregator.secure` or set it to false")
    table = ((spec.task.data_structure or {}).get("table_config") or {}).get("table")
    return SqlTask(targets=spec.pods, query=query, aggregate=aggregator is not None, table=table)
