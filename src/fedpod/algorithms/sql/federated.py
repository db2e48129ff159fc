"""Rewrite an aggregate query into mergeable partials, and the query that merges them.

The global answer must equal the answer on the pooled rows, so each aggregate travels as
sufficient statistics and is recombined exactly:

    COUNT(x)        -> COUNT(x)                      merged by SUM
    SUM(x)          -> SUM(x)                        merged by SUM
    MIN/MAX(x)      -> MIN/MAX(x)                    merged by MIN/MAX
    AVG(x)          -> SUM(x), COUNT(x)              SUM(s) / SUM(n)
    VAR/STDDEV(x)   -> COUNT(x), SUM(x), M2(x)       Chan et al.'s parallel combination of M2

GROUP BY keys are computed at the pods and become the merge's GROUP BY; WHERE runs at the
pods; HAVING, ORDER BY, LIMIT/OFFSET and DISTINCT run only after the merge. A plain row
query (no aggregate) is merged by concatenation, with ORDER BY/LIMIT re-applied. A sample of
a PERCENT of the rows is taken by each pod of its own rows; a sample of n rows would give n
per pod, and is refused. Anything that has no exact merge (COUNT(DISTINCT), MEDIAN, window
functions, joins, ...) raises NotMergeable naming the construct, rather than returning an
approximation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlglot import exp

from fedpod.algorithms.sql import dialect
from fedpod.algorithms.sql.dialect import (
    alias_position,
    group_keys,
    ordinal,
    parse_statement,
    per_query,
    to_duckdb,
    unknown_aggregate,
)
from fedpod.errors import NotMergeable

PARTIALS = "partials"

_VARIANCE_KINDS: dict[type[exp.Expr], tuple[bool, bool]] = {
    # class -> (sample (n-1) rather than population, square root)
    exp.Variance: (True, False),
    exp.VariancePop: (False, False),
    exp.Stddev: (True, True),
    exp.StddevSamp: (True, True),
    exp.StddevPop: (False, True),
}
_SIMPLE = (exp.Count, exp.Sum, exp.Min, exp.Max, exp.Avg)


@dataclass(frozen=True)
class MergePlan:
    """`partial_sql` runs at every pod; `merge_sql` runs at the modeller over table `partials`
    (the concatenated pod results). In "partials" mode the merge's output columns are
    `c0 .. c{output_count-1}`, to be renamed to the original query's names by the caller; in
    "rows" mode they already carry the pods' column names (`output_count` is 0)."""

    partial_sql: str
    merge_sql: str
    mode: Literal["rows", "partials"]
    output_count: int


def col(name: str) -> exp.Column:
    return exp.column(name)


def _sum(e: exp.Expr) -> exp.Expr:
    return exp.Sum(this=e)


class _Rewriter:
    def __init__(self, select: exp.Select) -> None:
        self.select = select
        self.partials: list[Any] = []  # aliased partial columns, in order
        self.keys: list[exp.Expr] = []
        self.windows: list[Any] = []  # group totals for variance merges (aliased)
        self.variance_count = 0
        self.tables = dialect.table_names(select)

    def add_partial(self, expression: exp.Expr) -> exp.Column:
        """The partial column computing `expression`, added once however often the query names it
        (`SUM(x) AS s, s / COUNT(*)`): noisy SQL splits its epsilon over the partials."""
        for partial in self.partials:
            if partial.this == expression:
                return col(partial.alias)
        name = f"p{len(self.partials)}"
        self.partials.append(exp.alias_(expression, name))
        return col(name)

    def merge_aggregate(self, node: exp.AggFunc, wrap: Callable[[exp.Expr], exp.Expr]) -> exp.Expr:
        """Return the merge-side expression for one aggregate; `wrap` re-applies its FILTER."""
        construct = to_duckdb(node)
        if node.find(exp.Distinct) is not None and not isinstance(node, exp.Min | exp.Max):
            raise NotMergeable(construct, "DISTINCT aggregates need every distinct value at the modeller")
        if node.find(exp.Window) is not None or (node.find(exp.AggFunc) not in (node, None) and any(
            inner is not node for inner in node.find_all(exp.AggFunc)
        )):
            raise NotMergeable(construct, "nested aggregates cannot be merged")
        argument = node.this
        if isinstance(node, exp.Count):
            return exp.cast(_sum(self.add_partial(wrap(node.copy()))), "BIGINT")
        if isinstance(node, exp.Sum):
            return _sum(self.add_partial(wrap(node.copy())))
        if dialect.top_n(node):
            raise NotMergeable(construct, "MIN and MAX with a count return lists of members' values: no exact merge")
        if isinstance(node, exp.Min | exp.Max):
            merged = node.copy()
            merged.set("this", self.add_partial(wrap(node.copy())))
            return merged
        if isinstance(node, exp.Avg):
            total = self.add_partial(wrap(exp.Sum(this=argument.copy())))
            count = self.add_partial(wrap(exp.Count(this=argument.copy())))
            return exp.Div(this=exp.cast(_sum(total), "DOUBLE"),
                           expression=exp.func("NULLIF", _sum(count), exp.Literal.number(0)))
        if type(node) in _VARIANCE_KINDS:
            return self._merge_variance(node, argument, wrap)
        raise NotMergeable(construct, f"{node.sql_name()} has no exact merge from per-dataset partials")

    def _merge_variance(self, node: exp.AggFunc, argument: exp.Expr,
                        wrap: Callable[[exp.Expr], exp.Expr]) -> exp.Expr:
        sample, root = _VARIANCE_KINDS[type(node)]
        value = exp.cast(argument.copy(), "DOUBLE")
        n = self.add_partial(wrap(exp.Count(this=argument.copy())))
        s = self.add_partial(wrap(exp.Sum(this=value.copy())))
        m2 = self.add_partial(exp.func("COALESCE", wrap(exp.VariancePop(this=value.copy())), exp.Literal.number(0))
                              * exp.cast(wrap(exp.Count(this=argument.copy())), "DOUBLE"))
        index = self.variance_count
        self.variance_count += 1
        group_n, group_s = f"gn{index}", f"gs{index}"
        partition = [k.copy() for k in self.key_columns()]
        self.windows.append(exp.alias_(exp.Window(this=_sum(n.copy()), partition_by=partition), group_n))
        self.windows.append(
            exp.alias_(exp.Window(this=_sum(s.copy()), partition_by=[k.copy() for k in partition]), group_s))
        local_mean = exp.Div(this=s.copy(), expression=exp.func("NULLIF", n.copy(), exp.Literal.number(0)))
        global_mean = exp.Div(this=col(group_s), expression=exp.func("NULLIF", col(group_n), exp.Literal.number(0)))
        spread = exp.Paren(this=exp.Sub(this=local_mean, expression=global_mean))
        squared = exp.Mul(this=spread, expression=spread.copy())
        correction = exp.func("COALESCE", exp.Mul(this=n.copy(), expression=squared), exp.Literal.number(0))
        m2_total = _sum(exp.Add(this=m2.copy(), expression=correction))
        count_total = _sum(n.copy())
        denominator = exp.Sub(this=count_total, expression=exp.Literal.number(1)) if sample else count_total
        ratio = exp.Div(this=m2_total, expression=exp.func("NULLIF", denominator, exp.Literal.number(0)))
        variance = exp.Case(ifs=[exp.If(this=exp.GT(this=count_total.copy(), expression=exp.Literal.number(0)),
                                        true=ratio)])
        result: exp.Expr = exp.func("SQRT", variance) if root else variance
        return result

    def key_columns(self) -> list[exp.Column]:
        return [col(f"k{i}") for i in range(len(self.keys))]

    def transform(self, expression: exp.Expr) -> exp.Expr:
        """Rewrite a select/HAVING/ORDER expression into its merge-side form."""

        keys = [dialect.canonical(key, self.tables) for key in self.keys]  # `ehr.g1` is the key g1

        def replace(node: exp.Expr) -> exp.Expr:
            if any(type(node) is type(key) for key in keys):
                seen = dialect.canonical(node, self.tables)
                for index, key in enumerate(keys):
                    if seen == key:
                        return col(f"k{index}")
            if isinstance(node, exp.Filter) and isinstance(node.this, exp.AggFunc):
                condition = node.expression

                def wrap(e: exp.Expr) -> exp.Expr:
                    return exp.Filter(this=e, expression=condition.copy())

                return self.merge_aggregate(node.this, wrap)
            if isinstance(node, exp.AggFunc):
                return self.merge_aggregate(node, lambda e: e)
            return node

        return expression.copy().transform(replace)


def _refuse_unmergeable(select: exp.Select) -> None:
    for kind, text in ((exp.Join, "JOIN"), (exp.Window, "window function"), (exp.With, "WITH (CTE)"),
                       (exp.Subquery, "subquery"), (exp.Lateral, "LATERAL"), (exp.Unnest, "UNNEST")):
        node = select.find(kind)
        if node is not None:
            raise NotMergeable(text, f"{to_duckdb(node)!r} cannot be split into per-dataset partials")
    group = select.args.get("group")
    if group is not None and (group.find(exp.Rollup, exp.Cube, exp.GroupingSets) is not None
                              or any(group.args.get(k) for k in ("rollup", "cube", "grouping_sets", "all"))):
        raise NotMergeable("GROUP BY ROLLUP/CUBE/GROUPING SETS/ALL", "only plain GROUP BY keys are merged")
    if select.args.get("qualify") is not None:
        raise NotMergeable("QUALIFY", "it filters on window functions")
    if (unknown := unknown_aggregate(select)) is not None:
        raise NotMergeable(to_duckdb(unknown)[:80], "it is an aggregate without an exact merge (COUNT, SUM, AVG, MIN, "
                                                    "MAX, VARIANCE, STDDEV and quantiles have one)")
    distinct = select.args.get("distinct")
    if distinct is not None and distinct.args.get("on") is not None:
        raise NotMergeable("DISTINCT ON", "it picks arbitrary rows per key")
    for sample in select.find_all(exp.TableSample):
        if sample.args.get("percent") is None:
            raise NotMergeable(f"a sample of {to_duckdb(sample)!r}", "each dataset would give that many rows; "
                                                                     "sample a PERCENT of the rows instead")


def _has_aggregate(select: exp.Select) -> bool:
    parts = [*select.expressions, select.args.get("having"), select.args.get("order")]
    return any(p is not None and p.find(exp.AggFunc) is not None for p in parts)


@per_query
def plan_merge(query: str) -> MergePlan:
    """Plan an exact federated evaluation of `query` (see the module docstring); remembered per
    query, as the pods remember their part (`disclosure.disclosed_query`)."""
    tree = parse_statement(query)
    if not isinstance(tree, exp.Select):
        construct = tree.key.upper()
        raise NotMergeable(construct, "only a single SELECT can be merged exactly")
    _refuse_unmergeable(tree)
    if tree.args.get("group") is None and not _has_aggregate(tree):
        return _plan_rows(tree)
    return _plan_aggregate(tree)


def _limit_clauses(select: exp.Select) -> tuple[exp.Limit | None, exp.Expr | None]:
    """The LIMIT clause (whole: `LIMIT 10 PERCENT` is a share, not a count) and the OFFSET's expression."""
    limit = select.args.get("limit")
    offset = select.args.get("offset")
    return (limit if isinstance(limit, exp.Limit) else None, offset.expression if offset is not None else None)


def _is_share(limit: exp.Limit) -> bool:
    options = limit.args.get("limit_options")
    return options is not None and bool(options.args.get("percent"))


def _limits_merge(merge: exp.Select, limit: exp.Limit | None, offset: exp.Expr | None) -> exp.Select:
    if limit is not None:
        merge.set("limit", limit.copy())
    if offset is not None:
        merge = merge.offset(offset.copy())
    return merge


def _orders_by_all(ordered: exp.Ordered) -> bool:
    """DuckDB's ORDER BY ALL: every output column, left to right."""
    return isinstance(ordered.this, exp.Var) and ordered.this.name.upper() == "ALL"


def _expands(projection: exp.Expr) -> bool:
    """A projection that stands for a number of columns the planner cannot know (`*`, `t.*`, COLUMNS())."""
    return isinstance(projection, exp.Star | exp.Columns) or (
        isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star))


def _named_output(select: exp.Select, target: exp.Expr) -> exp.Expr | None:
    """What a bare name in a row query's ORDER BY stands for when it names an output rather than
    a column: a select alias, or a column `* REPLACE (-x AS x)` or `* RENAME (x AS z)` made."""
    named: exp.Expr | None = None
    if (position := alias_position(select, target)) is not None:
        named = select.expressions[position].this
    elif isinstance(target, exp.Column) and not target.table:
        for star in (p for p in select.expressions if isinstance(p, exp.Star)):
            for made in [*(star.args.get("replace") or []), *(star.args.get("rename") or [])]:
                if isinstance(made, exp.Alias) and made.alias.lower() == target.name.lower():
                    named = made.this
    return named


def _selected(select: exp.Select, target: exp.Expr) -> int | None:
    """The 0-based projection an ORDER BY key names: by its alias, its column's name (in any
    case, as DuckDB reads unquoted names), or as the same expression."""
    if (position := alias_position(select, target)) is not None:
        return position
    for position, projection in enumerate(select.expressions):
        if isinstance(target, exp.Column) and isinstance(projection, exp.Column) \
                and projection.name.lower() == target.name.lower():  # one table: joins are refused
            return position
        if (projection.this if isinstance(projection, exp.Alias) else projection) == target:
            return position
    return None


def _plan_rows(select: exp.Select) -> MergePlan:
    """Concatenate rows. ORDER BY keys travel as hidden columns, so that ORDER BY and
    LIMIT/OFFSET can be re-applied after the concatenation; each pod applies LIMIT+OFFSET
    (all of its rows for a LIMIT that is a share of them)."""
    limit, offset = _limit_clauses(select)
    partial = select.copy()
    partial.set("offset", None)
    hidden: list[Any] = []
    merge_order: list[exp.Ordered] = []
    order = select.args.get("order")
    keys: list[exp.Ordered] = order.expressions if order is not None else []
    distinct = select.args.get("distinct") is not None
    first_star = next((i for i, p in enumerate(select.expressions) if _expands(p)), None)
    for ordered in keys:
        target = ordered.this
        if _orders_by_all(ordered):  # the pods and the merge order by the same columns
            if len(keys) > 1:
                raise NotMergeable("ORDER BY ALL beside other keys", "order by ALL alone, or name the columns")
            merged: exp.Expr = target.copy()
        elif distinct:  # ordered by what it selects (DuckDB insists), so by its position: no hidden column
            position = ordinal(select, target, "ORDER BY")
            if position is None and (position := _selected(select, target)) is None:
                raise NotMergeable("SELECT DISTINCT ... ORDER BY", "order by selected columns only")
            if first_star is not None and first_star <= position:
                raise NotMergeable("SELECT DISTINCT * ... ORDER BY", "a * hides which output that is: name the "
                                                                     "columns")
            merged = exp.Literal.number(position + 1)
        else:
            if first_star is not None and isinstance(target, exp.Literal) and not target.is_string:
                raise NotMergeable(f"ORDER BY {target.name} beside *", "a * hides which column that is: name it")
            if (position := ordinal(select, target, "ORDER BY")) is not None:
                projection = select.expressions[position]
                target = projection.this if isinstance(projection, exp.Alias) else projection
            elif (named := _named_output(select, target)) is not None:
                target = named
            merged = exp.column(f"__fedpod_order_{len(hidden)}")
            hidden.append(exp.alias_(target.copy(), merged.name))
        merge_order.append(exp.Ordered(this=merged, desc=ordered.args.get("desc"),
                                       nulls_first=ordered.args.get("nulls_first")))
    if hidden:
        partial.set("expressions", [*partial.expressions, *hidden])
    if limit is not None and _is_share(limit):
        partial.set("limit", None)
    elif limit is not None and offset is not None:
        partial.set("limit", exp.Limit(expression=exp.Add(this=limit.expression.copy(), expression=offset.copy())))
    star = exp.Star(**({"except_": [exp.column(h.alias) for h in hidden]} if hidden else {}))
    merge = exp.select(star).from_(PARTIALS)
    if distinct:
        merge.set("distinct", exp.Distinct())
    if merge_order:
        merge.set("order", exp.Order(expressions=merge_order))
    return MergePlan(to_duckdb(partial), to_duckdb(_limits_merge(merge, limit, offset)), "rows", 0)


def _bind_aliases(node: exp.Expr, aliases: dict[str, exp.Expr], key_names: set[str]) -> exp.Expr:
    """`node` with its references to select aliases replaced by what they stand for, as DuckDB
    binds them in HAVING and in later projections (`SUM(x) AS s, s / 2`): outside aggregates,
    and unless a GROUP BY column has the name, which DuckDB binds first."""
    def replace(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Column) and not node.table and (name := node.name.lower()) in aliases \
                and name not in key_names and node.find_ancestor(exp.AggFunc) is None:
            return aliases[name].copy()
        return node

    return node.transform(replace)


def _plan_aggregate(select: exp.Select) -> MergePlan:
    rewriter = _Rewriter(select)
    rewriter.keys = group_keys(select)
    key_names = {key.name.lower() for key in rewriter.keys if isinstance(key, exp.Column)}
    bound: dict[str, exp.Expr] = {}  # each alias (lower case) -> its projection, aliases within bound
    outputs = []
    for projection in select.expressions:
        expression = _bind_aliases(projection.this if isinstance(projection, exp.Alias) else projection, bound,
                                   key_names)
        if isinstance(projection, exp.Alias):
            bound.setdefault(projection.alias.lower(), expression)
        outputs.append(rewriter.transform(expression))
    for output in outputs:
        if isinstance(output, exp.Star) or (output.find(exp.Star) is not None and output.find(exp.Count) is None):
            raise NotMergeable("SELECT *", "an aggregated query must name its columns")
    having = select.args.get("having")
    merged_having = rewriter.transform(_bind_aliases(having.this, bound, key_names)) if having is not None else None
    order = select.args.get("order")
    merged_order: list[exp.Expr] = []
    for ordered in order.expressions if order is not None else []:
        target = ordered.this
        if (position := ordinal(select, target, "ORDER BY")) is not None:
            replacement: exp.Expr = exp.column(f"c{position}")
        elif (position := alias_position(select, target)) is not None:
            replacement = exp.column(f"c{position}")
        else:
            replacement = rewriter.transform(_bind_aliases(target, bound, key_names))
        merged_order.append(exp.Ordered(this=replacement, desc=ordered.args.get("desc"),
                                        nulls_first=ordered.args.get("nulls_first")))

    key_aliases = [exp.alias_(k.copy(), f"k{i}") for i, k in enumerate(rewriter.keys)]
    partial = exp.select(*key_aliases, *rewriter.partials)
    from_clause = select.args.get("from_") or select.args.get("from")
    partial.set("from_" if "from_" in exp.Select.arg_types else "from", from_clause.copy() if from_clause else None)
    for clause in ("where", "sample"):  # each pod samples the same share of its own rows
        if (kept := select.args.get(clause)) is not None:
            partial.set(clause, kept.copy())
    if rewriter.keys:
        partial = partial.group_by(*[col(f"k{i}") for i in range(len(rewriter.keys))])

    source: exp.Expr = exp.to_table(PARTIALS)
    if rewriter.windows:
        source = exp.select(exp.Star(), *rewriter.windows).from_(PARTIALS).subquery("merged_partials")
    merge = exp.select(*[exp.alias_(o, f"c{i}") for i, o in enumerate(outputs)]).from_(source)
    if rewriter.keys:
        merge = merge.group_by(*rewriter.key_columns())
    if merged_having is not None:
        merge = merge.having(merged_having)
    if select.args.get("distinct") is not None:
        merge.set("distinct", exp.Distinct())
    if merged_order:
        merge.set("order", exp.Order(expressions=merged_order))
    return MergePlan(to_duckdb(partial), to_duckdb(_limits_merge(merge, *_limit_clauses(select))), "partials",
                     len(outputs))


def additive_partials(query: str, purpose: str) -> tuple[MergePlan, exp.Select, list[exp.Count | exp.Sum]]:
    """The merge plan of an ungrouped aggregate whose partials all add up (COUNT, SUM; AVG
    travels as both), its partial SELECT as a tree, and each partial's aggregate node in that
    tree (to rewrite in place). What does not add up raises NotMergeable naming `purpose`."""
    merge = plan_merge(query)
    if merge.mode != "partials":
        raise NotMergeable("a row query", f"{purpose} applies to aggregates (COUNT, SUM, AVG) only")
    partial = parse_statement(merge.partial_sql)
    assert isinstance(partial, exp.Select)
    if partial.args.get("group") is not None:
        raise NotMergeable(f"GROUP BY with {purpose}", "which groups a pod has is data, and they differ between "
                                                       "pods; run one query per group with WHERE")
    nodes: list[exp.Count | exp.Sum] = []
    for projection in partial.expressions:
        node = projection.this if isinstance(projection, exp.Alias) else projection
        aggregate = node.this if isinstance(node, exp.Filter) else node
        if not isinstance(aggregate, exp.Count | exp.Sum):
            raise NotMergeable(to_duckdb(aggregate), f"{purpose} applies to COUNT, SUM and AVG only")
        nodes.append(aggregate)
    return merge, partial, nodes
