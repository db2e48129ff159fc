"""What a query discloses, judged by the pod from the query itself (never from what the sender
says it is), and the rewrite that lets the pod suppress small cells.

A query is an *aggregate* (task kind `sql_aggregate`) when it is one SELECT over the dataset
whose every output row is a group: GROUP BY keys and the aggregates below, nothing else — no
subquery, CTE, set operation, window, DISTINCT, table alias that renames columns (the group size
trusts a column's name to say whether it holds nulls), `rowid` (cohorts are told apart by row ids)
or other aggregate (LIST, STRING_AGG, FIRST, ARG_MAX, MEDIAN, DuckDB's `MAX(x, n)`... return
members' own values), no aggregate in HAVING or QUALIFY and none in ORDER BY but the outputs (they
would pick or order cells by values the pod never sized: the federated plan applies them after the
merge instead). Aggregates sqlglot does not know (HISTOGRAM, ARBITRARY, FSUM, and macros over one
such as JSON_GROUP_ARRAY) are found by their names in DuckDB's own catalogue: the pod cannot size
the rows behind them, and some return every member's value. What an aggregate other than COUNT
takes in must be a linear function of the row's columns (+, -, constants, casts to floating
point): a comparison, a function, a product of columns or a cast to a whole number can weigh one
row apart from the rest (`SUM(CASE WHEN id = 42 THEN age ELSE 0 END)` is patient 42's age in a
cell of any size). One CASE or IF may choose between linear values: the rows each branch takes
are sized as a FILTER's. Anything else is a *row* query (`sql_rows`).

For an aggregate the pod adds hidden columns that count, per cell, the rows each aggregate
used (`COUNT(*) [FILTER (WHERE arg IS NOT NULL AND its FILTER)]`, and the rows of each branch of
its CASE, once per distinct condition).
A cell from fewer rows than the policy's `min_group_size` is dropped; in the cells kept, an
output whose aggregates used fewer rows (an AVG over the one non-null value of a group, a COUNT(*)
FILTER that picks one person, a CASE branch of one) is withheld, NULL (`suppress_small_groups`).
How many of each is reported, never which. A count of none is held back as one of a few is, or
the difference would tell: were empty cells released and small ones suppressed, a FILTER naming
one person would be suppressed in just the cell that holds that person (`SELECT bmi, COUNT(*)
FILTER (WHERE id = 42) ... GROUP BY bmi` told patient 42's bmi). Where cells are ordered by an
aggregate, their order would tell a withheld value, and a cell with one is dropped instead. The
counts are judged after the query, not in SQL: DuckDB took about 0.4 ms to bind a
`LEAST(NULLIF(...))` over them, half of a small query's time.

Against differencing, the pod also describes the *cohorts* an aggregate releases — each cell's
rows, and within it the rows each output it lets out used (its FILTER, its non-null argument, its
CASE's branches) — by those
counts and a hash of their row ids, in the same scan (`disclosed_query`), so that
`governance.differencing` can refuse a cohort that differs from one already released to the same
modeller by fewer than `min_group_size` rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sqlglot import exp

from fedpod.algorithms.sql.dialect import (
    alias_position,
    group_keys,
    ordinal,
    parse_statement,
    per_query,
    plain_column,
    table_names,
    to_duckdb,
    top_n,
    unknown_aggregate,
)

if TYPE_CHECKING:
    import pyarrow as pa

HIDDEN = "__fedpod_"  # the prefix of the columns the pod adds and strips before anything leaves
SKETCH = 32  # the smallest row-id hashes a cohort's sketch keeps: see governance.differencing
RELEASED_AGGREGATES = (exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max, exp.Variance, exp.VariancePop, exp.Stddev,
                       exp.StddevSamp, exp.StddevPop)
_NOT_AGGREGATE_SHAPES = ((exp.Subquery, "a subquery"), (exp.With, "a CTE"), (exp.Window, "a window function"),
                         (exp.Join, "a JOIN"), (exp.Lateral, "LATERAL"), (exp.Unnest, "UNNEST"),
                         (exp.Pivot, "PIVOT or UNPIVOT"))


@dataclass(frozen=True)
class QueryShape:
    kind: Literal["sql_aggregate", "sql_rows"]
    columns: frozenset[str]  # dataset columns the query reads
    why_rows: str = ""  # for a row query: what made it one
    extremes: bool = False  # an aggregate with a MIN or MAX, each one member's value (policy: release_extremes)


_FLOATING = {exp.DataType.Type.DOUBLE, exp.DataType.Type.FLOAT}
MAX_CASE_BRANCHES = 16  # a branch's condition repeats those before it: a CASE of n costs n^2
MAX_SIZED = 256  # row counts per cell an aggregate query may need: each is a FILTERed COUNT and hash


def _constant(node: exp.Expr) -> bool:
    """A number written in the query, or arithmetic of such numbers."""
    if isinstance(node, exp.Literal):
        return not node.is_string
    if isinstance(node, exp.Paren | exp.Neg):
        return _constant(node.this)
    if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.Div):
        return _constant(node.this) and _constant(node.expression)
    return False


def _nonlinear(node: exp.Expr) -> exp.Expr | None:
    """The part of an expression that is not a linear function of the row's columns (columns,
    constants, + and -, products and quotients by constants, casts to floating point), or None.
    A linear function gives every row the same weight: it cannot single one out. Anything else
    can: a comparison, a function (`1 - ABS(SIGN(id - 42))` is 1 for one patient), a product of
    columns (`age * smoker`), a cast to a whole number (rounding makes steps)."""
    if isinstance(node, exp.Column):
        return node if isinstance(node.this, exp.Star) else None
    if isinstance(node, exp.Null) or _constant(node):
        return None
    if isinstance(node, exp.Paren | exp.Neg):
        return _nonlinear(node.this)
    if isinstance(node, exp.Add | exp.Sub):
        return _nonlinear(node.this) or _nonlinear(node.expression)
    if isinstance(node, exp.Mul) and (_constant(node.this) or _constant(node.expression)):
        return _nonlinear(node.expression if _constant(node.this) else node.this)
    if isinstance(node, exp.Div) and _constant(node.expression):
        return _nonlinear(node.this)
    if isinstance(node, exp.Cast | exp.TryCast) and node.to.this in _FLOATING:
        return _nonlinear(node.this)
    return node


def _choices(node: exp.Expr) -> list[exp.Case | exp.If]:
    """The CASEs and IFs within `node` (not a CASE's own WHEN branches, which are IFs too)."""
    return [found for found in node.find_all(exp.Case, exp.If)
            if isinstance(found, exp.Case | exp.If) and not isinstance(found.parent, exp.Case)]


def _choice(argument: exp.Expr) -> exp.Case | exp.If | None:
    """The one CASE (or IF) of an aggregate's argument; ValueError for more than one."""
    choices = _choices(argument)
    if len(choices) > 1:
        raise ValueError(to_duckdb(choices[1]))
    return choices[0] if choices else None


def _branches(choice: exp.Case | exp.If) -> list[tuple[str, exp.Expr]]:
    """Each branch of a CASE or IF: the condition (in SQL) that selects its rows, and its value.
    A row takes the first branch whose condition holds (NULL counts as false), else the ELSE."""
    if isinstance(choice, exp.If):  # IF(p, a, b)
        ifs, default, operand = [choice], choice.args.get("false"), None
    else:
        ifs, default, operand = choice.args.get("ifs") or [], choice.args.get("default"), choice.this
    taken: list[str] = []
    branches = []
    for branch in ifs:
        test = branch.this if operand is None else exp.EQ(this=operand.copy(), expression=branch.this.copy())
        holds = f"COALESCE(({to_duckdb(test)}), FALSE)"
        branches.append((" AND ".join([*(f"NOT {t}" for t in taken), holds]), branch.args["true"]))
        taken.append(holds)
    branches.append((" AND ".join(f"NOT {t}" for t in taken) or "TRUE", default or exp.Null()))
    return branches


def _weighing(aggregate: exp.AggFunc) -> exp.Expr | None:
    """What in an aggregate's argument could weigh one row apart from the rest, or None. COUNT
    counts rows whose argument is not null, which the pod sizes whatever it is; every other
    aggregate must add up (or take the least or most of) a linear function of the row's columns
    (`_nonlinear`). One CASE or IF may choose between such functions: the rows each branch takes
    are sized as a FILTER's are (`_conditions`), so each is a cohort of its own."""
    if isinstance(aggregate, exp.Count) and not isinstance(aggregate.this, exp.Distinct):
        return None
    arguments = aggregate.this.expressions if isinstance(aggregate.this, exp.Distinct) else [aggregate.this]
    for argument in (a for a in arguments if a is not None and not isinstance(a, exp.Star)):
        try:
            choice = _choice(argument)
        except ValueError as more:
            return exp.Var(this=f"a second CASE ({more})")
        if choice is None:
            if (found := _nonlinear(argument)) is not None:
                return found
            continue
        if len(choice.args.get("ifs") or []) >= MAX_CASE_BRANCHES:  # each branch's rows are counted apart
            return exp.Var(this=f"a CASE of more than {MAX_CASE_BRANCHES} branches")
        for _, value in _branches(choice):
            chosen = argument.copy().transform(lambda node, c=choice, v=value: v.copy() if node == c else node)
            if (found := _nonlinear(chosen)) is not None:
                return found
    return None


def _row_reason(tree: exp.Expr) -> str:
    if not isinstance(tree, exp.Select):
        return f"it is a {tree.key.upper()}, not a single SELECT"
    for kind, words in _NOT_AGGREGATE_SHAPES:
        if tree.find(kind) is not None:
            return f"it uses {words}"
    if tree.args.get("distinct") is not None:
        return "it uses SELECT DISTINCT"
    if _renames_columns(tree):  # the group size trusts a column's name to say whether it holds nulls
        return "its table alias renames the columns"
    if any(column.name.lower() == "rowid" for column in tree.find_all(exp.Column)):
        # cohorts are told apart by a 64-bit xor of their row ids' hashes: with rows picked by id,
        # four whose hashes cancel out (found offline) would make two cohorts look the same
        return "it reads the table's row ids (rowid), by which the pod tells cohorts apart"
    hiding = next((p.alias_or_name for p in tree.expressions if p.alias_or_name.lower().startswith(HIDDEN)), None)
    if hiding is not None:  # an aggregate's answer is judged by columns of those names, then stripped
        return f"its output {hiding[:64]!r} is named like the pod's own hidden columns ({HIDDEN}...)"
    aggregates = [node for node in tree.find_all(exp.AggFunc)]
    other = next((a for a in aggregates if not isinstance(a, RELEASED_AGGREGATES) or top_n(a)), None)
    if other is not None:
        return f"{to_duckdb(other)} returns members' own values"
    for aggregate in aggregates:
        if (weighing := _weighing(aggregate)) is not None:
            return (f"{to_duckdb(aggregate)[:80]} weighs rows by {to_duckdb(weighing)[:60]}, which can single one "
                    "out (SUM(CASE WHEN id = 42 THEN age ELSE 0 END) is patient 42's age); pick rows with WHERE or "
                    "FILTER (WHERE ...), whose rows the pod counts, and add up columns, + - and constants")
    sized = sum(len(choice.args.get("ifs") or [choice]) + 1 for aggregate in aggregates
                for choice in _choices(aggregate))
    if len(aggregates) + sized > MAX_SIZED:
        return f"it has the pod count the rows of more than {MAX_SIZED} aggregates and CASE branches"
    if (unknown := unknown_aggregate(tree)) is not None:
        return f"{to_duckdb(unknown)[:80]} is an aggregate the pod cannot size or check"
    filtering = next((c for c in ("having", "qualify") if (part := tree.args.get(c)) and part.find(exp.AggFunc)), None)
    if filtering is not None:  # which cells survive, or are counted as suppressed, would tell what it is of
        return f"its {filtering.upper()} keeps cells by an aggregate before the pod can size it"
    if (unreleased := _unreleased_order(tree)) is not None:
        return f"it orders cells by {to_duckdb(unreleased)[:80]}, an aggregate it does not release"
    if tree.args.get("group") is None and not any(p.find(exp.AggFunc) for p in tree.expressions):
        return "it selects rows, not aggregates"
    return ""


def _order_targets(tree: exp.Select) -> list[tuple[exp.Expr, exp.Expr | None]]:
    """Each ORDER BY key, with the output it names by position or by alias (in any case, as
    DuckDB reads it), or None."""
    order = tree.args.get("order")
    targets: list[tuple[exp.Expr, exp.Expr | None]] = []
    for ordered in order.expressions if order is not None else []:
        key = ordered.this
        position = ordinal(tree, key, "ORDER BY")
        if position is None:
            position = alias_position(tree, key)
        targets.append((key, None if position is None else tree.expressions[position]))
    return targets


def _unreleased_order(tree: exp.Select) -> exp.Expr | None:
    """An ORDER BY key holding an aggregate that is not one of the query's outputs (the order
    of cells by a value nobody sees, MAX(CASE WHEN id = 42 ...), says which cell holds whom)."""
    outputs = [p.this if isinstance(p, exp.Alias) else p for p in tree.expressions]
    return next((key for key, named in _order_targets(tree)
                 if named is None and key not in outputs and key.find(exp.AggFunc)), None)


def _renames_columns(tree: exp.Expr) -> bool:
    """A table whose alias renames its columns, `FROM ehr AS t(a, b)`: `b` is the second column
    whatever its name, and may bear the name of another."""
    return any(isinstance(alias.parent, exp.Table) and alias.columns for alias in tree.find_all(exp.TableAlias))


def read_columns(tree: exp.Expr, dataset_columns: Sequence[str]) -> frozenset[str]:
    """The dataset's columns a query reads: each column named (matched case-insensitively), and
    all of them for a `*` that is not COUNT(*)'s, and for what reads columns without naming them:
    DuckDB's COLUMNS('regex'), a positional `#3`, a table or its alias used as a value (`MAX(t)`,
    `CAST(ehr AS VARCHAR)`: the whole row), and a table whose alias renames its columns
    (`FROM ehr AS t(a, b)`: `b` is the second column, whatever its name); a struct's field reads
    its struct (`info.age` reads `info`, and `age` too should that be a column). A select alias
    that shadows a column name counts as that column — a stricter reading, never a looser one."""
    by_lower = {c.lower(): c for c in dataset_columns}
    tables = table_names(tree)
    read: set[str] = set()
    for column in tree.find_all(exp.Column):
        name = column.name.lower()
        if name in tables and not column.table:
            read.update(dataset_columns)
        for part in (part.name.lower() for part in column.parts):  # a struct's field reads the struct
            if part in by_lower:
                read.add(by_lower[part])
    for star in tree.find_all(exp.Star):
        if not isinstance(star.parent, exp.Count):
            read.update(dataset_columns)
    if _renames_columns(tree) or tree.find(exp.Columns, exp.PositionalColumn) is not None:
        read.update(dataset_columns)
    return frozenset(read)


@per_query
def shape(query: str, dataset_columns: tuple[str, ...]) -> QueryShape:
    tree = parse_statement(query)
    why = _row_reason(tree)
    return QueryShape("sql_rows" if why else "sql_aggregate", read_columns(tree, dataset_columns), why,
                      not why and tree.find(exp.Min, exp.Max) is not None)



@dataclass(frozen=True)
class CohortPlan:
    """How to read the cohorts of an aggregate from the hidden columns `disclosed_query` adds —
    per cell the key values `__fedpod_k{i}`, and per condition j (the first is the whole cell)
    its size `n{j}` and row-id hash xor `x{j}` — and `rows_sql(j)`, which selects one cohort's
    row ids again, with the cell's key values as parameters."""

    keys: int
    conditions: list[str]
    source: str
    where: str
    key_sql: list[str]

    def rows_sql(self, condition: int) -> str:
        keys = "".join(f" AND ({key}) IS NOT DISTINCT FROM ?" for key in self.key_sql)
        return (f"SELECT rowid FROM {self.source} WHERE ({self.where}){keys} AND ({self.conditions[condition]}) "
                "ORDER BY rowid")


def _group_keys(tree: exp.Select) -> list[exp.Expr]:
    """The resolved GROUP BY keys, once ROLLUP, CUBE and GROUPING SETS are refused (their cells
    overlap), and GROUP BY ALL (its keys are not named: each cohort must be selected again by them)."""
    group = tree.args.get("group")
    if group is None:
        return []
    if group.args.get("all") is not None:
        raise ValueError("GROUP BY ALL does not name the keys that select a cell's rows")
    if any(group.args.get(kind) for kind in ("rollup", "cube", "grouping_sets")) or \
            any(isinstance(key, exp.Rollup | exp.Cube | exp.GroupingSets) for key in group.expressions):
        raise ValueError("ROLLUP, CUBE and GROUPING SETS make overlapping cells")
    return group_keys(tree)


def _conditions(tree: exp.Select, non_null: frozenset[str]) -> tuple[list[str], tuple[tuple[int, ...], ...]]:
    """The whole cell, then the rows each aggregate used: its FILTER, and its arguments not null
    (every one of COUNT(DISTINCT a, b)'s, which counts only rows where all are; left out for a
    column the table holds no null in: the same rows as the cell); and the rows each branch of
    an argument's CASE takes (`_weighing`), within its FILTER. Also, per output, the conditions
    its aggregates used."""
    conditions = ["TRUE"]
    uses: list[tuple[int, ...]] = []
    tables = table_names(tree)
    for projection in tree.expressions:
        used: set[int] = set()
        for node in projection.find_all(exp.AggFunc):
            parts = []
            arguments = node.this.expressions if isinstance(node.this, exp.Distinct) else [node.this]
            for argument in arguments:
                if argument is not None and not isinstance(argument, exp.Star) and not (
                        isinstance(argument, exp.Column) and plain_column(argument, tables)
                        and argument.name.lower() in non_null):
                    parts.append(f"({to_duckdb(argument)}) IS NOT NULL")
            within = [f"COALESCE(({to_duckdb(node.parent.expression.this)}), FALSE)"] \
                if isinstance(node.parent, exp.Filter) else []
            regions = [region for argument in arguments if argument is not None
                       and (choice := _choice(argument)) is not None for region, _ in _branches(choice)]
            for condition in [" AND ".join([*parts, *within]) or "TRUE",
                              *(" AND ".join([region, *within]) for region in regions)]:
                if condition not in conditions:
                    conditions.append(condition)
                used.add(conditions.index(condition))
        uses.append(tuple(sorted(used)))
    return conditions, tuple(uses)


def _orders_by_aggregate(tree: exp.Select) -> bool:
    """Whether the cells are ordered by an aggregate (named, by alias or by position)."""
    return any((named or key).find(exp.AggFunc) is not None for key, named in _order_targets(tree))


@dataclass(frozen=True)
class Release:
    """How the pod lets an aggregate's answer out (`suppress_small_groups`): per output, the
    conditions (hidden counts `n{j}`) of the rows its aggregates used; whether a small count
    withholds the whole cell rather than the output's value (when the cells are ordered by an
    aggregate, their order would tell a withheld value); and, for the differencing ledger, the
    cohorts' plan."""

    uses: tuple[tuple[int, ...], ...]
    whole_cells: bool
    cohorts: CohortPlan | None


@per_query
def disclosed_query(query: str, non_null: frozenset[str] = frozenset(),
                    cohorts: bool = True) -> tuple[str, Release]:
    """The aggregate query with its hidden columns: per cell, how many rows each aggregate used
    (by which `suppress_small_groups` judges it: see the module docstring) and, with `cohorts`,
    what describes the cohorts each cell releases — computed in the same scan; and its `Release`.
    `non_null`: lower-case names of columns without nulls. ValueError for a shape whose cohorts
    it cannot describe. Remembered per query (a pure function, whose answer nobody changes):
    rewriting a query costs a pod more than running it on small data."""
    tree = parse_statement(query)
    assert isinstance(tree, exp.Select), "only aggregate queries get a group size"
    conditions, uses = _conditions(tree, non_null)
    hidden: list[exp.Expr] = []
    plan = None
    if cohorts:
        source_node = tree.args.get("from_") or tree.args.get("from")
        if source_node is None:
            raise ValueError("no table to describe")
        where_node = tree.args.get("where")
        keys = _group_keys(tree)
        where = to_duckdb(where_node.this) if where_node is not None else "TRUE"
        plan = CohortPlan(len(keys), conditions, to_duckdb(source_node.this), where, [to_duckdb(k) for k in keys])
        hidden.extend(exp.alias_(key, f"{HIDDEN}k{i}") for i, key in enumerate(keys))
    described = (("n", "COUNT(*)"), ("x", "BIT_XOR(HASH(rowid))")) if cohorts else (("n", "COUNT(*)"),)
    for j, condition in enumerate(conditions):
        within = "" if condition == "TRUE" else f" FILTER (WHERE {condition})"
        for name, aggregate in described:
            hidden.append(exp.alias_(parse_statement(f"SELECT {aggregate}{within}").expressions[0],
                                     f"{HIDDEN}{name}{j}"))
    release = Release(uses, _orders_by_aggregate(tree), plan)
    tree.set("expressions", [*tree.expressions, *hidden])
    return to_duckdb(tree), release


def _small(count: pa.ChunkedArray, min_group_size: int) -> pa.ChunkedArray:
    """Fewer rows than the minimum, none included: were a count of 0 let out where one of 1 is
    withheld, a FILTER naming one patient (`SELECT bmi, COUNT(*) FILTER (WHERE id = 42) ... GROUP
    BY bmi`) would be withheld in just the cell that holds the patient, and tell the bmi."""
    import pyarrow.compute as pc

    return pc.less(count, min_group_size)


def kept_cells(table: pa.Table, min_group_size: int, release: Release) -> pa.ChunkedArray:
    """Per cell, whether it may leave the pod: from at least `min_group_size` rows (and each of
    its aggregates too, where the release withholds whole cells)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if min_group_size <= 1:
        return pa.chunked_array([pa.array([True] * table.num_rows)])
    counts = [name for name in table.column_names if name.startswith(f"{HIDDEN}n")] if release.whole_cells \
        else [f"{HIDDEN}n0"]
    return pc.invert(functools.reduce(pc.or_, [_small(table.column(name), min_group_size) for name in counts]))


def suppress_small_groups(table: pa.Table, min_group_size: int, release: Release) -> tuple[pa.Table, int, int]:
    """The answer as it may leave the pod, how many cells it held back and how many values: a
    cell from fewer than `min_group_size` rows is dropped; in the others, an output whose
    aggregates used fewer rows (a FILTER's, a CASE branch's, the non-null values') is NULL.
    Withholding the value rather than the cell keeps the cell's other outputs (an AVG over a
    column empty in that group beside its COUNT(*)), and is exact in a federated merge, where a
    value from no rows adds nothing anyway. The hidden columns are dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = kept_cells(table, min_group_size, release)
    visible = [name for name in table.column_names if not name.startswith(HIDDEN)]
    columns = [table.column(i) for i, name in enumerate(table.column_names) if not name.startswith(HIDDEN)]
    withheld = 0
    if min_group_size > 1:
        for index, used in enumerate(release.uses[:len(columns)]):
            small = [_small(table.column(f"{HIDDEN}n{j}"), min_group_size) for j in used if j]
            if not small:
                continue
            hidden = functools.reduce(pc.or_, small)
            withheld += pc.sum(pc.and_(hidden, kept)).as_py() or 0
            columns[index] = pc.if_else(hidden, pa.scalar(None, columns[index].type), columns[index])
    answer = pa.Table.from_arrays(columns, names=visible).filter(kept)
    return answer, table.num_rows - answer.num_rows, withheld

