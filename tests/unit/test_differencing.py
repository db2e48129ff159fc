"""Protection against differencing (issue 10, item 5), over a real SqlEngine: cohorts described
by size and hashes, compared exactly when near, kept across restarts, refused when two answers
would single out fewer than the minimum group size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpod.algorithms.sql.disclosure import disclosed_query
from fedpod.algorithms.sql.engine import SqlEngine
from fedpod.data.datasets import DatasetSpec
from fedpod.governance.differencing import Cohort, CohortLedger, released_cohorts

MIN = 3


@pytest.fixture
def engine(tmp_path: Path) -> SqlEngine:
    rows = "\n".join(f"P{i},{'FM'[i % 2]},{20 + i},{'A' if i < 30 else 'B'}" for i in range(60))
    (tmp_path / "ehr.csv").write_text("id,sex,age,ward\n" + rows + "\n")
    return SqlEngine([DatasetSpec(name="ehr", type="csv", path="ehr.csv")], tmp_path)


def released(engine: SqlEngine, query: str) -> list[Cohort]:
    """What the pod does: the answer with its hidden columns, read for the cells it releases."""
    sql, release = disclosed_query(query, engine.non_null["ehr"])
    assert release.cohorts is not None
    return released_cohorts(engine.run(sql, "ehr"), release, MIN)


def ask(ledger: CohortLedger, engine: SqlEngine, query: str | list[Cohort], modeller: str = "LAB") -> str | None:
    """The ledger's judgement of an answer to `query` (or of cohorts already read from one)."""
    cohorts = released(engine, query) if isinstance(query, str) else query
    return ledger.check_and_keep(modeller, "ehr", engine.versions["ehr"], cohorts, MIN,
                                 lambda sql, params: engine.row_ids(sql, params, "ehr"),
                                 lambda sql, params: engine.sketch(sql, params, "ehr"))


def test_a_cohort_one_person_smaller_is_refused_and_a_repeat_is_not(engine: SqlEngine, tmp_path: Path) -> None:
    ledger = CohortLedger(tmp_path / "cohorts.jsonl")
    assert ask(ledger, engine, "SELECT AVG(age) FROM ehr WHERE ward = 'A'") is None
    assert ask(ledger, engine, "SELECT AVG(age) FROM ehr WHERE ward = 'A'") is None  # the same cohort again
    assert ask(ledger, engine, "SELECT COUNT(*), AVG(age) FROM ehr WHERE ward = 'A' AND age < 200") is None
    why = ask(ledger, engine, "SELECT AVG(age) FROM ehr WHERE ward = 'A' AND id <> 'P7'")
    assert why is not None and "differs by fewer than 3 rows" in why
    assert ask(ledger, engine, "SELECT AVG(age) FROM ehr WHERE ward = 'A' AND id NOT IN ('P7', 'P8', 'P9')") is None
    assert ask(ledger, engine, "SELECT AVG(age) FROM ehr WHERE ward = 'A' AND id <> 'P7'", modeller="OTHER") is None


def test_a_swap_of_one_person_for_another_is_refused(engine: SqlEngine, tmp_path: Path) -> None:
    ledger = CohortLedger(tmp_path / "cohorts.jsonl")
    assert ask(ledger, engine, "SELECT AVG(age) FROM ehr WHERE id <> 'P1'") is None
    why = ask(ledger, engine, "SELECT AVG(age) FROM ehr WHERE id <> 'P2'")  # same size, 2 rows apart
    assert why is not None and "differs by fewer than 3 rows" in why


def test_group_cells_filters_and_nulls_are_cohorts_too(engine: SqlEngine, tmp_path: Path) -> None:
    ledger = CohortLedger(tmp_path / "cohorts.jsonl")
    assert ask(ledger, engine, "SELECT ward, COUNT(*) FROM ehr GROUP BY ward") is None
    why = ask(ledger, engine, "SELECT ward = 'A' AND id <> 'P3' AS picked, AVG(age) FROM ehr GROUP BY 1")
    assert why is not None and "differs by fewer than 3 rows" in why  # the picked group is ward A but one
    fresh = CohortLedger(tmp_path / "other.jsonl")
    why = ask(fresh, engine, "SELECT AVG(age), AVG(age) FILTER (WHERE id <> 'P4') FROM ehr")  # within one query
    assert why is not None and "differs by fewer than 3 rows" in why


def test_the_ledger_survives_a_restart_and_is_per_dataset_version(engine: SqlEngine, tmp_path: Path) -> None:
    assert ask(CohortLedger(tmp_path / "cohorts.jsonl"), engine, "SELECT COUNT(*) FROM ehr WHERE sex = 'F'") is None
    reopened = CohortLedger(tmp_path / "cohorts.jsonl")
    assert ask(reopened, engine, "SELECT COUNT(*) FROM ehr WHERE sex = 'F' AND id <> 'P0'") is not None
    (tmp_path / "cohorts.jsonl").write_text((tmp_path / "cohorts.jsonl").read_text() + '{"torn')
    assert ask(CohortLedger(tmp_path / "cohorts.jsonl"), engine,
               "SELECT COUNT(*) FROM ehr WHERE sex = 'F' AND id <> 'P0'") is not None  # a torn line is skipped
    (tmp_path / "ehr.csv").write_text((tmp_path / "ehr.csv").read_text() + "P99,F,50,A\n")
    changed = SqlEngine([DatasetSpec(name="ehr", type="csv", path="ehr.csv")], tmp_path)
    assert changed.versions["ehr"] != engine.versions["ehr"]


@pytest.mark.parametrize("selection", [
    "USING SAMPLE 97 PERCENT (bernoulli, {seed})",  # a sample the cohort's own query does not repeat
    "WHERE NOT (id = 'P7' AND random() < 0.5)",  # P7 left out of the answer, maybe not of its comparison
])
def test_a_cohort_that_its_query_does_not_select_again_is_never_compared_blindly(
        engine: SqlEngine, tmp_path: Path, selection: str) -> None:
    """One answer over all 60 rows, then answers that leave out a row or two at random: each
    such cohort is near the first, and was compared with the rows its query selected again —
    the whole table, for a sample — so the difference passed as none."""
    ledger = CohortLedger(tmp_path / "cohorts.jsonl")
    assert ask(ledger, engine, "SELECT COUNT(*), SUM(age) FROM ehr") is None
    refused = 0
    for seed in range(40):
        query = f"SELECT COUNT(*), SUM(age) FROM ehr {selection.format(seed=seed)}"
        [cohort] = released(engine, query)  # the answer, run once (random() differs from run to run)
        why = ask(ledger, engine, [cohort])
        if 60 - MIN < cohort.size < 60:  # fewer than MIN rows apart from the first
            assert why is not None, f"{query}: released {cohort.size} of 60 rows"
            refused += "not selected again as the answer selected it" in why
    assert refused > 0


def test_cohort_shapes_it_cannot_describe_are_named() -> None:
    with pytest.raises(ValueError, match="ROLLUP"):
        disclosed_query("SELECT sex, COUNT(*) FROM ehr GROUP BY ROLLUP (sex)")
    # its cells' rows would be selected again without their keys: the whole WHERE set, whose
    # difference to another answer's can be wide where a cell's is one person
    with pytest.raises(ValueError, match="GROUP BY ALL"):
        disclosed_query("SELECT sex, ward, COUNT(*) FROM ehr GROUP BY ALL")


def test_cells_of_one_answer_are_never_compared_and_near_ones_by_sketch_first(engine: SqlEngine,
                                                                             tmp_path: Path) -> None:
    """Sixty rows in twenty groups of three: every pair of cells is the same size, and they are
    disjoint (GROUP BY code in a vocabulary count looks like this): nothing is selected again.
    Another grouping into threes is near in size to every kept cell: each cohort's sketch is
    selected once, and its row ids once, for the pairs whose sketches overlap."""
    fetched: dict[str, list[str]] = {"rows": [], "sketches": []}

    def row_ids(sql: str, params: list[object]) -> tuple[np.ndarray, int]:
        fetched["rows"].append(f"{sql} {params}")
        return engine.row_ids(sql, params, "ehr")

    def sketch(sql: str, params: list[object]) -> tuple[list[int], int, int]:
        fetched["sketches"].append(f"{sql} {params}")
        return engine.sketch(sql, params, "ehr")

    def ask_counting(query: str) -> str | None:
        return ledger.check_and_keep("LAB", "ehr", engine.versions["ehr"], released(engine, query), MIN, row_ids,
                                     sketch)

    ledger = CohortLedger(tmp_path / "cohorts.jsonl")
    by_remainder = "SELECT CAST(SUBSTR(id, 2) AS INT) % 20 AS g, COUNT(*) FROM ehr GROUP BY g"
    for _ in range(2):
        assert ask_counting(by_remainder) is None
    assert fetched == {"rows": [], "sketches": []}
    assert ask_counting("SELECT CAST(SUBSTR(id, 2) AS INT) // 3 AS g, COUNT(*) FROM ehr GROUP BY g") is None
    for selected in fetched.values():
        assert 0 < len(selected) <= 40 and len(selected) == len(set(selected))  # each cohort once at most


def test_an_aggregate_over_a_column_with_nulls_is_its_own_cohort() -> None:
    """A null pattern can single someone out (AVG over the non-null values of a cell); a column
    the table holds no null in adds no cohort, and no work."""
    query = "SELECT AVG(age), AVG(rare), COUNT(*) FILTER (WHERE age > 3) FROM ehr"
    _, release = disclosed_query(query, frozenset({"age"}))
    plan = release.cohorts
    assert plan is not None
    assert release.uses == ((0,), (1,), (2,))
    assert plan.conditions == ["TRUE", "(rare) IS NOT NULL", "COALESCE((age > 3), FALSE)"]
