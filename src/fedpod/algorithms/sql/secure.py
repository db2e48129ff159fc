"""Secure sums of aggregate SQL: COUNT, SUM and AVG where the modeller learns only the totals
over the pods, never one pod's partials (secure aggregation, `fedpod.aggregation.secure`).

Each pod encodes its partials as 64-bit integers — counts as they are, sums in fixed point with
`SCALE_BITS` fractional bits (to within 2^-21 each, so a SUM over n pods is within n * 2^-21
of the exact one; counts are exact) — and masks them; the masks cancel in the ring of 2^64. A
masked vector that was wrong unmasks to noise across the whole ring, which the decoding
refuses (a count out of [0, 2^53), a sum beyond what doubles hold), never presenting it as an
answer. GROUP BY is refused: the pods' groups differ and which ones a pod has is data; MIN,
MAX and VARIANCE do not add up and are refused too. Each pod's disclosure rules still apply
to its own rows before anything is masked (a pod whose cell is too small refuses).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from sqlglot import exp

from fedpod.algorithms.sql.federated import MergePlan, additive_partials
from fedpod.errors import SecAggError

if TYPE_CHECKING:
    import pyarrow as pa

SCALE_BITS = 20
LIMIT = 2**62  # the largest encoded magnitude a pod sends: sums over pods stay clear of the ring's wrap
Kind = Literal["count", "sum"]


def secure_partials(query: str) -> tuple[MergePlan, list[Kind]]:
    """The merge plan of `query` and the kind of each partial, if every partial adds up."""
    merge, _, aggregates = additive_partials(query, "secure aggregation")
    return merge, ["count" if isinstance(a, exp.Count) else "sum" for a in aggregates]


def encode_partials(row: dict[str, Any], kinds: list[Kind]) -> np.ndarray:
    """A pod's partials as the uint64 vector it masks; ValueError for what the ring cannot hold."""
    encoded = []
    for index, kind in enumerate(kinds):
        value = row.get(f"p{index}")
        if value is None:
            value = 0  # a SUM over no rows
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"partial {index} is {number}: not a finite number")
        scaled = int(value) if kind == "count" else round(number * 2**SCALE_BITS)
        if abs(scaled) >= LIMIT:
            # the value itself is what secure aggregation hides from the modeller: not named
            raise ValueError(f"partial {index} is beyond +-{LIMIT / 2**(0 if kind == 'count' else SCALE_BITS):g}, "
                             "too large to add securely")
        encoded.append(scaled)
    return np.array(encoded, dtype=np.int64).view(np.uint64)


def decode_sums(total: np.ndarray, kinds: list[Kind]) -> pa.Table:
    """The unmasked totals as one row of partials for the query's merge."""
    import pyarrow as pa

    signed = total.astype(np.uint64).view(np.int64)
    if len(signed) != len(kinds):
        raise SecAggError(f"the unmasked sum has {len(signed)} values for {len(kinds)} partials")
    columns: dict[str, pa.Array] = {}
    for index, (kind, value) in enumerate(zip(kinds, signed.tolist(), strict=True)):
        if kind == "count":
            if not 0 <= value < 2**53:
                raise SecAggError("an unmasked count is out of range: a masked vector or a share was wrong; the "
                                  "answer is not used")
            columns[f"p{index}"] = pa.array([value], pa.int64())
        else:
            if abs(value) >= LIMIT:
                raise SecAggError("an unmasked sum is out of range: a masked vector or a share was wrong; the "
                                  "answer is not used")
            columns[f"p{index}"] = pa.array([value / 2**SCALE_BITS], pa.float64())
    return pa.table(columns)
