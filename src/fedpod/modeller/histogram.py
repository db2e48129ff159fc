"""Federated histograms over one global range, through exact aggregate SQL.

Every pod bins its own values into the same edges (so that bins add up across pods) and its
disclosure rules apply to each bin as to any aggregate cell: a bin holding 1 to
`min_group_size - 1` of a pod's values is suppressed there, and the histogram says how many
bins were (never which values). The range defaults to the federated minimum and maximum (an
aggregate cell like any other, under the same rules); with a `value_range`, values outside it are
counted as `below` and `above`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from fedpod.data.datasets import quote_identifier
from fedpod.errors import FedpodError

if TYPE_CHECKING:
    from fedpod.modeller.client import Modeller

MAX_BINS = 38  # with `below` and `above`, within DataSHIELD's 40 groups per answer


@dataclass(frozen=True)
class Histogram:
    edges: list[float]  # bins + 1 edges; bin i holds edges[i] <= x < edges[i + 1] (the last one closed)
    counts: list[int]  # over every dataset, less what pods suppressed
    below: int
    above: int
    datasets: list[str]
    disclosure: dict[str, dict[str, int]] = field(default_factory=dict)  # per dataset: suppressed bins


def federated_histogram(modeller: Modeller, column: str, *, table: str, bins: int = 10,
                        value_range: tuple[float, float] | None = None, where: str | None = None,
                        datasets: list[str] | None = None, tags: list[str] | None = None,
                        min_datasets: int | None = None) -> Histogram:
    """`column` of `table` in `bins` equal bins over `value_range` (default: the federated minimum
    to maximum), counted at every dataset and added."""
    if not 1 <= bins <= MAX_BINS:
        raise FedpodError(f"{bins} bins: choose 1 to {MAX_BINS}")
    value, source = f"CAST({quote_identifier(column)} AS DOUBLE)", quote_identifier(table)
    condition = f"{value} IS NOT NULL AND NOT isnan({value})" + (f" AND ({where})" if where else "")
    if value_range is None:
        found = modeller.sql(f"SELECT MIN({value}) AS lo, MAX({value}) AS hi FROM {source} WHERE {condition}",
                             datasets=datasets, tags=tags, aggregate=True, min_datasets=min_datasets)
        assert isinstance(found, pd.DataFrame)  # aggregate=True: one merged frame
        value_range = (float(found["lo"].iloc[0]), float(found["hi"].iloc[0]))
    low, high = value_range
    if not low < high:
        raise FedpodError(f"the range [{low}, {high}] is empty", hint="give value_range=(low, high) with low < high")
    width = (high - low) / bins
    bin_of = (f"CASE WHEN {value} < {low!r} THEN -1 WHEN {value} > {high!r} THEN {bins} "
              f"ELSE LEAST(CAST(FLOOR(({value} - {low!r}) / {width!r}) AS INTEGER), {bins - 1}) END")
    counted = modeller.sql(f"SELECT {bin_of} AS bin, COUNT(*) AS n FROM {source} WHERE {condition} GROUP BY bin",
                           datasets=datasets, tags=tags, aggregate=True, min_datasets=min_datasets)
    assert isinstance(counted, pd.DataFrame)
    by_bin = {int(b): int(n) for b, n in zip(counted["bin"].tolist(), counted["n"].tolist(), strict=True)}
    return Histogram(edges=[low + i * width for i in range(bins)] + [high],
                     counts=[by_bin.get(i, 0) for i in range(bins)], below=by_bin.get(-1, 0),
                     above=by_bin.get(bins, 0), datasets=list(counted.attrs.get("datasets", [])),
                     disclosure=dict(counted.attrs.get("disclosure", {})))
