"""A federated vocabulary: the top-K codes agreed across pods before any pod builds a tensor.

Each hospital picking its own most frequent codes (as the TanaT tutorial's nodes do) makes
feature j mean a different code at each hospital, and FedAverage then averages weights that
belong to different things. Here the codes are counted once over every dataset, through
fedpod's exact aggregate SQL (so each pod's disclosure rules apply: a code seen fewer than
`min_group_size` times at a pod is not counted there), and the same ordered list goes to every
pod. Where a pod records some codes locally, its custodian maps them to the shared ones
(`code_map` of an events dataset), applied before anything is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from fedpod.data.datasets import quote_identifier
from fedpod.errors import FedpodError

if TYPE_CHECKING:
    from fedpod.modeller.client import Modeller


@dataclass(frozen=True)
class Vocabulary:
    """Codes in feature order (most frequent first, ties by code), with their federated counts."""

    codes: list[str]
    counts: list[int]
    datasets: list[str]
    disclosure: dict[str, dict[str, int]] = field(default_factory=dict)


def federated_vocabulary(modeller: Modeller, k: int, *, table: str, datasets: list[str] | None = None,
                         tags: list[str] | None = None, code_column: str = "code",
                         min_datasets: int | None = None) -> Vocabulary:
    """The `k` most frequent codes of `table` over the datasets (identifiers or tags)."""
    if k < 1:
        raise FedpodError(f"a vocabulary of {k} codes: ask for at least one")
    code = quote_identifier(code_column)
    query = (f"SELECT {code} AS code, COUNT(*) AS n FROM {quote_identifier(table)} WHERE {code} IS NOT NULL "
             f"GROUP BY {code} ORDER BY n DESC, code LIMIT {int(k)}")
    counted = modeller.sql(query, datasets=datasets, tags=tags, aggregate=True, min_datasets=min_datasets)
    assert isinstance(counted, pd.DataFrame)  # aggregate=True: one merged frame
    return Vocabulary(counted["code"].astype(str).tolist(), counted["n"].astype(int).tolist(),
                      list(counted.attrs.get("datasets", [])), dict(counted.attrs.get("disclosure", {})))
