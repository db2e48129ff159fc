"""Decide whether a query is a single read-only SELECT over the allowed tables.

This is the first of three locks (the second is DuckDB's own parser naming the tables, the
third is the engine's disabled external access): each is meant to hold on its own.
"""

from __future__ import annotations

from sqlglot import exp

from fedpod.algorithms.sql.dialect import parse_statement
from fedpod.errors import SqlRejected

# Function-name prefixes that reach files, the network, settings or the catalogue.
_FORBIDDEN_FUNCTION_PREFIXES = (
    "read_", "glob", "parquet_", "sniff_csv", "query", "getenv", "current_setting", "duckdb_",
    "pragma_", "iceberg_", "delta_", "sqlite_", "postgres_", "mysql_", "http", "load", "install",
    "which_secret", "copy", "export", "import", "attach", "checkpoint", "set_", "json_execute",
)
_QUERY_TYPES = (exp.Select, exp.Union, exp.Intersect, exp.Except, exp.Subquery)
_WRITE_OR_ADMIN = (
    exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Command, exp.Copy,
    exp.Merge, exp.Pragma, exp.Set, exp.Use, exp.Attach, exp.Detach, exp.Export, exp.Install,
    exp.TruncateTable, exp.Transaction, exp.Commit, exp.Rollback, exp.LoadData, exp.Describe, exp.Show,
)


def _function_name(node: exp.Func) -> str:
    return (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()


def check_read_only(query: str, allowed_tables: set[str]) -> exp.Expr:
    """Return the parsed query, or raise SqlRejected naming the first offending construct."""
    tree = parse_statement(query)
    if not isinstance(tree, _QUERY_TYPES):
        raise SqlRejected(f"only SELECT queries are allowed, not {tree.key.upper()}")
    for node in tree.walk():
        if isinstance(node, _WRITE_OR_ADMIN):
            raise SqlRejected(f"{node.key.upper()} is not allowed inside a query")
        if isinstance(node, exp.Func):
            name = _function_name(node)
            if name.startswith(_FORBIDDEN_FUNCTION_PREFIXES):
                raise SqlRejected(f"function {name}() is not allowed: it reaches outside the dataset")
    cte_names = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    allowed = {t.lower() for t in allowed_tables}
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            raise SqlRejected(f"table expression {table.sql()!r} is not allowed; name a dataset")
        if table.args.get("db") or table.args.get("catalog"):
            raise SqlRejected(f"qualified table {table.sql()!r} is not allowed; name the dataset only")
        if table.name in cte_names:
            continue
        if table.name.lower() not in allowed:
            raise SqlRejected(f"table {table.name!r} is not a dataset of this task",
                              hint=f"query {', '.join(sorted(allowed_tables))}")
    return tree
