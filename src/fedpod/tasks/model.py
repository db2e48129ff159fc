"""fedpod's internal task model: what every front end compiles into."""

from __future__ import annotations

from typing import Literal

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
