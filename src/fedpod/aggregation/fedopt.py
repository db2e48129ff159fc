"""Adaptive server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The pseudo-gradient of a round is Δ = FedAvg(replies) - x. With first moment
m ← β1·m + (1-β1)·Δ, the second moment v differs per method:

    FedAdagrad:  v ← v + Δ²
    FedAdam:     v ← β2·v + (1-β2)·Δ²
    FedYogi:     v ← v - (1-β2)·Δ²·sign(v - Δ²)

and x ← x + η·m / (√v + τ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedpod.aggregation.base import Aggregator, Array, Params, Reply, check_replies, register, sample_weights
from fedpod.aggregation.fedavg import weighted_average


def adagrad_second_moment(v: Array, delta: Array, beta2: float) -> Array:
    result: Array = v + delta**2
    return result


def adam_second_moment(v: Array, delta: Array, beta2: float) -> Array:
    result: Array = beta2 * v + (1 - beta2) * delta**2
    return result


def yogi_second_moment(v: Array, delta: Array, beta2: float) -> Array:
    squared = delta**2
    result: Array = v - (1 - beta2) * squared * np.sign(v - squared)
    return result


class _FedOpt(Aggregator):
    second_moment = staticmethod(adam_second_moment)

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if lr <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or tau <= 0:
            raise ValueError("need lr > 0, 0 <= beta1 < 1, 0 <= beta2 < 1, tau > 0")
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: Params = {}
        self.v: Params = {}

    def aggregate(self, round_number: int, global_params: Params, replies: Sequence[Reply]) -> Params:
        check_replies(replies, global_params)
        average = weighted_average([r.params for r in replies], sample_weights(replies).tolist())
        updated: Params = {}
        for key, x in global_params.items():
            delta = average[key].astype(np.float64) - x
            m = self.beta1 * self.m.get(key, np.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self.second_moment(self.v.get(key, np.full_like(delta, self.tau**2)), delta, self.beta2)
            self.m[key], self.v[key] = m, v
            updated[key] = (x + self.lr * m / (np.sqrt(v) + self.tau)).astype(x.dtype, copy=False)
        return updated

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def state(self) -> dict[str, Params]:
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state(self, state: Mapping[str, Params]) -> None:
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))


@register("fedadam")
class FedAdam(_FedOpt):
    second_moment = staticmethod(adam_second_moment)


@register("fedyogi")
class FedYogi(_FedOpt):
    second_moment = staticmethod(yogi_second_moment)


@register("fedadagrad")
class FedAdagrad(_FedOpt):
    second_moment = staticmethod(adagrad_second_moment)
