"""The modeller's half of federated SQL: naming outputs and merging pods' partial results.

Output names come from DuckDB itself: the original query is bound against an empty table
with the dataset's advertised schema, so the merged result has exactly the column names the
same query would have on the pooled data (and a broken query fails before any pod is asked).

Both steps use one long-lived, locked-down DuckDB database; each call works on its own
cursor, whose temporary tables and registrations are private to it and vanish with it.
Opening a DuckDB database costs tens of milliseconds, which would dominate a federated query.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import duckdb
import pandas as pd
import pyarrow as pa
from sqlglot import exp

from fedpod.algorithms.sql.dialect import parse_statement, to_duckdb
from fedpod.algorithms.sql.federated import PARTIALS, MergePlan
from fedpod.data.datasets import quote_identifier
from fedpod.errors import NotMergeable, SqlExecutionError

if TYPE_CHECKING:
    from fedpod.modeller.discovery import Target

_database: duckdb.DuckDBPyConnection | None = None
_database_lock = threading.Lock()


def _cursor() -> duckdb.DuckDBPyConnection:
    global _database
    with _database_lock:
        if _database is None:
            database = duckdb.connect(":memory:")
            # one thread: a merge reads pods' partials, tens to thousands of rows, for which
            # waking DuckDB's workers costs more than they save (a 60-row merge: 3.8 -> 2.4 ms)
            for setting in ("threads = 1", "python_enable_replacements = false", "enable_external_access = false",
                            "lock_configuration = true"):
                database.execute(f"SET {setting}")
            _database = database
        return _database.cursor()


Schemas = tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (table, ((column, type), ...)), hashable


def output_names(query: str, table: str, columns: dict[str, str],
                 other_tables: dict[str, dict[str, str]] | None = None, partial_sql: str = "") -> list[str]:
    """`other_tables`: the dataset's further tables (an events dataset's static table). With
    `partial_sql`, the pods' part of the query must bind too, or every pod would fail it, each in
    DuckDB's words about the partial: an AVG of dates travels as a SUM, which DuckDB takes of
    numbers only, and a WHERE that names a select alias names what the partial renamed."""
    schemas = tuple((name, tuple(schema.items())) for name, schema in {table: columns, **(other_tables or {})}.items())
    return list(_bound_names(query, schemas, partial_sql))


@functools.lru_cache(maxsize=256)
def _bound_names(query: str, schemas: Schemas, partial_sql: str) -> tuple[str, ...]:
    """Remembered per query and schemas: binding costs a millisecond or two on every query."""
    cursor = _cursor()
    try:
        for name, schema in schemas:
            definition = ", ".join(f"{quote_identifier(n)} {t}" for n, t in schema)
            cursor.execute(f"CREATE TEMP TABLE {quote_identifier(name)} ({definition})")
        try:
            names = tuple(cursor.sql(to_duckdb(parse_statement(query))).columns)
        except duckdb.Error as exc:
            raise SqlExecutionError(f"query does not bind against {schemas[0][0]}'s schema: "
                                    f"{str(exc).splitlines()[0]}") from exc
        if partial_sql:
            try:
                cursor.sql(partial_sql)
            except duckdb.Error as exc:
                raise NotMergeable(partial_sql, f"the pods' part does not bind against {schemas[0][0]}'s schema "
                                   f"({str(exc).splitlines()[0]}); is a select alias named in WHERE (name its "
                                   "expression there), or an AVG, VARIANCE or STDDEV taken of dates or times (they "
                                   "travel as sums: take them of epoch(d))?") from exc
        return names
    finally:
        cursor.close()


def output_names_for(query: str, targets: Iterable[Target], partial_sql: str = "") -> list[str]:
    """`output_names` against the first dataset that advertised its schema; [] when none did
    (pods that do not know this modeller advertise none: their refusals say what to ask for)."""
    described = next((t.dataset for t in targets if t.dataset.columns), None)
    return output_names(query, described.name, described.columns, described.tables, partial_sql) \
        if described else []


def merge(plan: MergePlan, partials: list[pa.Table], names: list[str], sources: list[str] | None = None
          ) -> pd.DataFrame:
    """Run the plan's merge query over the concatenated partial tables (`sources`: the datasets
    they came from, in order, to name them when they disagree)."""
    try:
        combined = pa.concat_tables(partials, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise _disagreement(plan, partials, sources) from exc
    cursor = _cursor()
    try:
        cursor.register(PARTIALS, combined)
        frame: pd.DataFrame = cursor.execute(plan.merge_sql).df()  # one bind; a relation binds twice
    except duckdb.Error as exc:
        raise SqlExecutionError(f"merging partial results failed: {exc}") from exc
    finally:
        cursor.close()
    if plan.mode == "partials":
        frame.columns = pd.Index(names)
    return frame


def _disagreement(plan: MergePlan, partials: list[pa.Table], sources: list[str] | None) -> SqlExecutionError:
    """The datasets answered a column in types that do not merge (one pod's CSV read a code
    column as numbers, another's as text, for a value like "NA"): which column, and each type."""
    projections = parse_statement(plan.partial_sql).expressions
    named = {p.alias: to_duckdb(p.this) for p in projections if isinstance(p, exp.Alias)}
    labels = sources or [f"answer {i + 1}" for i in range(len(partials))]
    for field in partials[0].schema.names:
        types = [str(t.schema.field(field).type) if field in t.schema.names else "none" for t in partials]
        if len(set(types)) > 1:
            column = named.get(field, field)
            typed = ", ".join(f"{label}: {kind}" for label, kind in zip(labels, types, strict=True))
            return SqlExecutionError(f"the datasets answer {column} in types that do not merge ({typed})",
                                     hint=f"CAST it to one type in the query, e.g. CAST({column} AS VARCHAR)")
    return SqlExecutionError("the datasets' answers have columns that do not merge: "
                             + "; ".join(f"{label}: {t.schema}" for label, t in zip(labels, partials, strict=True)))
