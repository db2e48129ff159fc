"""`training_args`, with Fed-BioMed's names and meanings, validated before anything is sent.

`num_updates` (optimizer steps, the same on every pod) wins over `epochs`; with `epochs`,
`batch_maxnum` caps the batches per epoch. `random_seed` is applied at the start of every
round on pods and modeller. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedpod.algorithms.training.metrics import METRICS
from fedpod.errors import ConfigError, invalid_fields


class LoaderArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(default=32, ge=1)
    shuffle: bool = True
    drop_last: bool = False


class DPArgs(BaseModel):
    """Differential privacy for training (`fedpod.algorithms.training.privacy`): `sigma` is the
    noise multiplier (noise std over `clip`), `clip` the L2 bound of an example's gradient (local)
    or of a pod's update (central), `delta` the probability the epsilon reported may not hold."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["local", "central"] = "local"
    sigma: float = Field(gt=0, le=1e4)
    clip: float = Field(gt=0, le=1e6)
    delta: float = Field(default=1e-5, gt=0, lt=1)


class TrainingArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    loader_args: LoaderArgs = LoaderArgs()
    num_updates: int | None = Field(default=None, ge=1)
    epochs: int | None = Field(default=None, ge=1)
    batch_maxnum: int | None = Field(default=None, ge=1)
    optimizer_args: dict[str, Any] = {}
    random_seed: int | None = Field(default=None, ge=0, lt=2**64)  # what numpy's and torch's generators take
    dry_run: bool = False
    test_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    test_metric: str | None = None
    test_metric_args: dict[str, Any] = {}
    test_on_local_updates: bool = False
    test_on_global_updates: bool = False
    test_batch_size: int | None = Field(default=None, ge=1)
    dp_args: DPArgs | None = None

    @field_validator("test_metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in METRICS:
            raise ValueError(f"unknown test_metric {value!r}; choose one of {', '.join(sorted(METRICS))}")
        return value.lower() if value else value

    @classmethod
    def parse(cls, raw: dict[str, Any] | TrainingArgs | None) -> TrainingArgs:
        if isinstance(raw, TrainingArgs):
            return raw
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"unknown training_args {unknown}", hint=f"valid keys: {', '.join(cls.model_fields)}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise invalid_fields(exc, "training_args", "training_args") from exc

    @property
    def uses_updates(self) -> bool:
        return self.num_updates is not None

    def local_budget(self) -> tuple[int | None, int, int | None]:
        """(num_updates, epochs, batch_maxnum): `num_updates` wins; otherwise epochs (default 1)."""
        if self.num_updates is not None:
            return self.num_updates, 0, None
        return None, self.epochs or 1, self.batch_maxnum
