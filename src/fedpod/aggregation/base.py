"""The aggregator interface, the reply type it consumes, and the name registry."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from fedpod.aggregation.threads import in_parallel
from fedpod.errors import ConfigError

Array = npt.NDArray[np.floating[Any]]
Params = dict[str, Array]

_REGISTRY: dict[str, type[Aggregator]] = {}
A = TypeVar("A", bound="type[Aggregator]")


@dataclass(frozen=True)
class Reply:
    """One pod's answer to a training round: its locally updated parameters, how many samples
    they were trained on, and anything an aggregator asked for (`extra`, e.g. Scaffold's
    control-variate deltas)."""

    pod: str
    params: Params
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, Params] = field(default_factory=dict)


def register(name: str) -> Callable[[A], A]:
    def decorate(cls: A) -> A:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_aggregators() -> list[str]:
    return sorted(_REGISTRY)


def aggregator_from_config(config: Mapping[str, Any]) -> Aggregator:
    """Build an aggregator from `{"name": ..., **arguments}`; unknown names list the known ones."""
    arguments = dict(config)
    name = str(arguments.pop("name", "")).lower()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown aggregator {name!r}", hint=f"choose one of {', '.join(registered_aggregators())}")
    accepted = [p for p in inspect.signature(_REGISTRY[name]).parameters if p != "self"]
    for key in arguments:
        if key not in accepted:
            near = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            raise ConfigError(f"unknown argument `{key}` for aggregator {name!r}",
                              hint=f"did you mean `{near[0]}`?" if near else
                              f"it takes: {', '.join(accepted) or 'no arguments'}")
    try:
        return _REGISTRY[name](**arguments)
    except TypeError as exc:
        raise ConfigError(f"invalid arguments for aggregator {name!r}: {exc}") from exc


class Aggregator:
    """Base class. Subclasses override `aggregate` (and `configure_round` when pods need more
    than the global parameters), calling `super()` for what they do not change."""

    name: ClassVar[str] = ""
    # True where the aggregator must see each pod's update (a median, Scaffold's extras), which
    # secure aggregation hides: such an aggregator cannot run under it.
    sees_each_update: ClassVar[bool] = False

    def configure_round(self, round_number: int, global_params: Params) -> dict[str, Any]:
        """Extra training instructions for this round (sent to every pod)."""
        return {}

    def aggregate(self, round_number: int, global_params: Params, replies: Sequence[Reply]) -> Params:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}

    def state(self) -> dict[str, Params]:
        """Server-side state to keep in breakpoints (moments, control variates)."""
        return {}

    def load_state(self, state: Mapping[str, Params]) -> None:
        """Restore what `state` returned."""


def size_of(params: Params) -> int:
    """Elements in all of a model's tensors."""
    return sum(int(np.size(value)) for value in params.values())


def all_finite(values: Array) -> bool:
    """Whether no value is NaN or infinite, from their float64 sum where that can tell: a NaN or
    an infinity makes the sum one too, and finite float32 values cannot overflow a float64 sum,
    so a finite sum proves them finite without a full-size boolean temporary (5 ms against 24 ms
    on 10M parameters, for each pod's update every round). A sum that is not finite, or complex
    values, are checked value by value."""
    if not np.issubdtype(values.dtype, np.inexact):
        return True
    if np.issubdtype(values.dtype, np.floating):
        with np.errstate(over="ignore", invalid="ignore"):  # a hostile update's inf - inf says nothing
            if np.isfinite(np.sum(values, dtype=np.float64)):
                return True
    return bool(np.all(np.isfinite(values)))


def check_replies(replies: Sequence[Reply], reference: Params) -> None:
    """Every reply must carry exactly the global parameters' names and shapes, finite values
    and a positive sample count — a malformed or NaN update never reaches the average."""
    if not replies:
        raise ValueError("no replies to aggregate")
    for reply in replies:
        if reply.num_samples <= 0:
            raise ValueError(f"pod {reply.pod} reported {reply.num_samples} samples")
        if set(reply.params) != set(reference):
            raise ValueError(f"pod {reply.pod} sent parameters {sorted(reply.params)}, expected {sorted(reference)}")
        for key, value in reply.params.items():
            if value.shape != reference[key].shape:
                raise ValueError(f"pod {reply.pod}: {key} has shape {value.shape}, expected {reference[key].shape}")

    def first_not_finite(reply: Reply) -> str | None:
        return next((key for key, value in reply.params.items() if not all_finite(value)), None)

    for reply, bad in zip(replies, in_parallel(first_not_finite, replies, size_of(reference)), strict=True):
        if bad is not None:
            raise ValueError(f"pod {reply.pod}: {bad} contains NaN or infinite values")


def sample_weights(replies: Sequence[Reply]) -> Array:
    """Weights proportional to each pod's sample count; they sum to one."""
    counts = np.array([r.num_samples for r in replies], dtype=np.float64)
    result: Array = counts / counts.sum()
    return result
