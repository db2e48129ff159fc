"""Noisy aggregate SQL: COUNT, SUM and AVG with Laplace noise, charged to the pod's epsilon ledger.

The pod plans the query's mergeable partials itself (`federated.plan_merge`, as the modeller
does) and accepts only partials whose sensitivity it can bound: COUNT (one record moves it by
1) and SUM of a column the modeller declared bounds for (`bounds: {column: [low, high]}`; the pod
clamps every value into them, so one record moves the sum by at most max(|low|, |high|)), as
SmartNoise does. AVG travels as such a SUM and a COUNT. The query's epsilon is split evenly
over its partials (sequential composition), each gets Laplace noise of scale sensitivity /
its share, and the answer is merged by the modeller as usual. GROUP BY is refused: which groups
exist at a pod is itself data, and the noise cannot cover it without a declared key domain. No
small-cell suppression or differencing check applies: epsilon is the guarantee.

The noise is added in integers, never in floating point: a double plus Laplace noise drawn as a
double can take values that only some true answers can produce, which gives the answer away
(Mironov, "On significance of the least significant bits for differential privacy", 2012). So a
SUM adds up its clamped values scaled by a power of two, 2^g, and rounded to integers (g chosen
so that the sensitivity is 2^20 to 2^21 units: the rounding is a millionth of it), a COUNT is one
already, and each gets the discrete Laplace distribution's noise, sampled exactly from the OS's
entropy (Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential Privacy", 2020); the
noisy integer is then divided by 2^g, which is exact.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from sqlglot import exp

from fedpod.algorithms.sql.dialect import to_duckdb
from fedpod.algorithms.sql.federated import additive_partials
from fedpod.errors import NotMergeable

if TYPE_CHECKING:
    import pyarrow as pa


SENSITIVITY_BITS = 21  # a SUM's sensitivity, in its integer units, is 2^20 to 2^21 of them
MAX_SCALE_BITS = 1000  # 2^g stays a normal double however small or large the bounds


@dataclass(frozen=True)
class NoisyPlan:
    partial_sql: str  # the partials as integers: counts, and sums of clamped values scaled by 2^g and rounded
    sensitivities: list[float]  # per partial column p0, p1, ...
    scales: list[int]  # per partial, g: its integers are 2^-g of the answer's units (0 for a COUNT)


def plan_noisy(query: str, bounds: dict[str, tuple[float, float]]) -> NoisyPlan:
    """The clamped partial query of an aggregate `query` and each partial's sensitivity; what
    cannot be bounded raises NotMergeable naming it."""
    _, partial, aggregates = additive_partials(query, "noise")
    _total(partial, aggregates)
    lowered = {column.lower(): (float(low), float(high)) for column, (low, high) in bounds.items()}
    sensitivities: list[float] = []
    scales: list[int] = []
    for aggregate in aggregates:
        if isinstance(aggregate, exp.Count):
            sensitivities.append(1.0)
            scales.append(0)
            continue
        if not isinstance(aggregate.this, exp.Column):
            raise NotMergeable(to_duckdb(aggregate), "noisy SQL sums a column, whose declared bounds clamp it")
        column = aggregate.this.name
        if column.lower() not in lowered:
            raise NotMergeable(to_duckdb(aggregate), f"declare bounds for {column} (bounds: {{{column}: [low, "
                                                     "high]}}) so that the pod can clamp it")
        low, high = lowered[column.lower()]
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NotMergeable(to_duckdb(aggregate), f"the bounds of {column} must be finite numbers")
        if not low < high:
            raise NotMergeable(to_duckdb(aggregate), f"the bounds of {column} are empty")
        sensitivity = max(abs(low), abs(high))
        g = max(-MAX_SCALE_BITS, min(MAX_SCALE_BITS, SENSITIVITY_BITS - math.frexp(sensitivity)[1]))
        clamped = exp.func("LEAST", exp.func("GREATEST", exp.Try(this=exp.cast(aggregate.this.copy(), "DOUBLE")),
                                             exp.Literal.number(low)), exp.Literal.number(high))
        scaled = exp.Mul(this=clamped, expression=exp.Literal.number(repr(math.ldexp(1.0, g))))
        aggregate.set("this", exp.cast(exp.func("ROUND", scaled), "BIGINT"))
        sensitivities.append(sensitivity)
        scales.append(g)
    return NoisyPlan(to_duckdb(partial), sensitivities, scales)


def _total(partial: exp.Select, aggregates: list[exp.Count | exp.Sum]) -> None:
    """Make the partial query answer for any data. One that fails on some values (`WHERE id = 42
    AND CAST(diagnosis AS INT) = 0`) tells by failing or not one bit that no noise covers, as
    often as the modeller asks at an epsilon near zero. Under TRY a value's error is a NULL:
    the row is not selected, or its value not counted. TRY refuses, whatever the data, what it
    cannot cover: volatile functions and subqueries."""
    where = partial.args.get("where")
    if where is not None:
        where.set("this", exp.Try(this=where.this))
    for projection in partial.expressions:
        node = projection.this if isinstance(projection, exp.Alias) else projection
        if isinstance(node, exp.Filter):
            node.expression.set("this", exp.Try(this=node.expression.this))
    for aggregate in aggregates:
        if isinstance(aggregate, exp.Count) and aggregate.this is not None and not isinstance(aggregate.this, exp.Star):
            aggregate.set("this", exp.Try(this=aggregate.this))


def _bernoulli(p: Fraction) -> bool:
    return secrets.randbelow(p.denominator) < p.numerator


def _bernoulli_exp(gamma: Fraction) -> bool:
    """True with probability exp(-gamma), for a rational gamma >= 0, exactly (CKS, Algorithm 1)."""
    while gamma > 1:
        if not _bernoulli_exp(Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k):
        k += 1
    return k % 2 == 1


def discrete_laplace(scale: Fraction) -> int:
    """An integer drawn with probability proportional to exp(-|x| / scale), exactly (CKS, Algorithm 2)."""
    t, s = scale.numerator, scale.denominator
    while True:
        u = secrets.randbelow(t)
        if not _bernoulli_exp(Fraction(u, t)):
            continue
        v = 0
        while _bernoulli_exp(Fraction(1)):
            v += 1
        magnitude = (u + t * v) // s
        negative = secrets.randbelow(2) == 1
        if not (negative and magnitude == 0):
            return -magnitude if negative else magnitude


def _as_double(value: Fraction) -> float:
    try:
        return float(value)
    except OverflowError:  # noise beyond any double, from an epsilon near zero
        return math.inf if value > 0 else -math.inf


def add_noise(table: pa.Table, plan: NoisyPlan, epsilon: float) -> pa.Table:
    """Each partial plus discrete Laplace noise of scale (its sensitivity in units of 2^-g) x
    partials / epsilon, in 2^-g units; as doubles."""
    import pyarrow as pa

    share = Fraction(epsilon) / len(plan.sensitivities)
    columns = {}
    for index, (sensitivity, g) in enumerate(zip(plan.sensitivities, plan.scales, strict=True)):
        unit = Fraction(2) ** -g
        scale = math.ceil(Fraction(sensitivity) / unit) / share
        exact = [int(value) if value is not None else 0  # a SUM over no rows is NULL: noised as zero
                 for value in table.column(f"p{index}").to_pylist()]
        columns[f"p{index}"] = pa.array([_as_double((value + discrete_laplace(scale)) * unit) for value in exact],
                                        pa.float64())
    return pa.table(columns)
