"""fedpod's SQL dialect: DuckDB's, plus backtick identifiers so Bitfount task files run as written.

MySQL's dialect also reads backticks, but it takes "double quoted" text as a string, which
would silently change DuckDB queries; extending DuckDB's tokenizer changes nothing else.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Hashable
from typing import TypeVar

import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import ParseError, TokenError

from fedpod.errors import SqlRejected

T = TypeVar("T")

# sqlglot warns when it falls back to an opaque Command; we refuse those anyway.
logging.getLogger("sqlglot").setLevel(logging.ERROR)


class FedpodSql(DuckDB):
    class Tokenizer(DuckDB.Tokenizer):
        IDENTIFIERS = [*DuckDB.Tokenizer.IDENTIFIERS, "`"]  # noqa: RUF012 - sqlglot's own convention


def ordinal(select: exp.Select, key: exp.Expr, clause: str) -> int | None:
    """The 0-based projection a `GROUP BY 2` or `ORDER BY 2` names, None where the key is not a
    number; a number that names no projection (0, 1.5, one past the last) is refused here, as
    DuckDB would refuse it, rather than picking a projection from the other end."""
    if not isinstance(key, exp.Literal) or key.is_string:
        return None
    count = len(select.expressions)
    if not key.is_int or not 1 <= int(key.this) <= count:
        raise SqlRejected(f"{clause} {key.this} names no selected column: the query selects {count}")
    return int(key.this) - 1


def alias_position(select: exp.Select, name: exp.Expr) -> int | None:
    """The 0-based projection whose alias a bare name (in ORDER BY) names, in any case: DuckDB
    binds it before a column of that name (`SELECT -x AS x ... ORDER BY x` orders by -x)."""
    if isinstance(name, exp.Column) and not name.table:
        for position, projection in enumerate(select.expressions):
            if isinstance(projection, exp.Alias) and projection.alias.lower() == name.name.lower():
                return position
    return None


def table_names(tree: exp.Expr) -> set[str]:
    """The lower-case names the query's tables go by: their own, and their aliases."""
    return {name.lower() for t in tree.find_all(exp.Table) for name in (t.name, t.alias_or_name)}


def plain_column(column: exp.Column, tables: set[str]) -> bool:
    """A column of the table, named on its own or after the table (`ehr.age`, `t.age`), rather
    than a field of a struct column (`info.age`, `ehr.info.age`), which may share a column's name."""
    return not column.args.get("db") and not column.args.get("catalog") and (
        not column.table or column.table.lower() in tables)


def canonical(expression: exp.Expr, tables: set[str]) -> exp.Expr:
    """`expression` with each of the table's columns named alone and in lower case, as DuckDB
    reads them: `ehr.Age` and `age` are one column, which equality of the trees does not see."""
    def plain(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Column) and not isinstance(node.this, exp.Star) and plain_column(node, tables):
            return exp.column(node.name.lower())
        return node

    return expression.transform(plain)


def group_keys(select: exp.Select) -> list[exp.Expr]:
    """Copies of the GROUP BY expressions with ordinals and select aliases resolved to what they
    stand for: the modeller's merge plan and the pod's disclosure plan must agree on the cells."""
    group = select.args.get("group")
    if group is None:
        return []
    aliases: dict[str, exp.Expr] = {}  # in lower case: DuckDB matches unquoted names in any case
    for projection in select.expressions:
        if isinstance(projection, exp.Alias):
            aliases.setdefault(projection.alias.lower(), projection.this)
    keys: list[exp.Expr] = []
    for key in group.expressions:
        if (position := ordinal(select, key, "GROUP BY")) is not None:
            projection = select.expressions[position]
            keys.append(projection.this if isinstance(projection, exp.Alias) else projection)
        elif isinstance(key, exp.Column) and not key.table and key.name.lower() in aliases \
                and aliases[key.name.lower()].find(exp.AggFunc) is None:  # else the column, as DuckDB binds it
            keys.append(aliases[key.name.lower()])
        else:
            keys.append(key)
    return [key.copy() for key in keys]


REMEMBERED_BELOW = 4096  # characters: longer queries are parsed each time, never kept


def parse_statement(query: str) -> exp.Expr:
    """Parse exactly one statement; several statements (`SELECT 1; DROP ...`) are refused.
    A pod reads one query several times (its kind, its disclosure plan, the guard) and a modeller
    sends the same ones again: short texts' trees are kept, and each caller gets its own copy."""
    if len(query) < REMEMBERED_BELOW:
        return _remembered(query).copy()
    return _parse(query)


@functools.lru_cache(maxsize=256)
def _remembered(query: str) -> exp.Expr:
    return _parse(query)


def per_query(function: Callable[..., T]) -> Callable[..., T]:
    """Remember a pure function of a query's text (and further hashable arguments) for texts
    shorter than REMEMBERED_BELOW, as `parse_statement` remembers their trees: a pod judges and
    plans the same query on every task that sends it again, and modellers do. Longer texts are
    never kept, so what a stranger's queries can make a pod hold stays small."""
    remembered = functools.lru_cache(maxsize=256)(function)

    @functools.wraps(function)
    def call(query: str, *args: Hashable, **options: Hashable) -> T:
        if len(query) < REMEMBERED_BELOW:
            return remembered(query, *args, **options)
        return function(query, *args, **options)

    return call


def _parse(query: str) -> exp.Expr:
    try:
        statements = [s for s in sqlglot.parse(query, read=FedpodSql) if s is not None]
    except (ParseError, TokenError) as exc:
        raise SqlRejected(f"query does not parse: {exc}") from exc
    if len(statements) != 1:
        raise SqlRejected(f"expected exactly one statement, got {len(statements)}")
    return statements[0]


def to_duckdb(expression: exp.Expr) -> str:
    return expression.sql(dialect="duckdb")


@functools.cache
def aggregating_functions() -> frozenset[str]:
    """The lower-case names of every function DuckDB computes over a group: its aggregates, and
    the macros that call one (JSON_GROUP_ARRAY is a STRING_AGG, WAVG a WEIGHTED_AVG of SUMs), read
    once from the catalogue of the DuckDB this process runs, whose version decides what exists."""
    import duckdb

    with duckdb.connect() as connection:
        rows = connection.sql("SELECT lower(function_name), function_type, lower(macro_definition) FROM "
                              "duckdb_functions() WHERE function_type IN ('aggregate', 'macro')").fetchall()
    found = {name for name, kind, _ in rows if kind == "aggregate"}
    macros = [(name, body or "") for name, kind, body in rows if kind == "macro"]
    while True:
        calls = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(found))) + r")\s*\(")
        more = {name for name, body in macros if name not in found and calls.search(body)}
        if not more:
            return frozenset(found)
        found |= more


def unknown_aggregate(tree: exp.Expr) -> exp.Anonymous | None:
    """The first call in `tree` to an aggregate sqlglot does not know (HISTOGRAM, FSUM, a macro
    over one...), which neither the pod's disclosure check nor the modeller's merge can plan."""
    known = aggregating_functions()
    return next((call for call in tree.find_all(exp.Anonymous) if call.name.lower() in known), None)


def top_n(aggregate: exp.AggFunc) -> bool:
    """DuckDB's MIN and MAX with a count, `MAX(x, n)`: the n largest members' own values as a
    list — every one of them, for n as big as the group — where sqlglot still reads a MAX."""
    return isinstance(aggregate, exp.Min | exp.Max) and bool(aggregate.args.get("count") or aggregate.expressions)
