"""Noisy aggregate SQL: COUNT, SUM and AVG with Laplace noise, charged to the pod's epsilon ledger.

The pod plans the query's mergeable partials itself (`federated.plan_merge`, as the modeller
does) and accepts only partials whose sensitivity it can bound: COUNT (one record moves it by
1) and SUM of a column the modeller declared bounds for (`bounds: {column: [low, high]}`; the pod
clamps every value into them, so one record moves the sum by at most max(|low|, |high|)), as
SmartNoise does. AVG travels as such a SUM and a COUNT. The query's epsilon is split evenly
over its partials (sequential composition), each gets Laplace noise of scale sensitivity /
its share, and the answer is merged by the modeller as usual. Noise is drawn from the OS's
entropy. GROUP BY is refused: which groups exist at a pod is itself data, and the noise cannot
cover it without a declared key domain. No small-cell suppression or differencing check applies:
epsilon is the guarantee.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlglot import exp

from fedpod.algorithms.sql.dialect import to_duckdb
from fedpod.algorithms.sql.federated import additive_partials
from fedpod.errors import NotMergeable

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class NoisyPlan:
    partial_sql: str  # the partials, sums clamped to the declared bounds
    sensitivities: list[float]  # per partial column p0, p1, ...


def plan_noisy(query: str, bounds: dict[str, tuple[float, float]]) -> NoisyPlan:
    """The clamped partial query of an aggregate `query` and each partial's sensitivity; what
    cannot be bounded raises NotMergeable naming it."""
    _, partial, aggregates = additive_partials(query, "noise")
    lowered = {column.lower(): (float(low), float(high)) for column, (low, high) in bounds.items()}
    sensitivities: list[float] = []
    for aggregate in aggregates:
        if isinstance(aggregate, exp.Count):
            sensitivities.append(1.0)
            continue
        if not isinstance(aggregate.this, exp.Column):
            raise NotMergeable(to_duckdb(aggregate), "noisy SQL sums a column, whose declared bounds clamp it")
        column = aggregate.this.name
        if column.lower() not in lowered:
            raise NotMergeable(to_duckdb(aggregate), f"declare bounds for {column} (bounds: {{{column}: [low, "
                                                     "high]}}) so that the pod can clamp it")
        low, high = lowered[column.lower()]
        if not low < high:
            raise NotMergeable(to_duckdb(aggregate), f"the bounds of {column} are empty")
        aggregate.set("this", exp.func("LEAST", exp.func("GREATEST", exp.cast(aggregate.this.copy(), "DOUBLE"),
                                                         exp.Literal.number(low)), exp.Literal.number(high)))
        sensitivities.append(max(abs(low), abs(high)))
    return NoisyPlan(to_duckdb(partial), sensitivities)


def add_noise(table: pa.Table, plan: NoisyPlan, epsilon: float) -> pa.Table:
    """Each partial plus Laplace noise of scale sensitivity * partials / epsilon."""
    import pyarrow as pa

    rng = np.random.default_rng(secrets.randbits(128))
    share = epsilon / len(plan.sensitivities)
    columns = {}
    for index, sensitivity in enumerate(plan.sensitivities):
        name = f"p{index}"
        values = np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0)  # a SUM over no rows is NULL: noise it as zero
        columns[name] = pa.array(values + rng.laplace(0.0, sensitivity / share, size=len(values)))
    return pa.table(columns)
