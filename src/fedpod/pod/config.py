"""The pod's one YAML file: identity, broker, storage, datasets and access settings.

Relative paths in it (identity key, storage, dataset files) are relative to the file itself,
so a pod folder can be moved as a whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedpod.data.datasets import DatasetSpec
from fedpod.errors import ConfigError, invalid_fields, yaml_syntax
from fedpod.governance.access import AccessSettings
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
    access: AccessSettings = AccessSettings()
    heartbeat_s: float = Field(default=2.0, gt=0)
    sql_timeout_s: float = Field(default=60.0, gt=0)
    max_concurrent_tasks: int = Field(default=4, ge=1)
    audit_checkpoint_s: float = Field(default=60.0, gt=0)
    discovery: Literal["accepted", "names", "open"] = "accepted"
    max_result_rows: int = Field(default=100_000, ge=1)
    max_result_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"

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
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    def dataset(self, name: str) -> DatasetSpec | None:
        return next((d for d in self.datasets if d.name == name), None)
