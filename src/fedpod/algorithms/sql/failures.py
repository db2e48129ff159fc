"""DuckDB's errors, as a pod may tell them to the modeller who sent the query.

An error about the query — it does not parse, names a column that is not there, calls a
function with the wrong types — says nothing of the data, and its text helps the modeller mend
it. An error raised by a value of the data quotes that value: `Could not convert string 'HIV
positive' to INT32`. A modeller granted aggregates only would read any patient's record one
error at a time (`WHERE id = 42 AND CAST(diagnosis AS INTEGER) = 0`), so such an error leaves
the pod as its kind alone; its text goes to the pod's own log, for the custodian.
"""

from __future__ import annotations

import logging

import duckdb

from fedpod.errors import SqlExecutionError

log = logging.getLogger(__name__)

# raised while DuckDB reads and binds the query (its text and the schema), before any row is read,
# or about sizes only (memory)
TOLD_AS_IS = (duckdb.ParserException, duckdb.SyntaxException, duckdb.BinderException, duckdb.CatalogException,
              duckdb.NotImplementedException, duckdb.PermissionException, duckdb.OutOfMemoryException)


def failure(exc: duckdb.Error, where: str) -> SqlExecutionError:
    """The error to raise for `exc`, which the pod may send to the modeller."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, TOLD_AS_IS):
        return SqlExecutionError(text, where=where)
    log.warning("%s: a query failed on the data, told to its sender without this message: %s", where, text)
    return SqlExecutionError(f"the query failed on a value in the data ({type(exc).__name__}); the pod does not "
                             "send DuckDB's message, which would quote that value", where=where,
                             hint="TRY_CAST, or a CASE around the failing call, keeps one bad value from failing "
                                  "the query; the pod's custodian can read the message in the pod's log")
