"""Dataset specifications and loading them into DuckDB.

Every source is loaded into an in-memory DuckDB table named after the dataset *before* the
engine is locked (see `fedpod.algorithms.sql.engine`), so that queries never need file or
network access. SQLite and PostgreSQL are read through Python's drivers rather than DuckDB
extensions, which would have to be downloaded at run time.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedpod.errors import ConfigError
from fedpod.names import NAME_PATTERN

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

DatasetKind = Literal["csv", "parquet", "sqlite", "postgres", "events"]
STATIC_SUFFIX = "_static"


class DatasetSpec(BaseModel):
    """One dataset as written in the pod config. `columns` and `rows` are inferred by
    `fedpod dataset add` and refreshed whenever the pod starts.

    An `events` dataset is a long event table (`path`: CSV or Parquet; one row per patient,
    time and code) and optionally a static table of one row per patient (`static`). SQL sees
    them as two tables: the dataset's name, and that name + `_static`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    tags: list[str] = []
    kind: DatasetKind = Field(alias="type")
    path: str | None = None
    dsn: str | None = None
    table: str | None = None
    description: str = ""
    columns: dict[str, str] = {}
    rows: int = 0
    static: str | None = None
    id_column: str = "patient_id"
    time_column: str = "timestamp"
    code_column: str = "code"
    value_column: str | None = "value"
    code_map: dict[str, str] = {}  # events: local code -> shared code, applied on load (before any count)
    static_columns: dict[str, str] = {}
    static_rows: int = 0

    @model_validator(mode="after")
    def _source_is_complete(self) -> DatasetSpec:
        if self.kind in ("csv", "parquet", "sqlite", "events") and not self.path:
            raise ValueError(f"dataset {self.name!r} of type {self.kind} needs a path")
        if self.kind == "postgres" and not self.dsn:
            raise ValueError(f"dataset {self.name!r} of type postgres needs a dsn")
        if self.kind in ("sqlite", "postgres") and not self.table:
            raise ValueError(f"dataset {self.name!r} of type {self.kind} needs a table")
        return self

    def resolved_path(self, base: Path, value: str | None = None) -> Path:
        chosen = value or self.path
        assert chosen is not None
        path = Path(chosen)
        return path if path.is_absolute() else base / path

    @property
    def static_table(self) -> str | None:
        return f"{self.name}{STATIC_SUFFIX}" if self.kind == "events" and self.static else None

    @property
    def tables(self) -> list[str]:
        """The SQL tables of this dataset: its own, and an events dataset's static table."""
        return [self.name] + ([self.static_table] if self.static_table else [])


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _read_external_table(spec: DatasetSpec, base: Path) -> pd.DataFrame:
    import pandas as pd

    assert spec.table is not None
    if spec.kind == "sqlite":
        path = spec.resolved_path(base)
        if not path.exists():
            raise ConfigError(f"SQLite file {path} does not exist", where=f"dataset {spec.name}")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as lite:
            return pd.read_sql_query(f"SELECT * FROM {quote_identifier(spec.table)}", lite)
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(spec.dsn or "", connect_timeout=10) as pg:
            cursor = pg.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(*spec.table.split(".", 1))))
            names = [d.name for d in cursor.description or []]
            return pd.DataFrame(cursor.fetchall(), columns=names)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot read PostgreSQL table {spec.table}: {exc}".strip(),
                          where=f"dataset {spec.name}") from exc


def _load_file(connection: duckdb.DuckDBPyConnection, table: str, path: Path, dataset: str,
               required: list[str]) -> None:
    if not path.exists():
        raise ConfigError(f"file {path} does not exist", where=f"dataset {dataset}")
    reader = "read_parquet" if path.suffix.lower() in (".parquet", ".pq") else "read_csv"
    connection.execute(f"CREATE OR REPLACE TABLE {quote_identifier(table)} AS SELECT * FROM {reader}(?)", [str(path)])
    present = {row[0] for row in connection.execute(f"DESCRIBE {quote_identifier(table)}").fetchall()}
    missing = [c for c in required if c not in present]
    if missing:
        raise ConfigError(f"{path.name} has no column(s) {missing} (it has {sorted(present)})",
                          where=f"dataset {dataset}", hint="name the columns with --id-column, --time-column, "
                          "--code-column and --value-column")


def load_dataset(connection: duckdb.DuckDBPyConnection, spec: DatasetSpec, base: Path) -> None:
    """Create table `spec.name` (and an events dataset's static table) in `connection`."""
    target = quote_identifier(spec.name)
    if spec.kind == "events":
        required = [spec.id_column, spec.time_column, spec.code_column, *([spec.value_column] if spec.value_column
                                                                           else [])]
        _load_file(connection, spec.name, spec.resolved_path(base), spec.name, required)
        if spec.code_map:
            code = quote_identifier(spec.code_column)
            connection.execute("CREATE TEMP TABLE __fedpod_code_map (local VARCHAR, shared VARCHAR)")
            connection.executemany("INSERT INTO __fedpod_code_map VALUES (?, ?)", list(spec.code_map.items()))
            connection.execute(f"UPDATE {target} SET {code} = m.shared FROM __fedpod_code_map m "
                               f"WHERE CAST({target}.{code} AS VARCHAR) = m.local")
            connection.execute("DROP TABLE __fedpod_code_map")
        if spec.static_table:
            _load_file(connection, spec.static_table, spec.resolved_path(base, spec.static), spec.name,
                       [spec.id_column])
        return
    if spec.kind in ("csv", "parquet"):
        path = spec.resolved_path(base)
        if not path.exists():
            raise ConfigError(f"file {path} does not exist", where=f"dataset {spec.name}")
        reader = "read_csv" if spec.kind == "csv" else "read_parquet"
        connection.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT * FROM {reader}(?)", [str(path)])
        return
    frame = _read_external_table(spec, base)
    connection.register("__fedpod_load", frame)
    try:
        connection.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT * FROM __fedpod_load")
    finally:
        connection.unregister("__fedpod_load")


def describe(connection: duckdb.DuckDBPyConnection, name: str) -> tuple[dict[str, str], int]:
    """Column types and row count of a loaded dataset."""
    target = quote_identifier(name)
    columns = {row[0]: row[1] for row in connection.execute(f"DESCRIBE {target}").fetchall()}
    count_row = connection.execute(f"SELECT count(*) FROM {target}").fetchone()
    rows = int(count_row[0]) if count_row else 0
    return columns, rows


def round_count(rows: int) -> int:
    """Advertised row counts are rounded (two significant digits, at least tens) so that
    discovery does not reveal exact cohort sizes."""
    if rows <= 0:
        return 0
    magnitude = max(10, 10 ** (len(str(rows)) - 2))
    return int(max(magnitude, round(rows / magnitude) * magnitude))
