from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from fedpod.algorithms.sql.engine import SqlEngine
from fedpod.data.datasets import DatasetSpec
from fedpod.errors import SqlExecutionError, SqlRejected, TaskTimeout

DATASET = "ehr-records-2025"


@pytest.fixture
def engine(tmp_path: Path) -> SqlEngine:
    pd.DataFrame({"age": range(100), "sex": ["F", "M"] * 50}).to_csv(tmp_path / "ehr.csv", index=False)
    pd.DataFrame({"secret": [42]}).to_csv(tmp_path / "other.csv", index=False)
    return SqlEngine([DatasetSpec(name=DATASET, type="csv", path="ehr.csv"),
                      DatasetSpec(name="other", type="csv", path="other.csv")], tmp_path)


def test_registered_dataset_is_queryable_with_backticks(engine: SqlEngine) -> None:
    table = engine.run(f"SELECT sex, COUNT(*) AS n FROM `{DATASET}` GROUP BY sex ORDER BY sex", DATASET)
    assert table.to_pydict() == {"sex": ["F", "M"], "n": [50, 50]}


@pytest.mark.parametrize(("query", "rows"), [
    (f"SELECT sex FROM `{DATASET}` WHERE age < 2 ORDER BY sex COLLATE NOCASE DESC", [{"sex": "M"}, {"sex": "F"}]),
    (f"SELECT COLUMNS('s.x') FROM `{DATASET}` WHERE age = 0", [{"sex": "F"}]),
    (f"SELECT * LIKE 'a%' FROM `{DATASET}` WHERE age = 1", [{"age": 1}]),
    (f"SELECT * ILIKE 'S%' FROM `{DATASET}` WHERE age = 1", [{"sex": "M"}]),
    (f"SELECT MAX(COLUMNS(['age'])) FROM `{DATASET}`", [{"age": 99}]),
])
def test_what_needs_the_columns_to_bind_runs(engine: SqlEngine, query: str, rows: list[dict[str, object]]) -> None:
    """DuckDB's table check binds against no catalog, and failed these: 'DuckDB cannot read the query'."""
    assert engine.run(query, DATASET).to_pylist() == rows


MALICIOUS = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_parquet('http://127.0.0.1:1/x.parquet')",
    "COPY (SELECT * FROM `ehr-records-2025`) TO '/tmp/leak.csv'",
    "ATTACH '/tmp/x.db' AS x",
    "PRAGMA database_list",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "CREATE TABLE x AS SELECT 1",
    "DROP TABLE `ehr-records-2025`",
    "INSERT INTO `ehr-records-2025` VALUES (1, 'F')",
    "DELETE FROM `ehr-records-2025`",
    "UPDATE `ehr-records-2025` SET age = 0",
    "SELECT 1; DROP TABLE `ehr-records-2025`",
    "SELECT * FROM other",
    "SELECT * FROM `ehr-records-2025` JOIN other ON true",
    "SELECT (SELECT secret FROM other)",
    "WITH o AS (SELECT * FROM other) SELECT * FROM o",
    "SELECT * FROM duckdb_tables()",
    "SELECT current_setting('enable_external_access')",
    "SELECT getenv('HOME')",
    "SELECT * FROM main.other",
    "SELECT * FROM query('SELECT * FROM other')",
    # what the table check sees without columns' names must still show it the other table
    f"SELECT * LIKE (SELECT 'a%' FROM other) FROM `{DATASET}`",
    f"SELECT COLUMNS((SELECT 'a.' FROM other)) FROM `{DATASET}`",
    f"SELECT sex COLLATE NOCASE FROM `{DATASET}`, other",
    "EXPORT DATABASE '/tmp/x'",
    "DESCRIBE other",
]


@pytest.mark.parametrize("query", MALICIOUS)
def test_malicious_query_is_refused(engine: SqlEngine, query: str) -> None:
    with pytest.raises((SqlRejected, SqlExecutionError)):
        engine.run(query, DATASET)
    assert engine.run(f"SELECT COUNT(*) AS n FROM `{DATASET}`", DATASET).to_pydict() == {"n": [100]}


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT read_text('/etc/passwd')",
    "COPY (SELECT 1) TO '/tmp/fedpod-leak.csv'",
    "ATTACH '/tmp/fedpod-x.db'",
    "SET enable_external_access = true",
    "SET python_enable_replacements = true",
    "INSTALL httpfs",
])
def test_duckdb_lock_holds_even_without_the_guard(engine: SqlEngine, query: str) -> None:
    """The guard is one lock; DuckDB's disabled external access and locked configuration
    must hold on their own."""
    cursor = engine._connection.cursor()
    with pytest.raises(duckdb.Error):
        cursor.execute(query).fetchall()


def test_python_variables_are_unreachable(engine: SqlEngine) -> None:
    secret_frame = pd.DataFrame({"s": [1]})  # noqa: F841 - a replacement scan would find it
    with pytest.raises(duckdb.Error):
        engine._connection.cursor().execute("SELECT * FROM secret_frame").fetchall()


def test_runaway_query_is_interrupted(engine: SqlEngine) -> None:
    slow = (f"SELECT SUM(a.age * b.age + c.age * d.age - e.age * f.age) FROM `{DATASET}` a, `{DATASET}` b, "
            f"`{DATASET}` c, `{DATASET}` d, `{DATASET}` e, `{DATASET}` f")
    with pytest.raises(TaskTimeout, match="stopped"):
        engine.run(slow, DATASET, timeout_s=0.3)


def test_a_result_over_max_rows_is_refused_not_truncated(engine: SqlEngine) -> None:
    from fedpod.errors import ResultTooLarge

    with pytest.raises(ResultTooLarge, match="more than 2 rows"):
        engine.run(f"SELECT * FROM `{DATASET}`", DATASET, max_rows=2)


@pytest.mark.parametrize("condition", [
    "CAST(sex AS INTEGER) = 0",  # Could not convert string 'M' to INT32
    "sex::DATE IS NULL",
    "error(sex || '!') IS NULL",  # the value itself as the message
    "json_extract(sex, '$') IS NULL",
    "strptime(sex, '%Y') IS NULL",
    "CAST(age + 1000 AS UTINYINT) > 0",  # ... with value 1041 can't be cast
])
def test_an_error_raised_by_a_value_does_not_quote_it(engine: SqlEngine, condition: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Its kind is told; its text, which quotes the value, goes to the pod's log only."""
    with pytest.raises(SqlExecutionError, match=r"failed on a value in the data \(\w+Exception\)") as failed:
        engine.run(f"SELECT COUNT(*) AS n FROM `{DATASET}` WHERE age = 41 AND {condition}", DATASET)
    assert not any(value in str(failed.value) for value in ("'M'", "M!", '"M"', "1041")), failed.value
    assert any(value in caplog.text for value in ("'M'", "M!", '"M"', "1041")), caplog.text


@pytest.mark.parametrize(("query", "told"), [
    (f"SELECT nope FROM `{DATASET}`", 'Referenced column "nope" not found'),
    (f"SELECT age + sex FROM `{DATASET}`", "Binder Error"),
    (f"SELECT SUM(sex) FROM `{DATASET}`", r"No function matches .*sum\(VARCHAR\)"),
])
def test_an_error_about_the_query_is_told_as_duckdb_says_it(engine: SqlEngine, query: str, told: str) -> None:
    with pytest.raises((SqlExecutionError, SqlRejected), match=told):
        engine.run(query, DATASET)
