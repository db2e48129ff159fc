"""The pod's one YAML file: identity, broker, storage, datasets and the custodian's policies.

Relative paths in it (identity key, storage, dataset files) are relative to the file itself,
so a pod folder can be moved as a whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedpod.data.datasets import DatasetSpec
from fedpod.errors import ConfigError, invalid_fields, yaml_syntax
from fedpod.governance.policy import Policy, migrate_access
from fedpod.names import NAME_PATTERN
from fedpod.transport.bus import BrokerOptions


class BrokerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = "nats://127.0.0.1:4222"
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    creds: str | None = None

    def options(self, base: Path) -> BrokerOptions:
        def resolve(value: str | None) -> Path | None:
            return None if value is None else (base / value if not Path(value).is_absolute() else Path(value))

        return BrokerOptions(self.url, resolve(self.tls_ca), resolve(self.tls_cert), resolve(self.tls_key),
                             resolve(self.creds))


class PodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    identity: str
    broker: BrokerSettings = BrokerSettings()
    storage: str = "storage"
    datasets: list[DatasetSpec] = []
    policies: Policy = Policy()
    heartbeat_s: float = Field(default=2.0, gt=0)
    sql_timeout_s: float = Field(default=60.0, gt=0)
    max_concurrent_tasks: int = Field(default=4, ge=1)
    audit_checkpoint_s: float = Field(default=60.0, gt=0)
    discovery: Literal["accepted", "names", "open"] = "accepted"
    max_result_rows: int = Field(default=100_000, ge=1)
    max_result_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # what a task may make the pod allocate (`fedpod.pod.memory_cap`): "auto" (half this machine's
    # memory), "none", or a size such as "8GB"
    max_memory: Literal["auto", "none"] | ByteSize = "auto"

    @field_validator("max_memory")
    @classmethod
    def _room_to_run(cls, value: str | ByteSize) -> str | ByteSize:
        if isinstance(value, ByteSize) and value < 512 * 2**20:
            raise ValueError(f"{value.human_readable(decimal=True)} is below 512 MiB, too little for a pod")
        return value

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, raw: Any) -> Any:
        return migrate_access(dict(raw)) if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _policies_name_served_datasets(self) -> PodConfig:
        self.policies.check_datasets({d.name for d in self.datasets})
        return self

    @classmethod
    def load(cls, path: Path) -> PodConfig:
        if not path.exists():
            raise ConfigError(f"no pod config at {path}", hint="create one with `fedpod pod init`")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise yaml_syntax(exc, str(path)) from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise invalid_fields(exc, "pod config", str(path)) from exc

    def save(self, path: Path) -> None:
        """Written whole and renamed into place: a running pod re-reads this file when it
        changes, and must never see half of it."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(partial, path)

    def dataset(self, name: str) -> DatasetSpec | None:
        return next((d for d in self.datasets if d.name == name), None)


def edit_policies(path: Path, change: Callable[[Policy], Policy]) -> tuple[Policy, Policy]:
    """Apply `change` to the policies of the config at `path`; returns (old, new). An invalid
    result is refused naming the field, and the file is left as it was — a running pod keeps
    its policy. The pod itself audits the change (with old and new values) when it applies it."""
    config = PodConfig.load(path)
    try:
        new = change(config.policies)
        updated = PodConfig.model_validate({**config.model_dump(mode="json"), "policies": new.model_dump(mode="json")})
    except ValidationError as exc:
        raise invalid_fields(exc, "policy", str(path)) from exc
    updated.save(path)
    return config.policies, updated.policies

