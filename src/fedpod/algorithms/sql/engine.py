"""A pod's SQL engine: one in-memory DuckDB holding the pod's datasets, locked down.

Lock-down order matters (see FIELD-NOTES): load every dataset, switch off Python
replacement scans (untrusted SQL could otherwise read the pod process's variables), disable
external access, then lock the configuration so no query can switch anything back.
Each query runs on its own cursor with a deadline enforced by `interrupt()`, because DuckDB
has no statement timeout of its own.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
from sqlglot import exp

from fedpod.algorithms.sql.dialect import to_duckdb
from fedpod.algorithms.sql.disclosure import SKETCH
from fedpod.algorithms.sql.failures import failure
from fedpod.algorithms.sql.guard import check_read_only
from fedpod.algorithms.sql.watchdog import Watchdog
from fedpod.data.catalog import Catalog
from fedpod.data.datasets import DatasetSpec, load_dataset, quote_identifier
from fedpod.errors import ResultTooLarge, SqlExecutionError, SqlRejected, TaskTimeout

if TYPE_CHECKING:
    import pyarrow as pa


def _without_using(tree: exp.Expr) -> str:
    """The query for DuckDB's own table check, with what needs the columns' names or types
    written without them: `JOIN ... USING (...)` as `ON TRUE`, parameters as NULL, `x COLLATE
    NOCASE` as x, COLUMNS('regex') as COLUMNS(*) and `* LIKE 'g%'` as `*`. That check binds
    against no catalog and fails on each of them, and which tables a query reads depends on none.
    What is dropped holds no query of its own, or the check would no longer see its tables."""
    copy = tree.copy()
    for placeholder in list(copy.find_all(exp.Placeholder)):  # that check prepares nothing
        placeholder.replace(exp.Null())
    for join in copy.find_all(exp.Join):
        if join.args.get("using"):
            join.set("using", None)
            join.set("on", exp.true())

    def plain(dropped: exp.Expr | None) -> bool:
        return dropped is None or dropped.find(exp.Query, exp.Table) is None

    for collate in list(copy.find_all(exp.Collate)):
        if plain(collate.expression):
            collate.replace(collate.this)
    for columns in list(copy.find_all(exp.Columns)):
        if plain(columns.this):
            columns.set("this", exp.Star())
    for star in list(copy.find_all(exp.Star)):
        if plain(star.args.get("ilike")):
            star.set("ilike", None)
        if isinstance(star.parent, exp.Like | exp.SimilarTo) and star.arg_key == "this" \
                and plain(star.parent.expression):
            star.parent.replace(star)
    return to_duckdb(copy)


REMEMBERED_QUERIES = 256
# A statement run with execute() and read as Arrow: one parse and one bind, where a relation
# (con.sql(...)) binds on creation and again to run, about 2 ms of a 1,000,000-row aggregate's 7
# (benchmarks/sql). DuckDB warns that the rows are copied once more; an answer is at most the
# pod's max_result_rows and max_result_bytes, so the copy costs less than the binding did.
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning,
                        module=r"fedpod\.algorithms\.sql\.engine")


class SqlEngine:
    def __init__(self, datasets: list[DatasetSpec], base: Path, *, memory_limit: str | None = None) -> None:
        self._connection = duckdb.connect(":memory:")
        self._vetted: dict[tuple[str, frozenset[str]], str] = {}  # (query, its tables) -> SQL as DuckDB runs it
        self._remember = threading.Lock()
        self._watchdog = Watchdog()
        self.datasets = {spec.name: spec for spec in datasets}
        for spec in datasets:
            load_dataset(self._connection, spec, base)
        self.catalog = Catalog.of(self._connection, datasets)
        # per dataset, what its rows are (for ledgers keyed by row ids: governance.differencing)
        # and the columns without a null (lower case), from one scan of each table
        self.versions: dict[str, str] = {}
        self.non_null: dict[str, frozenset[str]] = {}
        for spec in datasets:
            self.versions[spec.name], self.non_null[spec.name] = self._profile(spec.tables)
        # datasets with a column named rowid, which hides DuckDB's row ids from every query: the
        # differencing ledger, which describes cohorts by them, cannot check their aggregates
        self.rowid_hidden = {spec.name for spec in datasets for table in spec.tables
                             if "rowid" in (c.lower() for c in self.catalog.schemas[table][0])}
        self._connection.execute("SET python_enable_replacements = false")
        if memory_limit:
            self._connection.execute(f"SET memory_limit = '{memory_limit}'")
        self._connection.execute("SET enable_external_access = false")
        self._connection.execute("SET lock_configuration = true")

    def _profile(self, tables: list[str]) -> tuple[str, frozenset[str]]:
        digests: list[str] = []
        names: set[str] = set()
        nullable: set[str] = set()
        for table in tables:
            columns = list(self.catalog.schemas[table][0])
            nulls = "".join(f", COUNT(*) - COUNT({quote_identifier(c)})" for c in columns)
            row = self._connection.execute(f"SELECT COUNT(*), BIT_XOR(HASH(t)){nulls} FROM "
                                           f"{quote_identifier(table)} t").fetchone() or ()
            digests.append(f"{row[0]}:{row[1]}")
            names.update(c.lower() for c in columns)
            nullable.update(c.lower() for c, count in zip(columns, row[2:], strict=True) if count)
        return hashlib.sha256("|".join(digests).encode()).hexdigest()[:16], frozenset(names - nullable)

    def row_ids(self, sql: str, params: list[object], dataset: str, *,
                timeout_s: float = 60.0) -> tuple[np.ndarray, int]:
        """The row ids an internal cohort query selects (`disclosure.CohortPlan.rows_sql`, built
        from an aggregate this engine already accepted), as int64, and the xor of their hashes:
        with their count, what the answer said of the cohort, if the query selects it again."""
        found = self._internal(f"SELECT rowid, HASH(rowid) AS h FROM ({sql})", params, dataset, timeout_s)
        hashes = np.asarray(found["h"], dtype=np.uint64)
        return np.asarray(found["rowid"], dtype=np.int64), int(np.bitwise_xor.reduce(hashes, initial=np.uint64(0)))

    def sketch(self, sql: str, params: list[object], dataset: str, *,
               timeout_s: float = 60.0) -> tuple[list[int], int, int]:
        """The SKETCH smallest row-id hashes of the cohort `sql` selects, their count and their
        xor (see `row_ids`)."""
        found = self._internal(f"SELECT MIN(HASH(rowid), {SKETCH}) AS sketch, COUNT(*) AS n, "
                               f"COALESCE(BIT_XOR(HASH(rowid)), 0) AS x FROM ({sql})", params, dataset, timeout_s)
        smallest = found["sketch"][0]
        return [int(h) for h in (smallest if smallest is not None else [])], int(found["n"][0]), int(found["x"][0])

    def _internal(self, sql: str, params: list[object], dataset: str, timeout_s: float) -> dict[str, Any]:
        cursor = self._connection.cursor()
        try:
            with self._watchdog.deadline(timeout_s, cursor.interrupt):
                return dict(cursor.execute(sql, params).fetchnumpy())
        except duckdb.InterruptException as exc:
            raise TaskTimeout(f"a cohort query ran longer than {timeout_s}s", where=f"dataset {dataset}") from exc
        except duckdb.Error as exc:
            raise failure(exc, f"dataset {dataset}") from exc
        finally:
            cursor.close()

    def _vet(self, query: str, allowed: frozenset[str]) -> str:
        """The query as DuckDB runs it, once the guard passed it (`check_read_only`) and DuckDB's
        own parser finds no table but `allowed` in it (a second opinion on sqlglot's).
        Remembered per text, as a database keeps plans: on small data, reading a query costs
        more than running it, and modellers send the same ones again."""
        key = (query, allowed)
        known = self._vetted.get(key)
        if known is not None:
            return known
        tree = check_read_only(query, set(allowed))
        cursor = self._connection.cursor()
        try:
            referenced = cursor.get_table_names(_without_using(tree))
        except duckdb.Error as exc:
            raise SqlExecutionError(f"DuckDB cannot read the query: {exc}") from exc
        finally:
            cursor.close()
        stray = {name for name in referenced if name.lower() not in {t.lower() for t in allowed}}
        if stray:
            raise SqlRejected(f"query references {sorted(stray)}, which are not this task's dataset")
        vetted = to_duckdb(tree)
        with self._remember:
            if len(self._vetted) >= REMEMBERED_QUERIES:
                self._vetted.pop(next(iter(self._vetted)))
            self._vetted[key] = vetted
        return vetted

    def close(self) -> None:
        self._watchdog.stop()
        self._connection.close()

    def run(self, query: str, dataset: str, *, timeout_s: float = 60.0, max_rows: int | None = None,
            cap_rows: int | None = None, params: list[object] | None = None) -> pa.Table:
        """Run a read-only query that may reference only `dataset`; returns an Arrow table.
        With `max_rows`, at most that many rows are ever materialised: a bigger answer is
        refused (ResultTooLarge) rather than cut, because a silently truncated result would
        be taken for the whole one. `cap_rows` (a disclosure limit, which the caller reports)
        returns at most one row more than the cap, so that the caller can tell it was hit.
        `params` fill the query's `?` placeholders (long value lists the pod builds itself)."""
        if dataset not in self.datasets:
            raise SqlRejected(f"unknown dataset {dataset!r}")
        duckdb_sql = self._vet(query, frozenset(self.catalog.tables[dataset]))
        capped = cap_rows is not None and (max_rows is None or cap_rows < max_rows)
        limit = cap_rows if capped else max_rows
        if limit is not None:  # one statement: a relation's .limit() parsed and bound the query twice more
            duckdb_sql = f"SELECT * FROM ({duckdb_sql}) LIMIT {int(limit) + 1}"
        cursor = self._connection.cursor()
        try:
            with self._watchdog.deadline(timeout_s, cursor.interrupt):
                table: pa.Table = cursor.execute(duckdb_sql, params).to_arrow_table()
        except duckdb.InterruptException as exc:
            raise TaskTimeout(f"query ran longer than {timeout_s}s and was stopped",
                              where=f"dataset {dataset}") from exc
        except duckdb.Error as exc:
            raise failure(exc, f"dataset {dataset}") from exc
        finally:
            cursor.close()
        if not capped and max_rows is not None and table.num_rows > max_rows:
            raise ResultTooLarge(f"the query returns more than {max_rows:,} rows, this pod's max_result_rows",
                                 where=f"dataset {dataset}",
                                 hint="aggregate, add a LIMIT, or ask the custodian to raise max_result_rows")
        return table
