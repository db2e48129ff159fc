"""What a pod's datasets hold — tables, column types, row counts — for discovery and for judging
tasks, read without loading DuckDB into the pod.

An idle pod is mostly its imports: DuckDB, numpy, sqlglot and pyarrow are ~70 of its ~130 MiB.
The pod needs its datasets' schemas from the start (adverts, policy checks on columns) but
DuckDB only when a task runs, so `read_catalog` loads the datasets once in a short-lived child
process (`python -m fedpod.data.catalog`) and the pod's own engine is built on its first task.
A dataset that does not load fails the pod's start-up with the same error as before, raised in
the pod from what the child reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpod import errors
from fedpod.data.datasets import DatasetSpec
from fedpod.errors import ConfigError, FedpodError

if TYPE_CHECKING:
    import duckdb

Schema = tuple[dict[str, str], int]  # column -> type, rows


@dataclass(frozen=True)
class Catalog:
    schemas: dict[str, Schema]  # table -> its schema
    tables: dict[str, list[str]]  # dataset -> the tables its queries may read

    @classmethod
    def of(cls, connection: duckdb.DuckDBPyConnection, datasets: list[DatasetSpec]) -> Catalog:
        """The catalog of datasets already loaded in `connection`."""
        from fedpod.data.datasets import describe

        return cls({table: describe(connection, table) for spec in datasets for table in spec.tables},
                   {spec.name: spec.tables for spec in datasets})

    def columns_of(self, dataset: str) -> list[str]:
        """Every column a query on `dataset` may read, over all of its tables."""
        return list(dict.fromkeys(c for table in self.tables[dataset] for c in self.schemas[table][0]))

    def to_json(self) -> dict[str, Any]:
        return {"schemas": {t: [columns, rows] for t, (columns, rows) in self.schemas.items()}, "tables": self.tables}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Catalog:
        return cls({t: (dict(columns), int(rows)) for t, (columns, rows) in data["schemas"].items()},
                   {d: list(tables) for d, tables in data["tables"].items()})


def read_catalog(datasets: list[DatasetSpec], base: Path) -> Catalog:
    """Load `datasets` in a child process and return what they hold; raises the error the child
    met (a missing file, an unreadable table) as the pod's own."""
    request = json.dumps({"base": str(base), "datasets": [spec.model_dump(mode="json") for spec in datasets]})
    done = subprocess.run([sys.executable, "-m", "fedpod.data.catalog"], input=request, capture_output=True,
                          text=True, check=False)
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ConfigError(f"reading the datasets failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}",
                          where="pod start-up") from None
    if "error" in answer:
        failure = answer["error"]
        kind = getattr(errors, failure["kind"], ConfigError)
        raise (kind if isinstance(kind, type) and issubclass(kind, FedpodError) else ConfigError)(
            failure["message"], where=failure["where"], hint=failure["hint"])
    return Catalog.from_json(answer)


def load_catalog(datasets: list[DatasetSpec], base: Path) -> Catalog:
    """Load `datasets` in this process (the child's work, and `inspect`'s) and return what they
    hold; a dataset DuckDB cannot read is a ConfigError naming it."""
    import duckdb

    from fedpod.data.datasets import load_dataset

    connection = duckdb.connect(":memory:")
    try:
        for spec in datasets:
            try:
                load_dataset(connection, spec, base)
            except duckdb.Error as exc:
                raise ConfigError(f"cannot read dataset: {exc}", where=f"dataset {spec.name}") from exc
        return Catalog.of(connection, datasets)
    finally:
        connection.close()


def inspect(spec: DatasetSpec, base: Path) -> DatasetSpec:
    """`spec` with its schema and row count, from loading it once (for `fedpod dataset add`)."""
    catalog = load_catalog([spec], base)
    columns, rows = catalog.schemas[spec.name]
    static_columns, static_rows = catalog.schemas[spec.static_table] if spec.static_table else ({}, 0)
    return spec.model_copy(update={"columns": columns, "rows": rows, "static_columns": static_columns,
                                   "static_rows": static_rows})


def main() -> None:
    try:
        request = json.loads(sys.stdin.read())
        answer = load_catalog([DatasetSpec.model_validate(spec) for spec in request["datasets"]],
                              Path(request["base"])).to_json()
    except FedpodError as exc:
        answer = {"error": {"kind": type(exc).__name__, "message": exc.message, "where": exc.where, "hint": exc.hint}}
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
