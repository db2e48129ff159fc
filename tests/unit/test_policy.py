"""The custodian's policy: `decide` over a table of cases, validation, migration, access requests
and the disclosure rewrite (small groups suppressed, counted, never named)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from pydantic import ValidationError

from fedpod.algorithms.sql.disclosure import disclosed_query, shape, suppress_small_groups
from fedpod.algorithms.sql.federated import plan_merge
from fedpod.errors import ConfigError
from fedpod.governance.policy import Policy, Request, decide, migrate_access, policy_changes
from fedpod.governance.requests import MAX_PENDING, AccessRequests
from fedpod.pod.config import PodConfig

LAB, OTHER, STRANGER = "AAAA-BBBB-CCCC-DDDD", "EEEE-FFFF-GGGG-HHHH", "ZZZZ-ZZZZ-ZZZZ-ZZZZ"
NOW = dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)


def policy(**ehr: Any) -> Policy:
    grants = ehr.pop("grants", [{"to": ["researchers"], "kinds": ["sql_aggregate", "train"]}])
    return Policy.model_validate({"modellers": {"lab": LAB, "other": OTHER}, "groups": {"researchers": ["lab"]},
                                  "datasets": {"ehr": {"grants": grants, **ehr}}})


def request(**fields: Any) -> Request:
    base: dict[str, Any] = {"pod": "alice", "requester": "lab", "fingerprint": LAB, "dataset": "ehr",
                            "kind": "sql_aggregate", "at": NOW}
    return Request(**{**base, **fields})


CASES: list[tuple[str, Policy, Request, str | None]] = [
    ("a grant through a group allows", policy(), request(), None),
    ("no grant for the kind", policy(), request(kind="sql_rows"), "grants"),
    ("an unknown key", policy(), request(fingerprint=STRANGER, requester="mallory"), "modeller"),
    ("a known modeller without any grant", policy(), request(fingerprint=OTHER, requester="other"), "grants"),
    ("a dataset the pod does not serve", policy(), request(served=False, dataset="nope"), "dataset"),
    ("no policy for the dataset: default deny", Policy.model_validate({"modellers": {"lab": LAB}}), request(),
     "grants"),
    ("the * policy covers datasets without their own",
     Policy.model_validate({"modellers": {"lab": LAB}, "datasets": {"*": {"grants": [
         {"to": ["lab"], "kinds": ["sql_rows"]}]}}}), request(kind="sql_rows", dataset="other"), None),
    ("an expired grant", policy(grants=[{"to": ["lab"], "kinds": ["sql_aggregate"], "expires": "2026-11-23"}]),
     request(), "expires"),
    ("a grant is good through its last day",
     policy(grants=[{"to": ["lab"], "kinds": ["sql_aggregate"], "expires": "2026-11-24"}]), request(), None),
    ("a denied column", policy(columns={"deny": ["SSN"]}), request(columns=frozenset({"age", "ssn"})), "columns"),
    ("outside the allow list", policy(columns={"allow": ["age"]}), request(columns=frozenset({"sex"})), "columns"),
    ("inside the allow list", policy(columns={"allow": ["age"]}), request(columns=frozenset({"age"})), None),
    ("a model not allowed", policy(models=["logistic_regression"]), request(kind="train", model="mlp"), "models"),
    ("an allowed model", policy(models=["mlp"]), request(kind="train", model="mlp"), None),
    ("models do not bind SQL", policy(models=["mlp"]), request(), None),
    ("secure aggregation required", policy(require_secure_aggregation=True), request(kind="train"),
     "require_secure_aggregation"),
    ("an epsilon budget refuses training without DP", policy(epsilon_budget=3.0), request(kind="train"),
     "epsilon_budget"),
    ("an epsilon budget allows DP training", policy(epsilon_budget=3.0),
     request(kind="train", differentially_private=True), None),
    ("an epsilon budget leaves exact aggregates to disclosure control", policy(epsilon_budget=3.0), request(), None),
    ("secure aggregation given", policy(require_secure_aggregation=True),
     request(kind="train", secure_aggregation=True), None),
    ("rate limit reached", policy(tasks_per_hour=5), request(recent_tasks=5), "tasks_per_hour"),
    ("under the rate limit", policy(tasks_per_hour=5), request(recent_tasks=4), None),
    ("evaluate needs its own grant", policy(), request(kind="evaluate", model="mlp"), "grants"),
    ("MIN and MAX by default", policy(), request(extremes=True), None),
    ("MIN and MAX where extremes are withheld", policy(release_extremes=False), request(extremes=True),
     "release_extremes"),
    ("other aggregates where extremes are withheld", policy(release_extremes=False), request(), None),
    ("MIN and MAX where extremes are withheld, to a holder of sql_rows",
     policy(release_extremes=False, grants=[{"to": ["lab"], "kinds": ["sql_rows"]}]), request(extremes=True), None),
]


@pytest.mark.parametrize(("policy_", "request_", "rule"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide_over_a_table_of_cases(policy_: Policy, request_: Request, rule: str | None) -> None:
    decision = decide(policy_, request_)
    assert decision.allowed is (rule is None) and decision.rule == rule
    if rule is not None:
        assert decision.reason and decision.remedy


def test_every_violation_is_collected_and_the_remedy_names_what_to_ask_for() -> None:
    decision = decide(policy(columns={"deny": ["ssn"]}, tasks_per_hour=1),
                      request(kind="sql_rows", columns=frozenset({"ssn"}), recent_tasks=3))
    assert [v.rule for v in decision.violations] == ["grants", "columns", "tasks_per_hour"]
    assert "grant sql_rows on alice/ehr to lab" in decision.remedy
    unknown = decide(policy(), request(fingerprint=STRANGER, requester="mallory", kind="sql_rows"))
    assert f"grant sql_rows on alice/ehr to mallory ({STRANGER})" in unknown.remedy


@pytest.mark.parametrize(("raw", "field"), [
    ({"datasets": {"ehr": {"grants": [{"to": ["nobody"], "kinds": ["train"]}]}}}, "datasets.ehr.grants.0.to"),
    ({"datasets": {"ehr": {"grants": [{"to": ["lab"], "kinds": ["drop_tables"]}]}}}, "kinds"),
    ({"datasets": {"ehr": {"min_group_size": 0}}}, "min_group_size"),
    ({"datasets": {"ehr": {"min_grup_size": 5}}}, "min_grup_size"),
    ({"groups": {"g": ["ghost"]}}, "groups.g"),
    ({"modellers": {"twin": LAB}}, "more than one name"),
    ({"modellers": {"bad": "not-a-fingerprint"}}, "modellers.bad"),
])
def test_an_invalid_policy_is_refused_naming_the_field(raw: dict[str, Any], field: str) -> None:
    modellers = {"lab": LAB, **raw.get("modellers", {})}
    with pytest.raises(ValidationError) as info:
        Policy.model_validate({**raw, "modellers": modellers})
    assert field in str(info.value).replace("\n  ", " ").replace("\n", " ") or field.split(".")[-1] in str(info.value)


def test_a_policy_naming_a_dataset_the_pod_does_not_serve_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "pod.yaml"
    config.write_text("name: alice\nidentity: keys/alice.key\npolicies:\n  datasets:\n    nope: {}\n")
    with pytest.raises(ConfigError, match=r"policies.*names \['nope'\], which this pod does not serve"):
        PodConfig.load(config)


def test_an_old_access_list_migrates_to_grants_of_everything() -> None:
    raw = migrate_access({"name": "alice", "access": {"modellers": [{"name": "lab", "fingerprint": LAB}]}})
    migrated = Policy.model_validate(raw["policies"])
    for kind in ("sql_aggregate", "sql_rows", "train", "evaluate"):
        assert decide(migrated, request(kind=kind, dataset="any")).allowed


def test_grant_and_revoke_round_trip_and_changes_name_old_and_new_values() -> None:
    start = policy()
    granted = start.grant("newbie", STRANGER, "ehr", ["sql_rows"], dt.date(2027, 1, 1))
    assert decide(granted, request(fingerprint=STRANGER, kind="sql_rows")).allowed
    changes = policy_changes(start, granted)
    assert changes["modellers.newbie"] == [None, STRANGER]
    revoked = granted.revoke(STRANGER)
    assert revoked == start
    tightened = start.model_copy(update={"datasets": {"ehr": start.datasets["ehr"].model_copy(
        update={"min_group_size": 10})}})
    assert policy_changes(start, tightened) == {"datasets.ehr.min_group_size": [3, 10]}


def test_access_requests_are_one_per_key_and_dataset_and_bounded(tmp_path: Path) -> None:
    queue = AccessRequests(tmp_path / "requests.json")
    first = queue.note("mallory", STRANGER, "ehr", "sql_rows")
    assert first is not None and first["id"] == 1
    for _ in range(100):
        assert queue.note("mallory", STRANGER, "ehr", "train")["id"] == 1  # type: ignore[index]
    queue.flush()
    [entry] = queue.entries()
    assert entry["count"] == 101 and entry["kinds"] == ["sql_rows", "train"]
    for index in range(MAX_PENDING + 50):  # a flood of fresh keys
        queue.note(f"k{index}", f"KEY{index}", "ehr", "sql_rows")
    assert sum(e["status"] == "pending" for e in queue.entries()) == MAX_PENDING
    queue.decide(1, "denied")
    assert queue.note("mallory", STRANGER, "ehr", "sql_rows")["status"] == "denied"  # type: ignore[index]
    with pytest.raises(ConfigError, match="no access request 9999"):
        queue.decide(9999, "approved")
    with pytest.raises(ConfigError, match="denied already"):
        queue.decide(1, "approved")


@pytest.mark.parametrize(("query", "kind"), [
    ("SELECT sex, AVG(age) FROM ehr GROUP BY sex", "sql_aggregate"),
    ("SELECT COUNT(*) FROM ehr", "sql_aggregate"),
    ("SELECT * FROM ehr", "sql_rows"),
    ("SELECT age FROM ehr WHERE age > 3", "sql_rows"),
    ("SELECT LIST(age) FROM ehr", "sql_rows"),  # an aggregate that returns members' values
    ("SELECT sex, STRING_AGG(ssn, ',') FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT DISTINCT age FROM ehr", "sql_rows"),
    ("SELECT a FROM (SELECT age AS a FROM ehr) GROUP BY a", "sql_rows"),
    ("SELECT age, ROW_NUMBER() OVER () FROM ehr", "sql_rows"),
    # aggregates sqlglot does not know, found in DuckDB's catalogue: some return every member's value,
    # and the pod cannot size the rows behind any of them
    ("SELECT sex, HISTOGRAM(ssn) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT sex, ARBITRARY(ssn) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT sex, FSUM(age) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT sex, JSON_GROUP_ARRAY(ssn) FROM ehr GROUP BY sex", "sql_rows"),  # a macro over STRING_AGG
    ("SELECT sex, WAVG(age, age) FROM ehr GROUP BY sex", "sql_rows"),  # a macro over a macro over SUM
    ("SELECT sex, COUNT(*) FROM ehr GROUP BY sex HAVING ARBITRARY(ssn) = 'x'", "sql_rows"),
    # DuckDB's MIN/MAX with a count: the n smallest or largest members' own values, as a list
    ("SELECT sex, COUNT(*), MAX(ssn, 1000) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT sex, MIN(age, n := 3) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT sex, MIN(age), MAX(DISTINCT age) FROM ehr GROUP BY sex", "sql_aggregate"),
    # renamed columns: AVG(ssn) is AVG(age), sized as if over a column without nulls
    ("SELECT sex, AVG(ssn) FROM ehr AS t(ssn, sex) GROUP BY sex", "sql_rows"),
    ("SELECT AVG(age) FROM ehr WHERE rowid NOT IN (7, 1024, 9001, 65537)", "sql_rows"),  # rows picked by id
    ("SELECT sex, ROUND(AVG(age), 1), UPPER(sex) FROM ehr GROUP BY sex", "sql_aggregate"),  # scalars stay
    ("SELECT SUM(\"F\") FROM ehr PIVOT (SUM(age) FOR sex IN ('F'))", "sql_rows"),  # an aggregate within
    # cells kept or ordered by an aggregate of one person: its presence (or the suppressed count) tells
    ("SELECT sex, COUNT(*) FROM ehr GROUP BY sex HAVING MAX(CASE WHEN ssn = 'x' THEN age END) > 40", "sql_rows"),
    ("SELECT sex, COUNT(*) AS n FROM ehr GROUP BY sex HAVING COUNT(*) > 5", "sql_rows"),
    ("SELECT sex, COUNT(*) FROM ehr GROUP BY sex ORDER BY MAX(CASE WHEN ssn = 'x' THEN age END)", "sql_rows"),
    ("SELECT sex, COUNT(*) AS n FROM ehr GROUP BY sex HAVING sex = 'F' ORDER BY n DESC, 2, COUNT(*), sex",
     "sql_aggregate"),  # ordered by what it releases; HAVING on keys only
    # an output named like the columns the pod judges an aggregate's cells by is not an aggregate's
    ("SELECT sex, COUNT(*) AS __FEDPOD_n0 FROM ehr GROUP BY sex", "sql_rows"),
    # what an aggregate adds up is a linear function of the row's columns: nothing else can weigh one
    # row apart from the rest, as these did, each with one patient's age in a cell of a hundred
    ("SELECT sex, SUM(age * (ssn = 'x')::INTEGER) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT sex, MAX(age - 1000 * ABS(SIGN(ssn - 42))) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT sex, SUM(age * smoker) FROM ehr GROUP BY sex", "sql_rows"),  # a product of columns
    ("SELECT sex, SUM(CAST((ssn - 41.5) / 1e6 AS INTEGER)) FROM ehr GROUP BY sex", "sql_rows"),  # rounding steps
    ("SELECT sex, SUM(CASE WHEN age > 40 THEN 1 ELSE 0 END + CASE WHEN ssn = 'x' THEN 100 ELSE 0 END) FROM ehr "
     "GROUP BY sex", "sql_rows"),  # a second CASE: its branches' rows are not sized
    ("SELECT sex, SUM(CASE WHEN age > 40 THEN age * age ELSE 0 END) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT sex, COUNT(DISTINCT age % 7) FROM ehr GROUP BY sex", "sql_rows"),
    ("SELECT SUM(CASE " + " ".join(f"WHEN age = {i} THEN {i}" for i in range(16)) + " ELSE 0 END) FROM ehr",
     "sql_rows"),  # each branch is counted apart, and its condition repeats those before it: a bound
    ("SELECT " + ", ".join(f"SUM(IF(age = {i}, 1, 0))" for i in range(100)) + " FROM ehr", "sql_rows"),  # 300 counts
    ("SELECT sex, AVG(age * 2 + 1), MIN(-age), MAX(age / 10.0), AVG(CAST(age AS DOUBLE)), COUNT(DISTINCT age), "
     "COUNT(CASE WHEN ssn = 'x' THEN 1 END) FROM ehr GROUP BY sex", "sql_aggregate"),
    # one CASE or IF choosing between linear values: each branch's rows are sized, as a FILTER's
    ("SELECT sex, SUM(CASE WHEN ssn = 'x' THEN age ELSE 0 END), SUM(IF(age > 40, age, 0)), "
     "AVG(age * CASE smoker WHEN 1 THEN 2 ELSE 1 END) FROM ehr GROUP BY sex", "sql_aggregate"),
])
def test_the_pod_judges_a_querys_kind_from_the_sql_itself(query: str, kind: str) -> None:
    assert shape(query, ("age", "sex", "ssn")).kind == kind


def test_an_aggregate_that_releases_a_min_or_max_says_so() -> None:
    columns = ("age", "sex")
    for query in ("SELECT sex, MIN(age) FROM ehr GROUP BY sex", "SELECT MAX(age) - MIN(age) AS span FROM ehr",
                  "SELECT sex, MAX(age) AS oldest FROM ehr GROUP BY sex ORDER BY oldest"):
        judged = shape(query, columns)
        assert judged.kind == "sql_aggregate" and judged.extremes, query
    for query in ("SELECT sex, AVG(age), COUNT(*) FROM ehr GROUP BY sex", "SELECT LEAST(age, 90) FROM ehr",
                  "SELECT age FROM ehr WHERE age = (SELECT MAX(age) FROM ehr)"):  # rows: their own grant
        assert not shape(query, columns).extremes, query


def test_a_querys_judgement_is_remembered_for_short_texts_only() -> None:
    short = "SELECT AVG(age) FROM ehr"
    assert shape(short, ("age", "ssn")) is shape(short, ("age", "ssn"))
    long = short + " WHERE " + " OR ".join(["age = 1"] * 600)  # beyond REMEMBERED_BELOW: never kept
    assert shape(long, ("age", "ssn")) is not shape(long, ("age", "ssn"))
    assert shape(long, ("age", "ssn")) == shape(long, ("age", "ssn"))


def let_out(connection: duckdb.DuckDBPyConnection, query: str, min_group_size: int) -> tuple[pa.Table, int, int]:
    """What the pod lets out of `query`'s answer: the table, the cells held back and the values."""
    sql, release = disclosed_query(query, cohorts=False)
    return suppress_small_groups(connection.sql(sql).to_arrow_table(), min_group_size, release)


def test_the_columns_a_query_reads_include_those_behind_a_star() -> None:
    assert shape("SELECT COUNT(*) FROM ehr", ("age", "ssn")).columns == frozenset()
    assert shape("SELECT * FROM ehr", ("age", "ssn")).columns == {"age", "ssn"}
    assert shape("SELECT AVG(AGE) FROM ehr WHERE Ssn > 0", ("age", "ssn")).columns == {"age", "ssn"}
    assert shape("SELECT MIN(t.age) FROM ehr AS t", ("age", "ssn")).columns == {"age"}
    for unnamed in ("SELECT MAX(COLUMNS('s.*')) FROM ehr", "SELECT COUNT(*) FROM ehr WHERE #2 = 'x'",
                    "SELECT MAX(t) FROM ehr AS t", "SELECT COUNT(*) FROM ehr WHERE CAST(ehr AS VARCHAR) LIKE '%x%'",
                    "SELECT MAX(b) FROM ehr AS t(a, b)", "SELECT COUNT(*) FROM ehr t(x) WHERE x > 3"):
        assert shape(unnamed, ("age", "ssn")).columns == {"age", "ssn"}, unnamed  # read without being named


SMALL = ("CREATE TABLE ehr AS SELECT * FROM (VALUES ('F', 30, 1.0), ('F', 40, NULL), ('F', 50, NULL), "
         "('M', 95, NULL), ('M', 60, NULL)) t(sex, age, rare)")


@pytest.mark.parametrize(("query", "released"), [
    ("SELECT sex, COUNT(*) AS n, AVG(age) AS a FROM ehr GROUP BY sex ORDER BY sex",
     [{"sex": "F", "n": 3, "a": 40.0}]),  # M: two rows
    ("SELECT COUNT(*) FILTER (WHERE age > 90) AS old FROM ehr", [{"old": None}]),  # one row
    ("SELECT COUNT(*) FILTER (WHERE age > 200) AS older FROM ehr", [{"older": None}]),  # none: as withheld
    ("SELECT sex, COUNT(*) AS n, AVG(rare) AS r FROM ehr GROUP BY sex", [{"sex": "F", "n": 3, "r": None}]),
    # an aggregate over no rows beside a COUNT(*) of 2 once hid it; now the cell goes, the value is withheld
    ("SELECT sex, COUNT(*) AS n, AVG(age) FILTER (WHERE age > 200) AS a FROM ehr GROUP BY sex",
     [{"sex": "F", "n": 3, "a": None}]),
])
def test_small_cells_are_suppressed_and_small_values_withheld_at_the_pod(query: str, released: list[dict[str, object]]
                                                                         ) -> None:
    connection = duckdb.connect()
    connection.execute(SMALL)
    table, suppressed, withheld = let_out(connection, query, 3)
    assert table.to_pylist() == released
    assert suppressed + withheld >= 1
    _, cells, values = let_out(connection, plan_merge(query).partial_sql, 3)  # the federated partials:
    assert cells == suppressed and (values > 0) == (withheld > 0)  # the same cells; AVG's SUM and COUNT withheld


def test_each_branch_of_a_case_inside_an_aggregate_is_sized_as_a_filters_rows_are() -> None:
    """SUM(CASE WHEN id = 42 THEN age ELSE 0 END) released patient 42's age in a cell of a hundred:
    the pod sized the rows with a non-null argument (all of them). It sizes each branch's rows."""
    connection = duckdb.connect()
    connection.execute("CREATE TABLE ehr AS SELECT i AS id, ['F', 'M'][i % 2 + 1] AS sex, 20 + i % 50 AS age "
                       "FROM range(1, 201) t(i)")
    leak = ("SELECT sex, COUNT(*) AS n, SUM(CASE WHEN id = 42 THEN age ELSE 0 END) AS leak FROM ehr GROUP BY sex "
            "ORDER BY sex")
    common = ("SELECT sex, COUNT(*) AS n, SUM(CASE WHEN age > 40 THEN 1 ELSE 0 END) AS older, "
              "AVG(IF(age > 40, 1.0, 0)) AS share FROM ehr GROUP BY sex ORDER BY sex")
    table, suppressed, withheld = let_out(connection, leak, 5)
    assert table.column("leak").to_pylist() == [None, None] and (suppressed, withheld) == (0, 2)  # 42's, or nobody
    assert let_out(connection, common, 5)[0].to_pylist() == [{"sex": "F", "n": 100, "older": 56, "share": 0.56},
                                                            {"sex": "M", "n": 100, "older": 60, "share": 0.6}]


def test_an_aggregate_over_no_rows_is_withheld_as_one_over_a_few_is() -> None:
    """Empty cells were released and small ones suppressed, so a FILTER naming one patient was
    suppressed in just the cell that held the patient: GROUP BY bmi told patient 42's bmi."""
    connection = duckdb.connect()
    connection.execute("CREATE TABLE ehr AS SELECT i AS id, 20 + i % 17 AS bmi FROM range(1, 201) t(i)")
    query = "SELECT bmi, COUNT(*) AS n, COUNT(*) FILTER (WHERE id = 42) AS hit FROM ehr GROUP BY bmi"
    table, suppressed, withheld = let_out(connection, query, 5)
    assert table.num_rows == 17 and table.column("hit").null_count == 17 and (suppressed, withheld) == (0, 17)
    ordered = query + " ORDER BY hit DESC, bmi LIMIT 1"  # the order would tell 42's cell: the cells go instead
    table, suppressed, _ = let_out(connection, ordered, 5)
    assert table.num_rows == 0 and suppressed == 1
    empty = "SELECT COUNT(*) AS n FROM ehr WHERE id = 1000"  # no row: held back as a cell of one is
    assert let_out(connection, empty, 5)[1] == 1 and let_out(connection, empty, 1)[0].to_pylist() == [{"n": 0}]


def test_a_count_of_distinct_pairs_stands_on_the_rows_that_hold_both() -> None:
    connection = duckdb.connect()
    connection.execute("CREATE TABLE ehr AS SELECT * FROM (VALUES ('F', 30, 1.0), ('F', 40, NULL), ('F', 50, NULL))"
                       " t(sex, age, rare)")
    table, _, withheld = let_out(connection, "SELECT sex, COUNT(DISTINCT age, rare) AS d FROM ehr GROUP BY sex", 3)
    assert table.to_pylist() == [{"sex": "F", "d": None}] and withheld == 1  # F's three rows; one has both


@pytest.mark.parametrize("argument", ["info.age", "ehr.info.age"])
def test_a_structs_field_is_not_taken_for_the_column_of_its_name(argument: str) -> None:
    """`age` holds no null, so an AVG over it needs no count of its own; `info.age`, a struct's
    field of that name, was sized by that rule, and released one patient's value in a cell of 3."""
    connection = duckdb.connect()
    connection.execute("CREATE TABLE ehr AS SELECT * FROM (VALUES ('F', 30, {'age': 71}), ('F', 40, {'age': NULL}),"
                       " ('F', 50, {'age': NULL})) t(sex, age, info)")
    query, release = disclosed_query(f"SELECT sex, COUNT(*) AS n, AVG({argument}) AS a FROM ehr GROUP BY sex",
                                     frozenset({"age", "sex"}))
    table, _, withheld = suppress_small_groups(connection.sql(query).to_arrow_table(), 3, release)
    assert table.to_pylist() == [{"sex": "F", "n": 3, "a": None}] and withheld == 1
    assert shape(f"SELECT MAX({argument}) FROM ehr", ("sex", "age", "info")).columns >= {"info"}  # its column rules


def test_an_outputs_value_stands_on_the_fewest_rows_its_aggregates_used() -> None:
    connection = duckdb.connect()
    connection.execute(SMALL)
    query = ("SELECT sex, COUNT(*) AS n, SUM(age) FILTER (WHERE age > 35) / COUNT(rare) AS mixed, "
             "AVG(age) AS a FROM ehr GROUP BY sex ORDER BY sex")
    _, release = disclosed_query(query, cohorts=False)
    assert release.uses == ((), (0,), (1, 2), (3,))  # keys use none; a ratio both its aggregates' rows
    assert let_out(connection, query, 2)[0].to_pylist() == [{"sex": "F", "n": 3, "mixed": None, "a": 40.0},
                                                           {"sex": "M", "n": 2, "mixed": None, "a": 77.5}]


def test_a_grant_never_moves_a_name_to_another_key_nor_renames_a_key() -> None:
    with pytest.raises(ConfigError, match="'lab' is another key"):
        policy().grant("lab", STRANGER, "ehr", ["sql_rows"])
    with pytest.raises(ConfigError, match="known as 'lab' already"):
        policy().grant("alias", LAB, "ehr", ["sql_rows"])
    assert decide(policy().grant("lab", LAB, "ehr", ["sql_rows"]), request(kind="sql_rows")).allowed


def test_a_grant_on_one_dataset_keeps_what_star_gave_it() -> None:
    """Editing one dataset makes its own entry as a copy of `*`: its inherited grants and limits
    (a column deny among them) stay. `fedpod policy set` goes through the same `own_entry`; the
    secure-aggregation integration test sets a limit on one dataset and trains on it."""
    star = Policy.model_validate({"modellers": {"lab": LAB},
                                  "datasets": {"*": {"grants": [{"to": ["lab"], "kinds": ["train"]}],
                                                     "min_group_size": 10, "columns": {"deny": ["ssn"]}}}})
    granted = star.grant("other", OTHER, "ehr", ["sql_aggregate"]).for_dataset("ehr")
    assert granted.columns.deny == ["ssn"] and granted.min_group_size == 10
    assert [g.to for g in granted.grants] == [["lab"], ["other"]]
    assert star.for_dataset("ehr").grants[0].to == ["lab"] and "ehr" not in star.datasets  # the original unchanged
