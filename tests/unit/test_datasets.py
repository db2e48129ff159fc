from __future__ import annotations

import sqlite3
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from fedpod.algorithms.sql.engine import SqlEngine
from fedpod.data.catalog import inspect
from fedpod.data.datasets import DatasetSpec, round_count
from fedpod.errors import ConfigError

FRAME = pd.DataFrame({"id": [1, 2, 3], "ward": ["icu", "gen", "gen"], "los": [2.5, 1.0, 4.0]})


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    FRAME.to_csv(tmp_path / "v.csv", index=False)
    duckdb.connect().execute(f"COPY (SELECT * FROM FRAME) TO '{tmp_path / 'v.parquet'}' (FORMAT parquet)")
    with sqlite3.connect(tmp_path / "v.db") as connection:
        FRAME.to_sql("visits", connection, index=False)
    return tmp_path


@pytest.mark.parametrize("spec", [
    DatasetSpec(name="v", kind="csv", path="v.csv"),
    DatasetSpec(name="v", kind="parquet", path="v.parquet"),
    DatasetSpec(name="v", kind="sqlite", path="v.db", table="visits"),
], ids=["csv", "parquet", "sqlite"])
def test_every_file_source_is_inspected_and_queryable(sources: Path, spec: DatasetSpec) -> None:
    inspected = inspect(spec, sources)
    assert inspected.rows == 3 and list(inspected.columns) == ["id", "ward", "los"]
    engine = SqlEngine([inspected], sources)
    assert engine.run("SELECT SUM(los) AS s FROM v WHERE ward = 'gen'", "v").to_pydict() == {"s": [5.0]}


def test_missing_file_is_a_config_error_naming_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset v"):
        inspect(DatasetSpec(name="v", kind="csv", path="absent.csv"), tmp_path)


def test_incomplete_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a table"):
        DatasetSpec(name="v", kind="sqlite", path="v.db")
    with pytest.raises(ValueError, match="needs a dsn"):
        DatasetSpec(name="v", kind="postgres", table="t")
    with pytest.raises(ValueError):
        DatasetSpec(name="../etc/passwd", kind="csv", path="x.csv")


@pytest.mark.parametrize(("rows", "advertised"), [(0, 0), (3, 10), (47, 50), (1234, 1200), (987_654, 990_000)])
def test_advertised_row_counts_are_rounded(rows: int, advertised: int) -> None:
    assert round_count(rows) == advertised
