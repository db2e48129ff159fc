from __future__ import annotations

import itertools

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpod.algorithms.sql.dialect import parse_statement, to_duckdb
from fedpod.algorithms.sql.disclosure import disclosed_query
from fedpod.algorithms.sql.federated import plan_merge
from fedpod.errors import NotMergeable, SqlExecutionError, SqlRejected
from fedpod.modeller.sql import merge, output_names

TABLE = "ehr"
SCHEMA = {"g1": "INTEGER", "g2": "VARCHAR", "x": "INTEGER", "y": "DOUBLE"}
AGGREGATES = ["COUNT(*)", "COUNT(x)", "SUM(x)", "AVG(y)", "AVG(x)", "MIN(y)", "MAX(x)", "MIN(g2)",
              "VAR_SAMP(y)", "VARIANCE(x)", "STDDEV(y)", "STDDEV_SAMP(x)", "VAR_POP(y)", "STDDEV_POP(x)",
              "COUNT(*) FILTER (WHERE x > 0)", "SUM(x * 2 + 1)", "ROUND(AVG(y), 3)", "SUM(x) / COUNT(*)"]


def frame(rows: list[tuple[int | None, str | None, int | None, float | None]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(SCHEMA))
    return df.astype({"g1": "Int32", "x": "Int64", "y": "Float64", "g2": "object"})


def run_on(df: pd.DataFrame, sql: str) -> pa.Table:
    con = duckdb.connect()
    con.register("src", df)
    con.execute(f'CREATE TABLE "{TABLE}" ({", ".join(f"{k} {v}" for k, v in SCHEMA.items())})')
    con.execute(f'INSERT INTO "{TABLE}" SELECT * FROM src')
    return con.sql(to_duckdb(parse_statement(sql))).to_arrow_table()


def federated(parts: list[pd.DataFrame], query: str) -> pd.DataFrame:
    plan = plan_merge(query)
    return merge(plan, [run_on(p, plan.partial_sql) for p in parts], output_names(query, TABLE, SCHEMA))


def assert_same(merged: pd.DataFrame, pooled: pd.DataFrame) -> None:
    assert list(merged.columns) == list(pooled.columns)
    assert merged.shape == pooled.shape
    for column in pooled.columns:
        a, b = merged[column], pooled[column]
        if pd.api.types.is_numeric_dtype(b) and not pd.api.types.is_bool_dtype(b):
            np.testing.assert_allclose(a.astype(float).to_numpy(), b.astype(float).to_numpy(), rtol=1e-7,
                                       atol=1e-6, equal_nan=True, err_msg=column)
        else:
            assert [None if pd.isna(v) else v for v in a] == [None if pd.isna(v) else v for v in b], column


rows = st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 3)), st.one_of(st.none(), st.sampled_from("abc")),
                          st.one_of(st.none(), st.integers(-1000, 1000)),
                          st.one_of(st.none(), st.floats(-1e3, 1e3, allow_nan=False))), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows, cuts=st.lists(st.integers(0, 60), max_size=3),
       keys=st.sampled_from([[], ["g1"], ["g2"], ["g1", "g2"], ["g1 % 2"]]),
       aggregates=st.lists(st.sampled_from(AGGREGATES), min_size=1, max_size=4, unique=True),
       where=st.sampled_from(["", "WHERE x > -500", "WHERE y IS NOT NULL AND g2 <> 'c'"]),
       having=st.sampled_from(["", "HAVING COUNT(*) > 1", "HAVING SUM(x) > 0 OR MIN(y) < 0"]),
       limit=st.sampled_from(["", "LIMIT 2", "LIMIT 3 OFFSET 1"]))
def test_merged_partials_equal_the_pooled_query(data: list, cuts: list[int], keys: list[str],  # type: ignore[type-arg]
                                               aggregates: list[str], where: str, having: str, limit: str) -> None:
    pooled_frame = frame(data)
    bounds = sorted({0, len(data), *[c for c in cuts if c <= len(data)]})
    parts = [pooled_frame.iloc[a:b] for a, b in itertools.pairwise(bounds)] or [pooled_frame]
    select = ", ".join([*keys, *[f"{a} AS a{i}" for i, a in enumerate(aggregates)]])
    group = f"GROUP BY {', '.join(keys)}" if keys else ""
    order = f"ORDER BY {', '.join(f'{k} NULLS FIRST' for k in keys)}" if keys else ""
    query = f"SELECT {select} FROM `{TABLE}` {where} {group} {having} {order} {limit if keys else ''}"
    pooled = run_on(pooled_frame, query).to_pandas()
    assert_same(federated(parts, query), pooled)


def spelled(name: str, upper: list[bool]) -> str:
    """`name` with the letters `upper` picks in upper case: DuckDB reads unquoted names in any case."""
    return "".join(c.upper() if u else c for c, u in zip(name, [*upper, *[False] * len(name)][:len(name)], strict=True))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows, cut=st.integers(0, 60), key=st.sampled_from(["g1", "g2", "g1 % 2"]),
       aggregates=st.lists(st.sampled_from(["COUNT(*)", "SUM(x)", "AVG(y)", "MIN(x)", "MAX(y)", "STDDEV(y)"]),
                           min_size=1, max_size=3, unique=True),
       cases=st.lists(st.booleans(), max_size=4), later=st.booleans(),
       having=st.sampled_from(["", "HAVING a0 IS NOT NULL", "HAVING K > 0 OR a0 > 1", "HAVING COUNT(*) > 2"]),
       order=st.sampled_from(["ORDER BY k NULLS FIRST", "ORDER BY 1 DESC NULLS LAST", "ORDER BY ALL NULLS FIRST",
                              "ORDER BY A0 NULLS FIRST, k NULLS FIRST", "ORDER BY a0 + 0 NULLS LAST, 1 NULLS LAST"]),
       limit=st.sampled_from(["", "LIMIT 2", "LIMIT 50 PERCENT", "LIMIT 1 OFFSET 1"]))
def test_aliases_and_duckdbs_orderings_merge_as_on_the_pooled_rows(
        data: list, cut: int, key: str, aggregates: list[str], cases: list[bool],  # type: ignore[type-arg]
        later: bool, having: str, order: str, limit: str) -> None:
    """Select aliases named (in any case) by GROUP BY, HAVING, ORDER BY and later projections;
    ORDER BY ALL, positions and LIMIT n PERCENT: merged, as DuckDB answers on the pooled rows."""
    pooled_frame = frame(data)
    outputs = [f"{key} AS {spelled('k', cases)}", *[f"{a} AS a{i}" for i, a in enumerate(aggregates)]]
    if later:
        outputs.append(f"{spelled('a0', cases[1:])} * 2 AS twice")
    if "K > 0" in having and key == "g2":
        having = "HAVING k > 'a' OR a0 > 1"
    query = f"SELECT {', '.join(outputs)} FROM {TABLE} GROUP BY {spelled('K', cases[2:])} {having} {order} {limit}"
    merged = federated([pooled_frame.iloc[:cut], pooled_frame.iloc[cut:]], query)
    assert_same(merged, run_on(pooled_frame, query).to_pandas())


@settings(max_examples=60, deadline=None)
@given(data=rows, cut=st.integers(0, 60), limit=st.integers(0, 5), offset=st.integers(0, 3))
def test_row_queries_concatenate_with_order_and_limit_reapplied(data: list, cut: int, limit: int,  # type: ignore[type-arg]
                                                               offset: int) -> None:
    pooled_frame = frame(data)
    parts = [pooled_frame.iloc[:cut], pooled_frame.iloc[cut:]]
    query = (f"SELECT g2, x FROM `{TABLE}` WHERE x IS NOT NULL ORDER BY x DESC, y NULLS FIRST, g1, g2 "
             f"LIMIT {limit} OFFSET {offset}")
    merged = federated(parts, query)
    pooled = run_on(pooled_frame, query).to_pandas()
    # ties in the ordering keys may legally come in any order: compare the ordered x values
    assert merged["x"].tolist() == pooled["x"].tolist()
    assert list(merged.columns) == ["g2", "x"]


@pytest.mark.parametrize("query", [
    "SELECT -x AS x FROM ehr WHERE x IS NOT NULL ORDER BY x, g1, y LIMIT 5",  # the alias, not the column
    "SELECT y AS X, g1 FROM ehr WHERE y IS NOT NULL ORDER BY x DESC, 2 NULLS FIRST LIMIT 5",
    "SELECT -x AS x FROM ehr WHERE x IS NOT NULL ORDER BY x + 0, g1, y LIMIT 5",  # in an expression: the column
    "SELECT -x AS x FROM ehr WHERE x IS NOT NULL ORDER BY ehr.x, g1, y LIMIT 5",
    "SELECT g1, SUM(x) AS x FROM ehr GROUP BY g1 ORDER BY X NULLS FIRST",
    "SELECT * REPLACE (-x AS x) FROM ehr WHERE x IS NOT NULL ORDER BY x, g1, g2, y LIMIT 3",
    "SELECT * RENAME (x AS z) FROM ehr WHERE x IS NOT NULL ORDER BY z, g1, g2, y LIMIT 3",
    # DuckDB's ORDER BY ALL (was taken for a column named ALL) and LIMIT n PERCENT (taken as n rows)
    "SELECT x, g1 FROM ehr WHERE x IS NOT NULL ORDER BY ALL DESC LIMIT 3",
    "SELECT DISTINCT g2, g1 FROM ehr ORDER BY ALL NULLS FIRST",
    "SELECT * FROM ehr ORDER BY ALL NULLS FIRST LIMIT 4",
    "SELECT g1, COUNT(*) FROM ehr GROUP BY g1 ORDER BY ALL DESC NULLS FIRST LIMIT 2",
    "SELECT x FROM ehr WHERE x > 0 ORDER BY x LIMIT 10 PERCENT OFFSET 1",
    "SELECT g1, COUNT(*) FROM ehr GROUP BY g1 ORDER BY 1 NULLS FIRST LIMIT 50 PERCENT",
])
def test_order_by_a_name_binds_the_alias_first_as_duckdb_does(query: str) -> None:
    """A row query ordered by a name that is both an alias and a column was ordered by the
    column at the pods and after the merge: its LIMIT kept the wrong rows. The same for the
    other ways DuckDB names outputs and limits."""
    data = frame([(i % 3, "abc"[i % 2], (i * 7) % 23 - 11, (i * 5) % 17 / 4) for i in range(40)])
    assert_same(federated([data.iloc[:15], data.iloc[15:]], query), run_on(data, query).to_pandas())


@settings(max_examples=40, deadline=None)
@given(data=rows, cut=st.integers(0, 60), limit=st.integers(0, 4), order=st.sampled_from([
    "g1 NULLS FIRST, g2 DESC NULLS LAST", "2 NULLS FIRST, 1 NULLS FIRST", "k NULLS FIRST, G2 NULLS LAST, 1 NULLS FIRST",
    "ehr.g2 DESC NULLS FIRST, g1 % 2 NULLS FIRST, g1 NULLS FIRST"]))
def test_distinct_rows_ordered_by_what_they_select(data: list, cut: int, limit: int,  # type: ignore[type-arg]
                                                   order: str) -> None:
    """SELECT DISTINCT ... ORDER BY was refused whatever the keys: DuckDB orders it by selected
    expressions only, so the merge orders by their positions."""
    pooled_frame = frame(data)
    query = f"SELECT DISTINCT g1, g2, g1 % 2 AS k FROM {TABLE} ORDER BY {order} LIMIT {limit}"
    merged = federated([pooled_frame.iloc[:cut], pooled_frame.iloc[cut:]], query)
    assert_same(merged, run_on(pooled_frame, query).to_pandas())


def test_unaliased_output_names_match_duckdb() -> None:
    query = f"SELECT g1, AVG(y), COUNT(*) FROM `{TABLE}` GROUP BY g1 ORDER BY g1"
    data = frame([(1, "a", 1, 1.0), (2, "b", 2, 2.0), (1, "c", 3, 4.0)])
    merged = federated([data.iloc[:1], data.iloc[1:]], query)
    assert list(merged.columns) == ["g1", "avg(y)", "count_star()"]


def test_a_partial_that_no_pod_could_run_is_refused_at_the_modeller() -> None:
    """AVG of a date binds in DuckDB, but travels as SUM(d), which does not: every pod failed it,
    each with DuckDB's words about sum(DATE). The modeller binds the partial query too."""
    schema = {"d": "DATE", "x": "INTEGER"}
    query = "SELECT AVG(d) FROM ehr"
    assert output_names(query, TABLE, schema) == ["avg(d)"]
    with pytest.raises(NotMergeable, match=r"SUM\(d\).*does not bind against ehr's schema.*epoch"):
        output_names(query, TABLE, schema, partial_sql=plan_merge(query).partial_sql)
    aliased = "SELECT x % 2 AS k, COUNT(*) FROM ehr WHERE k = 1 GROUP BY k"  # the partial names it k0
    with pytest.raises(NotMergeable, match="select alias named in WHERE"):
        output_names(aliased, TABLE, schema, partial_sql=plan_merge(aliased).partial_sql)
    assert output_names("SELECT AVG(x), MIN(d) FROM ehr", TABLE, schema,
                        partial_sql=plan_merge("SELECT AVG(x), MIN(d) FROM ehr").partial_sql) == ["avg(x)", "min(d)"]


def test_datasets_answering_a_column_in_types_that_do_not_merge_are_named() -> None:
    """One pod's CSV reads a code column as numbers, another's as text (a value "NA"): the merge
    raised pyarrow's ArrowTypeError about `k0`; it names the column as the query does, and each type."""
    plan = plan_merge("SELECT code, COUNT(*) AS n FROM ehr GROUP BY code")
    numbers = pa.table({"k0": pa.array([1, 2]), "p0": pa.array([5, 6])})
    text = pa.table({"k0": pa.array(["1", "NA"]), "p0": pa.array([7, 8])})
    with pytest.raises(SqlExecutionError, match=r"answer code .*\(alice/ehr: int64, bob/ehr: string\)") as info:
        merge(plan, [numbers, text], ["code", "n"], ["alice/ehr", "bob/ehr"])
    assert "CAST(code AS VARCHAR)" in str(info.value)


@pytest.mark.parametrize(("query", "construct"), [
    ("SELECT COUNT(DISTINCT x) FROM ehr", "COUNT(DISTINCT x)"),
    ("SELECT MEDIAN(y) FROM ehr", "MEDIAN(y)"),
    ("SELECT QUANTILE_CONT(y, 0.5) FROM ehr", "QUANTILE_CONT"),
    ("SELECT g1, ROW_NUMBER() OVER (ORDER BY x) FROM ehr", "window function"),
    ("SELECT a.x FROM ehr a JOIN ehr b ON a.g1 = b.g1", "JOIN"),
    ("SELECT x FROM ehr UNION SELECT x FROM ehr", "UNION"),
    ("SELECT g1, COUNT(*) FROM ehr GROUP BY ROLLUP (g1)", "ROLLUP"),
    ("SELECT * FROM (SELECT x FROM ehr) s", "subquery"),
    ("SELECT STRING_AGG(g2, ',') FROM ehr", "LISTAGG(g2, ',')"),
    # aggregates sqlglot does not know: planned as rows (one answer per pod) or a broken merge before
    ("SELECT FSUM(x) FROM ehr", "FSUM(x)"),
    ("SELECT g1, HISTOGRAM(x) FROM ehr GROUP BY g1", "HISTOGRAM(x)"),
    ("SELECT COUNT(*), JSON_GROUP_ARRAY(x) FROM ehr", "JSON_GROUP_ARRAY(x)"),
    ("SELECT g1, MAX(x, 3) FROM ehr GROUP BY g1", "MAX(x, 3)"),  # a list of the 3 largest; was merged as MAX
    ("SELECT * FROM ehr ORDER BY 2 LIMIT 3", "ORDER BY 2 beside *"),  # ordered by `* AS` a hidden column
    ("SELECT DISTINCT * FROM ehr ORDER BY g1", "SELECT DISTINCT"),
    ("SELECT x FROM ehr ORDER BY ALL, x", "ORDER BY ALL beside other keys"),
])
def test_unmergeable_constructs_are_named(query: str, construct: str) -> None:
    with pytest.raises(NotMergeable) as info:
        plan_merge(query)
    assert construct.lower() in str(info.value).lower()


@pytest.mark.parametrize("query", [
    "SELECT g1, AVG(x) AS a FROM ehr GROUP BY g1 HAVING a > 0 ORDER BY g1 NULLS FIRST",
    "SELECT g1 AS k, COUNT(*) AS n FROM ehr GROUP BY k HAVING n > 3 AND k > 0 ORDER BY k",
    "SELECT g1, SUM(x) AS S FROM ehr GROUP BY g1 HAVING s > 0 ORDER BY g1 NULLS FIRST",
    "SELECT g1, COUNT(*) AS x FROM ehr GROUP BY g1 HAVING x > 5 ORDER BY g1 NULLS FIRST",  # x: the alias
    "SELECT SUM(x) AS s, s / 2 AS h, h + 1 AS j FROM ehr",
    "SELECT g1 % 2 AS k, AVG(y) AS a, a * 2 AS b FROM ehr GROUP BY k HAVING b > 0 ORDER BY k NULLS FIRST",
    "SELECT g1, VARIANCE(y) AS v, SQRT(v) AS sd FROM ehr GROUP BY g1 ORDER BY g1 NULLS FIRST",
    "SELECT g1, SUM(x) AS s FROM ehr GROUP BY g1 ORDER BY s + 1 NULLS FIRST, g1 NULLS FIRST",
    "SELECT COUNT(*) AS g1 FROM ehr GROUP BY g1 HAVING g1 > 0 ORDER BY 1",  # g1: the column, grouped
    "SELECT g2 AS Grp, SUM(x) FROM ehr GROUP BY GRP ORDER BY grp NULLS FIRST",  # names in any case
    "SELECT EHR.G1, COUNT(*) FROM ehr GROUP BY g1 HAVING ehr.g1 > 0 ORDER BY 1 NULLS FIRST",  # one key, named so
    "SELECT t.G2, SUM(x) FROM ehr t GROUP BY T.g2 ORDER BY 1 NULLS FIRST",
])
def test_select_aliases_bind_as_in_duckdb(query: str) -> None:
    """HAVING, later projections and ORDER BY expressions may name a select alias, which DuckDB
    binds (a GROUP BY column of that name first): the merge failed on them after the pods had
    answered, and GROUP BY g1 took an aggregate aliased g1 for its key."""
    data = frame([(i % 3, "abc"[i % 2], i * (-1) ** i, i / 4) for i in range(40)])
    assert_same(federated([data.iloc[:15], data.iloc[15:]], query), run_on(data, query).to_pandas())


@pytest.mark.parametrize("sample", ["USING SAMPLE 0 PERCENT (bernoulli)", "USING SAMPLE 100 PERCENT (bernoulli)",
                                    "TABLESAMPLE bernoulli(0 PERCENT)"])
@pytest.mark.parametrize("keys", ["", "g1"])
def test_a_percent_sample_is_taken_by_each_pod(sample: str, keys: str) -> None:
    """USING SAMPLE was dropped from an aggregate's partial query: a sampled COUNT counted every row."""
    data = frame([(i % 3, "abc"[i % 2], i, i / 2) for i in range(40)])
    select, group = (f"{keys}, COUNT(*) AS n, SUM(x) AS s", f"GROUP BY {keys} ORDER BY {keys}") if keys else \
        ("COUNT(*) AS n, SUM(x) AS s", "")
    query = f"SELECT {select} FROM {TABLE} {sample} {group}"
    assert_same(federated([data.iloc[:25], data.iloc[25:]], query), run_on(data, query).to_pandas())


@pytest.mark.parametrize("query", ["SELECT COUNT(*) FROM ehr USING SAMPLE 10 ROWS",
                                   "SELECT g1, AVG(y) FROM ehr USING SAMPLE 10 GROUP BY g1",
                                   "SELECT COUNT(*) FROM ehr TABLESAMPLE (5 ROWS)",
                                   "SELECT x FROM ehr USING SAMPLE reservoir(10 ROWS) REPEATABLE (1)"])
def test_a_sample_of_n_rows_is_refused(query: str) -> None:
    """Each pod would give n rows, and the merged answer would cover n per pod."""
    with pytest.raises(NotMergeable, match=r"sample of .*ROWS.*PERCENT"):
        plan_merge(query)


@pytest.mark.parametrize(("query", "clause"), [
    ("SELECT g1, COUNT(*) FROM ehr GROUP BY 3", "GROUP BY 3"),
    ("SELECT g1, COUNT(*) FROM ehr GROUP BY 0", "GROUP BY 0"),
    ("SELECT g1, COUNT(*) FROM ehr GROUP BY g1 ORDER BY 0", "ORDER BY 0"),
    ("SELECT x FROM ehr ORDER BY 2", "ORDER BY 2"),
    ("SELECT x FROM ehr ORDER BY 1.5", "ORDER BY 1.5"),
    ("SELECT ORDER BY 0", "ORDER BY 0"),
])
def test_an_ordinal_that_names_no_column_is_refused_by_both_planners(query: str, clause: str) -> None:
    """`ORDER BY 0` once picked the last projection (index -1) or raised IndexError (the fuzz
    test found it); the modeller's merge plan and the pod's disclosure plan refuse it alike."""
    with pytest.raises(SqlRejected, match=clause):
        plan_merge(query)
    if "GROUP BY" in clause:
        with pytest.raises(SqlRejected, match=clause):
            disclosed_query(query)
