"""Exact federated quantiles (issue 10, item 6): the search over merged counts equals DuckDB's
quantile on the pooled rows, pods withhold counts near their extremes, and a quantile there is
refused rather than approximated."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpod.algorithms.sql.quantiles import (
    QuantileSearch,
    check_thresholds,
    count_sql,
    merge_counts,
    plan_quantiles,
    pod_counts,
    sortable,
    unsortable,
)
from fedpod.errors import FedpodError, NotMergeable


def table(values: list[float | None]) -> duckdb.DuckDBPyConnection:
    """A pod's data: `ehr` with x and its negation y (so that an ORDER BY y is another column)."""
    connection = duckdb.connect()
    connection.execute("CREATE TABLE ehr AS SELECT v AS x, -v AS y FROM (SELECT unnest(?::DOUBLE[]) AS v)", [values])
    return connection


def federated(query: str, pods: list[list[float | None]], min_size: int = 1) -> tuple[list[float | None], int]:
    """Run the search over real DuckDB tables, one per pod, as the pods and modeller do."""
    plan = plan_quantiles(query)
    connections = [table(values) for values in pods]
    search = QuantileSearch(plan)
    thresholds = search.first_thresholds()
    while thresholds is not None:
        checked = check_thresholds(plan, thresholds)
        tables = []
        for connection in connections:
            cursor = connection.execute(*count_sql(plan, checked))
            row = dict(zip([d[0] for d in cursor.description], cursor.fetchone() or (), strict=True))
            tables.append(pod_counts(row, plan, checked, min_size)[0])
        search.absorb(merge_counts(tables))
        thresholds = search.next_thresholds()
    return search.results(), search.steps


def pooled(query: str, pods: list[list[float | None]]) -> list[float | None]:
    return list(table([v for pod in pods for v in pod]).execute(query).fetchone() or [])


def same(federated_value: float | None, pooled_value: float | None, scale: float) -> bool:
    """Equal, but for the last bits of an interpolation: DuckDB rounds it differently, to within a
    few units in the last place of the values interpolated between (`scale`, the largest)."""
    if federated_value is None or pooled_value is None:
        return federated_value is None and pooled_value is None
    if math.isnan(pooled_value):
        return math.isnan(federated_value)
    return federated_value == pytest.approx(pooled_value, rel=4e-16, abs=max(1e-300, 4 * 2.2e-16 * scale))


values = st.one_of(st.floats(allow_nan=False, width=64), st.integers(-50, 50).map(float),
                   st.floats(-1e6, 1e6, allow_nan=False))
pods_of_values = st.lists(st.lists(st.one_of(values, st.none()), max_size=40), min_size=1, max_size=4)
fractions = st.one_of(st.sampled_from([0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]), st.floats(0, 1))


@settings(max_examples=60, deadline=None)
@given(pods=pods_of_values, p=fractions)
def test_federated_quantiles_equal_duckdb_on_the_pooled_rows(pods: list[list[float | None]], p: float) -> None:
    query = (f"SELECT MEDIAN(x), QUANTILE_CONT(x, {p!r}), QUANTILE_DISC(x, {p!r}), "
             f"PERCENTILE_CONT({p!r}) WITHIN GROUP (ORDER BY y) AS q FROM ehr WHERE x IS NULL OR x > -1e300")
    found, steps = federated(query, pods)
    expected = pooled(query, pods)
    scale = max((abs(v) for pod in pods for v in pod if v is not None and math.isfinite(v)), default=0.0)
    assert all(same(f, e, scale) for f, e in zip(found, expected, strict=True)), (found, expected)
    assert steps <= 10


def test_a_large_column_takes_few_steps_and_nan_sorts_last() -> None:
    rng = np.random.default_rng(3)
    pods = [rng.lognormal(3, 1, 20_000).tolist(), rng.normal(50, 10, 20_000).tolist(), [math.nan] * 5]
    query = "SELECT MEDIAN(x), QUANTILE_DISC(x, 0.999), QUANTILE_DISC(x, 1.0) FROM ehr"
    found, steps = federated(query, pods)
    expected = pooled(query, pods)
    assert found[:2] == pytest.approx(expected[:2], rel=4e-16) and math.isnan(found[2] or 0.0)
    assert steps <= 9


def test_pods_withhold_counts_near_their_extremes_and_such_a_quantile_is_refused() -> None:
    rng = np.random.default_rng(4)
    pods = [rng.normal(0, 1, 500).tolist(), rng.normal(1, 1, 500).tolist()]
    found, _ = federated("SELECT MEDIAN(x), QUANTILE_CONT(x, 0.1) FROM ehr", pods, min_size=5)
    assert found == pytest.approx(pooled("SELECT MEDIAN(x), QUANTILE_CONT(x, 0.1) FROM ehr", pods), rel=4e-16)
    with pytest.raises(FedpodError, match="within min_group_size values of a pod's smallest"):
        federated("SELECT QUANTILE_DISC(x, 0.001) FROM ehr", pods, min_size=5)
    with pytest.raises(PermissionError, match="fewer than min_group_size"):
        federated("SELECT MEDIAN(x) FROM ehr WHERE x > 3.5", pods, min_size=5)


def test_a_pod_with_none_or_a_few_values_refuses_alike_without_saying_how_many() -> None:
    """A pod answered none as a count of 0 and one to four as `only 1 value(s)`: selecting one
    patient by WHERE told whether they had a diagnosis, and how many a cohort held."""
    values: list[float | None] = [float(v) for v in range(50)]
    messages = set()
    for cut in (49.5, 48.5, 46.5):  # none, one, three values above the cut
        with pytest.raises(PermissionError, match=r"fewer than min_group_size \(5\) values") as refused:
            federated(f"SELECT MEDIAN(x) FROM ehr WHERE x > {cut}", [values], min_size=5)
        messages.add(str(refused.value))
    assert len(messages) == 1
    assert federated("SELECT MEDIAN(x) FROM ehr WHERE x > 19.5", [values], min_size=5)[0] == [34.5]
    assert federated("SELECT MEDIAN(x) FROM ehr WHERE x > 46.5", [[], values], min_size=1)[0] == [48.0]


def test_a_quantiles_table_may_go_by_an_alias() -> None:
    """The pods' counts once named the table alone, and `t.x` did not bind."""
    pods: list[list[float | None]] = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]
    query = "SELECT MEDIAN(t.x), QUANTILE_DISC(t.x, 0.25) FROM ehr AS t WHERE t.y < -1"
    assert federated(query, pods)[0] == pooled(query, pods)


def test_what_cannot_be_searched_is_refused_naming_it() -> None:
    for query, named in [("SELECT sex, MEDIAN(x) FROM ehr GROUP BY sex", "GROUP"),
                         ("SELECT MEDIAN(x), COUNT(*) FROM ehr", "COUNT"),
                         ("SELECT QUANTILE_CONT(x, [0.1, 0.9]) FROM ehr", "fraction"),
                         ("SELECT QUANTILE_CONT(x, 1.5) FROM ehr", "outside"),
                         ("SELECT MEDIAN(MAX(x)) FROM ehr", "row expression"),
                         ("SELECT MEDIAN(DISTINCT x) FROM ehr", "distinct values"),  # pods failed to parse it
                         ("SELECT MEDIAN(x) FROM ehr USING SAMPLE 10 PERCENT (bernoulli)", "sample"),
                         ("SELECT MEDIAN(x) FROM ehr TABLESAMPLE bernoulli(10) REPEATABLE (3)", "sample")]:
        with pytest.raises(NotMergeable, match=named):
            plan_quantiles(query)


def test_hostile_thresholds_are_bounded() -> None:
    plan = plan_quantiles("SELECT MEDIAN(x) FROM ehr")
    with pytest.raises(FedpodError, match="NaN"):
        check_thresholds(plan, [[math.nan]])
    with pytest.raises(FedpodError, match="more than 4096"):
        check_thresholds(plan, [[float(i) for i in range(5000)]])
    with pytest.raises(FedpodError, match="threshold lists"):
        check_thresholds(plan, [[1.0], [2.0]])


@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_the_sortable_order_is_the_numeric_order(a: float, b: float) -> None:
    assert unsortable(sortable(a)) == a
    if a < b:
        assert sortable(a) < sortable(b)
