"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the pods' parameters.
FedProx (Li et al., 2020) aggregates the same way; its change is the proximal term mu/2 ||w - w_global||^2
that pods add to their local loss, which this aggregator asks for in each round's instructions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedpod.aggregation.base import Aggregator, Params, Reply, check_replies, register, sample_weights


def weighted_average(param_sets: Sequence[Params], weights: Sequence[float]) -> Params:
    """Σ w_i · params_i for every tensor; weights are used as given (normalise them first).
    Accumulates in float64: under NumPy 2's promotion rules a Python float times a float32 array
    stays float32, which made the mean of identical float32 updates differ from them."""
    result: Params = {}
    for key in param_sets[0]:
        total = np.zeros_like(param_sets[0][key], dtype=np.float64)
        for params, weight in zip(param_sets, weights, strict=True):
            total += params[key] * np.float64(weight)
        result[key] = total.astype(param_sets[0][key].dtype, copy=False)
    return result


@register("fedavg")
class FedAverage(Aggregator):
    def aggregate(self, round_number: int, global_params: Params, replies: Sequence[Reply]) -> Params:
        check_replies(replies, global_params)
        return weighted_average([r.params for r in replies], sample_weights(replies).tolist())


@register("fedprox")
class FedProx(FedAverage):
    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError("FedProx needs mu >= 0")
        self.mu = mu

    def configure_round(self, round_number: int, global_params: Params) -> dict[str, Any]:
        return {**super().configure_round(round_number, global_params), "fedprox_mu": self.mu}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mu": self.mu}
