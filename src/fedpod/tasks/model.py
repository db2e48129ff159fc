"""fedpod's internal task model: what every front end compiles into."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator


class Targets(BaseModel):
    """Which datasets a task runs on: explicit `owner/name` identifiers, or tags (all must match)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    identifiers: list[str] = []
    tags: list[str] = []

    @model_validator(mode="after")
    def _exactly_one_way(self) -> Targets:
        if bool(self.identifiers) == bool(self.tags):
            raise ValueError("pods: give either `identifiers` or `tags`")
        return self


class SqlTask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["sql"] = "sql"
    targets: Targets
    query: str
    aggregate: bool = False
    table: str | None = None
    secagg: dict[str, Any] | None = None  # `aggregator: {secure: true, ...}`: summed under secure aggregation


class TrainingTask(BaseModel):
    """Federated training compiled from a task file: which plan, on which datasets, for how
    many rounds, with which training arguments and aggregator."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["train"] = "train"
    targets: Targets
    plan: str
    plan_path: str | None = None
    model_args: dict[str, Any] = {}
    training_args: dict[str, Any] = {}
    rounds: int
    aggregator: dict[str, Any] = {"name": "fedavg"}
    secagg: dict[str, Any] | None = None  # `aggregator: {secure: true, num_shares: ...}`: the SecAgg+ settings
    schema_requirements: Literal["full", "partial", "empty"] = "partial"
    standardize: bool = True
