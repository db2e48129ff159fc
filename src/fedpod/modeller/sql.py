"""The modeller's half of federated SQL: naming outputs and merging pods' partial results.

Output names come from DuckDB itself: the original query is bound against an empty table
with the dataset's advertised schema, so the merged result has exactly the column names the
same query would have on the pooled data (and a broken query fails before any pod is asked).
"""

from __future__ import annotations

import duckdb
import pandas as pd
import pyarrow as pa

from fedpod.algorithms.sql.dialect import parse_statement, to_duckdb
from fedpod.algorithms.sql.federated import PARTIALS, MergePlan
from fedpod.data.datasets import quote_identifier
from fedpod.errors import SqlExecutionError


def output_names(query: str, table: str, columns: dict[str, str]) -> list[str]:
    connection = duckdb.connect(":memory:")
    try:
        definition = ", ".join(f"{quote_identifier(n)} {t}" for n, t in columns.items())
        connection.execute(f"CREATE TABLE {quote_identifier(table)} ({definition})")
        for setting in ("python_enable_replacements = false", "enable_external_access = false",
                        "lock_configuration = true"):
            connection.execute(f"SET {setting}")
        relation = connection.sql(to_duckdb(parse_statement(query)))
        return list(relation.columns)
    except duckdb.Error as exc:
        raise SqlExecutionError(f"query does not bind against {table}'s schema: {str(exc).splitlines()[0]}") from exc
    finally:
        connection.close()


def merge(plan: MergePlan, partials: list[pa.Table], names: list[str]) -> pd.DataFrame:
    """Run the plan's merge query over the concatenated partial tables."""
    combined = pa.concat_tables(partials, promote_options="permissive")
    connection = duckdb.connect(":memory:")
    try:
        connection.register(PARTIALS, combined)
        frame: pd.DataFrame = connection.sql(plan.merge_sql).df()
    except duckdb.Error as exc:
        raise SqlExecutionError(f"merging partial results failed: {exc}") from exc
    finally:
        connection.close()
    if plan.mode == "partials":
        frame.columns = pd.Index(names)
    return frame
