"""Byzantine-robust aggregation (Yin et al., ICML 2018): coordinate-wise median and
coordinate-wise trimmed mean. Both ignore sample counts on purpose: a pod that lies about its
sample count must not buy more influence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedpod.aggregation.base import Aggregator, Array, Params, Reply, check_replies, register


def coordinate_median(stack: Array) -> Array:
    """Median over the first axis (one row per pod)."""
    result: Array = np.median(stack, axis=0)
    return result


def trimmed_mean(stack: Array, beta: float) -> Array:
    """Drop the ⌊beta·n⌋ largest and smallest values of each coordinate, average the rest."""
    n = stack.shape[0]
    cut = math.floor(beta * n)
    if 2 * cut >= n:
        raise ValueError(f"trimming {cut} from each side of {n} replies leaves nothing")
    ordered = np.sort(stack, axis=0)
    result: Array = ordered[cut : n - cut].mean(axis=0)
    return result


def _stacked(replies: Sequence[Reply], key: str) -> Array:
    return np.stack([r.params[key].astype(np.float64) for r in replies])


@register("median")
class CoordinateMedian(Aggregator):
    sees_each_update = True

    def aggregate(self, round_number: int, global_params: Params, replies: Sequence[Reply]) -> Params:
        check_replies(replies, global_params)
        return {k: coordinate_median(_stacked(replies, k)).astype(v.dtype) for k, v in global_params.items()}


@register("trimmed_mean")
class TrimmedMean(Aggregator):
    """Refuses to run as a plain mean: when ⌊beta·n⌋ is 0 for the round's n replies (beta 0.1 with
    fewer than 10 pods), nothing would be trimmed, and a user who asked for robustness would
    silently get none."""

    sees_each_update = True

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 < beta < 0.5:
            raise ValueError("TrimmedMean needs 0 < beta < 0.5 (beta 0 is a plain mean: use fedavg)")
        self.beta = beta

    def aggregate(self, round_number: int, global_params: Params, replies: Sequence[Reply]) -> Params:
        check_replies(replies, global_params)
        if math.floor(self.beta * len(replies)) == 0:
            raise ValueError(f"trimmed_mean with beta={self.beta} trims nothing from {len(replies)} replies "
                             f"(floor({self.beta} x {len(replies)}) = 0), so it would be a plain mean: use beta >= "
                             f"{1 / len(replies):.3g}, or the median")
        return {k: trimmed_mean(_stacked(replies, k), self.beta).astype(v.dtype) for k, v in global_params.items()}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta": self.beta}
