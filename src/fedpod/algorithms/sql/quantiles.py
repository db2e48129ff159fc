"""Exact federated quantiles: MEDIAN, QUANTILE_CONT/QUANTILE_DISC and PERCENTILE_CONT/DISC by a
federated search over mergeable counts.

A quantile is an order statistic (QUANTILE_DISC: the value of rank ceil(n*p) - 1 of the pooled
sorted values; QUANTILE_CONT and MEDIAN: ranks floor and ceil of (n-1)*p, interpolated as DuckDB
does). Counts of values at or below a threshold merge by addition, so the modeller finds the
value of rank k without seeing a single value: every double maps monotonically to a 64-bit
integer, and each step asks every pod for the counts at or below `FANOUT - 1` thresholds
evenly spread over the interval still known to hold the answer (one `histogram` scan per pod).
Each step cuts the interval `FANOUT` times, so any double is pinned in at most
ceil(64 / log2(FANOUT)) + 1 steps (9 with 256) — exactly, not within a tolerance like a t-digest.
A step serves every quantile of the query at once.

What a pod releases (`pod_counts`): per argument, its count of values, and for each threshold
its count at or below it — unless fewer than `min_group_size` of its values lie at or below, or
above, the threshold (DataSHIELD's rule for quantiles: no bound whose set is below the minimum),
in which case that count is withheld. A pod with 1 to `min_group_size - 1` values answers
nothing. So quantiles within `min_group_size` values of a pod's extremes cannot be found (the
query fails saying so); the search goes on around withheld counts otherwise.

Exact for values a double holds exactly (every FLOAT and DOUBLE, integers up to 2^53);
QUANTILE_CONT's interpolation agrees with DuckDB's to the last bit or two of the double; a zero
is reported as 0.0 (counts cannot tell -0.0 from it).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sqlglot import exp

from fedpod.algorithms.sql.dialect import parse_statement, per_query, to_duckdb
from fedpod.errors import FedpodError, NotMergeable

if TYPE_CHECKING:  # Arrow loads with a pod's first answer, not with the pod
    import pyarrow as pa

FANOUT = 256
MAX_THRESHOLDS = 4096  # per request, over all arguments: what one pod step may be asked to count
MAX_ARGUMENTS = 16
MAX_STEPS = 2 + math.ceil(64 / math.log2(FANOUT))  # the first step, one per FANOUT-fold cut, one spare
SIGN = 1 << 63
LOWEST = 0x000FFFFFFFFFFFFF  # -inf in the sortable order
HIGHEST = 0xFFF0000000000000  # +inf


def sortable(value: float) -> int:
    """The double's place in a 64-bit order that matches numeric order (NaN excluded)."""
    bits: int = struct.unpack("<Q", struct.pack("<d", value))[0]
    return (~bits) & (2**64 - 1) if bits & SIGN else bits | SIGN


def unsortable(key: int) -> float:
    bits = key & ~SIGN if key & SIGN else (~key) & (2**64 - 1)
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


Kind = Literal["cont", "disc"]


@dataclass(frozen=True)
class Quantile:
    argument: int  # index into QuantilePlan.arguments
    kind: Kind
    p: float


@dataclass(frozen=True)
class QuantilePlan:
    """What the pods count over: each argument expression (as DOUBLE) on the query's table,
    under its WHERE clause; and the quantiles the query's outputs are, in order."""

    table: str  # as the query names it, with its alias (`ehr AS t`), which the arguments may use
    where: str | None
    arguments: tuple[str, ...]
    quantiles: tuple[Quantile, ...]


def _quantile_of(node: exp.Expr) -> tuple[exp.Expr, Kind, exp.Expr | None] | None:
    """(argument, kind, fraction) when `node` is a quantile aggregate; MEDIAN has no fraction."""
    if isinstance(node, exp.Median):
        return node.this, "cont", None
    if isinstance(node, exp.WithinGroup) and isinstance(node.this, exp.PercentileCont | exp.PercentileDisc):
        ordered = node.expression.expressions
        if len(ordered) != 1 or ordered[0].args.get("desc"):
            raise NotMergeable(to_duckdb(node), "a percentile orders by one expression, ascending")
        kind: Kind = "cont" if isinstance(node.this, exp.PercentileCont) else "disc"
        return ordered[0].this, kind, node.this.this
    if isinstance(node, exp.PercentileCont | exp.PercentileDisc):
        return node.this, "cont" if isinstance(node, exp.PercentileCont) else "disc", node.expression
    if isinstance(node, exp.Quantile):
        return node.this, "disc", node.args.get("quantile")
    return None


@per_query
def is_quantile_query(query: str) -> bool:
    tree = parse_statement(query)
    return any(_quantile_of(node) is not None for node in tree.walk())


def plan_quantiles(query: str) -> QuantilePlan:
    """The search plan of a query whose outputs are all quantiles of one table's columns or
    expressions, with an optional WHERE. Anything else raises NotMergeable naming it."""
    tree = parse_statement(query)
    if not isinstance(tree, exp.Select):
        raise NotMergeable(tree.key.upper(), "only a single SELECT of quantiles can be searched exactly")
    for clause in ("group", "having", "order", "limit", "offset", "distinct", "joins", "with_", "qualify"):
        if tree.args.get(clause):
            raise NotMergeable(f"{clause.rstrip('_').upper()} beside a quantile",
                               "quantiles are searched over the whole (WHERE-filtered) dataset; run one query "
                               "per group with WHERE")
    source = tree.args.get("from_") or tree.args.get("from")
    table = source.this if source is not None else None
    if not isinstance(table, exp.Table) or table.args.get("db"):
        raise NotMergeable("FROM", "quantiles read one dataset table by name")
    if tree.find(exp.TableSample) is not None:  # was left out of the counts: a quantile of every row
        raise NotMergeable("a sample beside a quantile", "every step of the search must count the same rows")
    arguments: list[str] = []
    quantiles: list[Quantile] = []
    for projection in tree.expressions:
        node = projection.this if isinstance(projection, exp.Alias) else projection
        found = _quantile_of(node)
        if found is None:
            raise NotMergeable(to_duckdb(node), "a query with quantiles may select only quantiles (run the other "
                                                "aggregates as a query of their own)")
        argument, kind, fraction = found
        if isinstance(argument, exp.Distinct):  # was cast as CAST(DISTINCT x ...), which no pod could parse
            raise NotMergeable(to_duckdb(node), "a quantile of distinct values needs every distinct value at the "
                                                "modeller")
        if argument.find(exp.AggFunc, exp.Subquery, exp.Window) is not None:
            raise NotMergeable(to_duckdb(node), "a quantile's argument is a row expression")
        p = 0.5 if fraction is None else _fraction(fraction, node)
        text = to_duckdb(exp.cast(argument.copy(), "DOUBLE"))
        if text not in arguments:
            arguments.append(text)
        quantiles.append(Quantile(arguments.index(text), kind, p))
    if len(arguments) > MAX_ARGUMENTS:
        raise NotMergeable("quantiles", f"at most {MAX_ARGUMENTS} different arguments per query")
    where = tree.args.get("where")
    return QuantilePlan(table=to_duckdb(table), where=to_duckdb(where.this) if where is not None else None,
                        arguments=tuple(arguments), quantiles=tuple(quantiles))


def _fraction(node: exp.Expr, aggregate: exp.Expr) -> float:
    value = node.this if isinstance(node, exp.Neg) else node
    if not isinstance(value, exp.Literal) or value.is_string:
        raise NotMergeable(to_duckdb(aggregate), "the quantile's fraction must be a number (a list of fractions: "
                                                 "one aggregate per fraction)")
    p = float(value.this) * (-1 if isinstance(node, exp.Neg) else 1)
    if not 0 <= p <= 1:
        raise NotMergeable(to_duckdb(aggregate), f"the fraction {p:g} is outside [0, 1]")
    return p


# --- the pod's side -----------------------------------------------------------------------------

def count_sql(plan: QuantilePlan, thresholds: list[list[float]]) -> tuple[str, list[object]]:
    """One scan: per argument its count of values and a histogram at the thresholds (NaN, which
    DuckDB orders after +inf, is counted by COUNT but is at or below no threshold). The
    thresholds go as parameters: a thousand literals would cost more to parse than to count."""
    parts: list[str] = []
    params: list[object] = []
    for index, argument in enumerate(plan.arguments):
        parts.append(f"COUNT({argument}) AS n{index}")
        if thresholds[index]:
            parts.append(f"histogram({argument}, CAST(? AS DOUBLE[])) FILTER (WHERE NOT isnan({argument})) AS h{index}")
            params.append(thresholds[index])
        else:
            parts.append(f"NULL AS h{index}")
    where = f" WHERE {plan.where}" if plan.where else ""
    return f'SELECT {", ".join(parts)} FROM {plan.table}{where}', params


def check_thresholds(plan: QuantilePlan, thresholds: list[list[float]]) -> list[list[float]]:
    """The thresholds a modeller sent, bounded and sorted; NaN refused."""
    if len(thresholds) != len(plan.arguments):
        raise FedpodError(f"{len(thresholds)} threshold lists for {len(plan.arguments)} quantile arguments")
    if sum(len(t) for t in thresholds) > MAX_THRESHOLDS:
        raise FedpodError(f"more than {MAX_THRESHOLDS} quantile thresholds in one step")
    if any(math.isnan(t) for values in thresholds for t in values):
        raise FedpodError("a quantile threshold is NaN")
    return [sorted({0.0 if t == 0 else float(t) for t in values}) for values in thresholds]


def pod_counts(row: dict[str, Any], plan: QuantilePlan, thresholds: list[list[float]],
               min_size: int) -> tuple[pa.Table, int]:
    """The counts this pod releases, from `count_sql`'s one row: (argument, threshold (null for
    the total), count at or below it (null where withheld)); and how many were withheld."""
    import pyarrow as pa

    arguments: list[int] = []
    points: list[float | None] = []
    counts: list[int | None] = []
    withheld = 0
    for index in range(len(plan.arguments)):
        total = int(row[f"n{index}"] or 0)
        if min_size > 1 and total < min_size:  # none alike: a 0 told apart from a refusal said whether a
            # patient was selected (`WHERE id = 42 AND diagnosis = ...`), and the refusal said how many
            raise PermissionError(f"fewer than min_group_size ({min_size}) values of quantile argument {index + 1} "
                                  "here")
        histogram = row[f"h{index}"] or []  # a MAP: pairs (upper bound, count), the empty buckets left out
        buckets = sorted(histogram.items() if isinstance(histogram, dict) else histogram)
        arguments.append(index)
        points.append(None)
        counts.append(total)
        below, position = 0, 0
        for threshold in thresholds[index]:
            while position < len(buckets) and buckets[position][0] <= threshold:
                below += int(buckets[position][1])
                position += 1
            above = total - below
            hidden = 0 < below < min_size or 0 < above < min_size
            withheld += hidden
            arguments.append(index)
            points.append(threshold)
            counts.append(None if hidden else below)
    table = pa.table({"argument": pa.array(arguments, pa.int32()), "threshold": pa.array(points, pa.float64()),
                      "count": pa.array(counts, pa.int64())})
    return table, withheld


# --- the modeller's side ------------------------------------------------------------------------

@dataclass
class _Search:
    """The value of rank `rank` (0-based) of one argument: known to lie in the sortable
    interval [lo, hi]."""

    argument: int
    rank: int
    lo: int = LOWEST
    hi: int = HIGHEST
    asked: list[float] = field(default_factory=list)
    nan: bool = False  # the rank falls among NaNs (after +inf)

    @property
    def done(self) -> bool:
        return self.nan or unsortable(self.lo) == unsortable(self.hi)

    def thresholds(self) -> list[float]:
        span = self.hi - self.lo
        keys = sorted({self.lo + span * j // FANOUT for j in range(1, FANOUT)} - {self.hi})
        self.asked = [unsortable(k) for k in keys]
        return self.asked

    def narrow(self, below: dict[float, int | None]) -> bool:
        """Update the interval from merged counts at or below each threshold (None: withheld by
        a pod); False when nothing could be learnt."""
        lo, hi = self.lo, self.hi
        for threshold in self.asked:
            count = below.get(threshold)
            if count is None:
                continue
            key = sortable(threshold)
            if count <= self.rank:
                lo = max(lo, key + 1)
            else:
                hi = min(hi, key)
        if lo > hi:
            raise FedpodError("the pods' counts contradict each other (a count fell as its threshold rose): a pod "
                              "answered wrongly; the quantile is not released")
        progressed = (lo, hi) != (self.lo, self.hi)
        self.lo, self.hi = lo, hi
        return progressed

    @property
    def value(self) -> float:
        return math.nan if self.nan else unsortable(self.hi)


class QuantileSearch:
    """The modeller's state across steps. `first_thresholds` goes out with totals unknown; each
    merged answer is given to `absorb`, and `next_thresholds` says what to ask next (None: done)."""

    def __init__(self, plan: QuantilePlan) -> None:
        self.plan = plan
        self.totals: list[int] | None = None
        self.searches: dict[tuple[int, int], _Search] = {}
        self.steps = 0
        self._asked: list[list[float]] = [[] for _ in plan.arguments]

    def first_thresholds(self) -> list[list[float]]:
        """The whole line, cut FANOUT times, and +inf (whose count is the non-NaN values)."""
        probe = _Search(0, 0)
        self._asked = [[*probe.thresholds(), math.inf] for _ in self.plan.arguments]
        return self._asked

    def absorb(self, merged: dict[tuple[int, float | None], int | None]) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise FedpodError(f"the quantile search did not converge in {MAX_STEPS} steps")
        if self.totals is None:
            self.totals = [int(merged.get((a, None)) or 0) for a in range(len(self.plan.arguments))]
            for rank_argument in self._ranks():
                argument, rank = rank_argument
                search = _Search(argument, rank)
                search.asked = self._asked[argument]
                finite = merged.get((argument, math.inf))
                if finite is not None and rank >= finite:
                    search.nan = True
                self.searches[rank_argument] = search
        for (argument, _), search in self.searches.items():
            if search.done:
                continue
            below = {t: merged.get((argument, t)) for t in search.asked}
            if not search.narrow(below) and self.steps > 1:
                raise FedpodError("a quantile lies within min_group_size values of a pod's smallest or largest "
                                  "values, where pods withhold their counts: it cannot be released",
                                  hint="ask for a quantile further from the extremes, or a larger WHERE selection")

    def _ranks(self) -> list[tuple[int, int]]:
        assert self.totals is not None
        ranks: list[tuple[int, int]] = []
        for quantile in self.plan.quantiles:
            n = self.totals[quantile.argument]
            if n == 0:
                continue
            for rank in _ranks_of(quantile, n):
                if (quantile.argument, rank) not in ranks:
                    ranks.append((quantile.argument, rank))
        return ranks

    def next_thresholds(self) -> list[list[float]] | None:
        wanted: list[set[float]] = [set() for _ in self.plan.arguments]
        for (argument, _), search in self.searches.items():
            if not search.done:
                wanted[argument].update(search.thresholds())
        if not any(wanted):
            return None
        self._asked = [sorted(values) for values in wanted]
        return self._asked

    def results(self) -> list[float | None]:
        assert self.totals is not None
        values: list[float | None] = []
        for quantile in self.plan.quantiles:
            n = self.totals[quantile.argument]
            if n == 0:
                values.append(None)
                continue
            ranks = _ranks_of(quantile, n)
            order = [self.searches[(quantile.argument, r)].value for r in ranks]
            if quantile.kind == "disc" or len(order) == 1:
                values.append(order[0] + 0.0)  # counts cannot tell -0.0 from 0.0: zero is reported as 0.0
            else:
                position = (n - 1) * quantile.p
                low, high = order
                fraction = position - math.floor(position)
                values.append(low * (1 - fraction) + high * fraction)  # as DuckDB, infinities included
        return values


def _ranks_of(quantile: Quantile, n: int) -> list[int]:
    if quantile.kind == "disc":
        return [max(0, math.ceil(n * quantile.p) - 1)]
    position = (n - 1) * quantile.p
    low, high = math.floor(position), math.ceil(position)
    return [low] if low == high else [low, high]


def merge_counts(tables: list[pa.Table]) -> dict[tuple[int, float | None], int | None]:
    """The pods' counts added per (argument, threshold); withheld anywhere is unknown."""
    merged: dict[tuple[int, float | None], int | None] = {}
    for table in tables:
        for argument, threshold, count in zip(*(table.column(c).to_pylist() for c in ("argument", "threshold",
                                                                                       "count")), strict=True):
            key = (int(argument), threshold)
            previous = merged.get(key, 0)
            merged[key] = None if previous is None or count is None else previous + int(count)
    return merged
