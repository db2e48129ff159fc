"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift.

Each round the server sends its control variate c. A pod trains with the corrected gradient
g - c_i + c for exactly K local steps (so `num_updates` is required), then returns its
parameters y_i and the change of its own control variate Δc_i = c_i⁺ - c_i, where
c_i⁺ = c_i - c + (x - y_i) / (K·η_local). The server updates

    x ← x + η_g · Σ w_i (y_i - x)        (w_i: sample weights)
    c ← c + (|S| / N) · mean(Δc_i)       (S: pods that replied, N: all pods)

With η_g = 1 the parameter update is exactly FedAvg's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedpod.aggregation.base import Aggregator, Params, Reply, check_replies, register, sample_weights
from fedpod.aggregation.fedavg import weighted_average

CONTROL_DELTA = "control_delta"


def scaffold_step(global_params: Params, replies: Sequence[Reply], server_lr: float) -> Params:
    average = weighted_average([r.params for r in replies], sample_weights(replies).tolist())
    return {k: (x + server_lr * (average[k].astype(np.float64) - x)).astype(x.dtype) for k, x in global_params.items()}


def control_step(control: Params, deltas: Sequence[Params], participation: float) -> Params:
    return {k: c + participation * np.mean([d[k] for d in deltas], axis=0) for k, c in control.items()}


@register("scaffold")
class Scaffold(Aggregator):
    requires_num_updates = True
    sees_each_update = True

    def __init__(self, server_lr: float = 1.0, total_pods: int | None = None) -> None:
        if server_lr <= 0:
            raise ValueError("Scaffold needs server_lr > 0")
        self.server_lr = server_lr
        self.total_pods = total_pods
        self.control: Params = {}

    def configure_round(self, round_number: int, global_params: Params) -> dict[str, Any]:
        if not self.control:
            self.control = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_params.items()}
        return {**super().configure_round(round_number, global_params), "scaffold_control": self.control}

    def aggregate(self, round_number: int, global_params: Params, replies: Sequence[Reply]) -> Params:
        check_replies(replies, global_params)
        if not self.control:
            self.control = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_params.items()}
        deltas = [r.extra.get(CONTROL_DELTA) for r in replies]
        if any(d is None for d in deltas):
            missing = [r.pod for r, d in zip(replies, deltas, strict=True) if d is None]
            raise ValueError(f"Scaffold replies from {missing} carry no control-variate delta")
        participation = len(replies) / (self.total_pods or len(replies))
        self.control = control_step(self.control, [d for d in deltas if d is not None], participation)
        return scaffold_step(global_params, replies, self.server_lr)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "server_lr": self.server_lr, "total_pods": self.total_pods}

    def state(self) -> dict[str, Params]:
        return {"control": dict(self.control)}

    def load_state(self, state: Mapping[str, Params]) -> None:
        self.control = dict(state.get("control", {}))
