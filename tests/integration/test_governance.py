"""The custodian's policy at work, over a real NATS server with pods as processes: refusals that
name the rule and the request to approve, approve-then-succeed without a restart, live policy
edits audited with old and new values, and disclosure limits that say what they changed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.errors import AccessDenied, ConfigError, TaskFailed
from fedpod.governance.policy import Policy
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment, RoundFailed
from fedpod.modeller.histogram import federated_histogram
from fedpod.pod.custodian import PodFolder
from fedpod.security.digest import bulk_digest
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, RunningPod, wait_until

pytestmark = pytest.mark.integration
DATASET = "ehr"


@pytest.fixture
def alice(pod_factory: PodFactory, tmp_path: Path, modeller_identity: Identity) -> RunningPod:
    [csv] = [folder / "patients.csv" for folder in write(generate(1, 400, seed=5), tmp_path / "data")]
    policies = Policy().grant(modeller_identity.name, modeller_identity.fingerprint, DATASET, ["sql_aggregate"])
    return pod_factory("alice", [DatasetSpec(name=DATASET, type="csv", path=str(csv))], [modeller_identity],
                       policies=policies)


@pytest.fixture
def modeller(broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path) -> Modeller:
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=20) as client:
        yield client  # type: ignore[misc]


def audit_events(pod: RunningPod, event: str) -> list[dict[str, object]]:
    lines = pod.audit_path.read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["event"] == event]


def test_a_stranger_is_refused_at_once_then_approved_without_a_restart(alice: RunningPod, broker: EmbeddedBroker,
                                                                       tmp_path: Path) -> None:
    stranger = Identity.generate("newlab")
    broker.allow("modeller", stranger.public)
    query = f"SELECT sex, COUNT(*) AS n FROM {DATASET} GROUP BY sex ORDER BY sex"
    with Modeller(stranger, broker=broker.url, keystore=tmp_path / "stranger", timeout_s=20) as client:
        started = time.monotonic()
        with pytest.raises(AccessDenied) as refused:
            client.sql(query, datasets=[f"alice/{DATASET}"])
        assert time.monotonic() - started < 5  # a refusal, not a timeout (discovery included)
        assert refused.value.rule == "modeller" and refused.value.request_id == 1
        assert f"alice/{DATASET}" in str(refused.value) and "access request 1 is pending at pod alice" in str(
            refused.value)
        [status] = client.access_status(["alice"])
        assert [(r.id, r.status, r.kinds) for r in status.requests] == [(1, "pending", ["sql_aggregate"])]

        folder = PodFolder(alice.config_path)
        [pending] = folder.requests.entries()
        assert (pending["name"], pending["fingerprint"], pending["dataset"]) == ("newlab", stranger.fingerprint,
                                                                                 DATASET)
        folder.approve(1, ["sql_aggregate"])
        result = client.sql(query, datasets=[f"alice/{DATASET}"])  # the very next task: no restart
        assert isinstance(result, dict) and int(result[f"alice/{DATASET}"]["n"].sum()) == 400
        assert client.access_status(["alice"])[0].granted == {DATASET: ["sql_aggregate"]}
        with pytest.raises(AccessDenied, match=r"holds no grant of sql_rows on alice/ehr \[rule: grants\]"):
            client.sql(f"SELECT age FROM {DATASET}", datasets=[f"alice/{DATASET}"])
    decisions = [(e["decision"], e["rule"]) for e in audit_events(alice, "task-received")]
    assert decisions[:3] == [("deny", "modeller"), ("allow", None), ("deny", "grants")]
    assert audit_events(alice, "access-approved")[0]["request"] == 1


def test_small_groups_are_suppressed_and_the_result_says_so(alice: RunningPod, modeller: Modeller) -> None:
    query = f"SELECT age, COUNT(*) AS n FROM {DATASET} GROUP BY age"
    with pytest.raises(AccessDenied, match=r"the answer has \d+ groups; ehr releases at most 40 .*rule: max_groups"):
        modeller.sql(query, datasets=[f"alice/{DATASET}"], aggregate=True)  # DataSHIELD's levels.max by default
    PodFolder(alice.config_path).set_limit(DATASET, "max_groups", "100")
    result = modeller.sql(query, datasets=[f"alice/{DATASET}"], aggregate=True)
    assert isinstance(result, pd.DataFrame) and (result["n"] >= 3).all()
    [(identifier, limits)] = result.attrs["disclosure"].items()
    assert identifier == f"alice/{DATASET}" and limits["suppressed_groups"] > 0 and limits["min_group_size"] == 3
    with pytest.raises(AccessDenied, match=r"no grant of sql_rows on alice/ehr \[rule: grants\]"):
        # a subquery makes a row query, whatever its outer shape: refused without sql_rows
        modeller.sql(f"SELECT COUNT(*) AS n FROM {DATASET} WHERE age = (SELECT MIN(age) FROM {DATASET})",
                     datasets=[f"alice/{DATASET}"])
    for leaking in (f"SELECT sex, HISTOGRAM(age) AS ages FROM {DATASET} GROUP BY sex",  # every member's value
                    f"SELECT sex, COUNT(*) AS n, MAX(age, 100000) AS ages FROM {DATASET} GROUP BY sex",  # so
                    # a nullable column under the name of one without nulls, sized as if it had none
                    f"SELECT sex, AVG(patient_id) AS bmi FROM {DATASET} AS t(a, b, sex, patient_id) GROUP BY sex",
                    # a cell kept (or counted as suppressed) by whether a patient is 41
                    f"SELECT sex, COUNT(*) AS n FROM {DATASET} GROUP BY sex "
                    "HAVING MAX(CASE WHEN age = 41 THEN 1 END) = 1"):
        with pytest.raises(AccessDenied, match=r"no grant of sql_rows on alice/ehr \[rule: grants\]"):
            modeller.sql(leaking, datasets=[f"alice/{DATASET}"])


def test_a_query_that_fails_on_a_value_does_not_send_the_value(alice: RunningPod, modeller: Modeller) -> None:
    """DuckDB's errors quote the value they failed on: a modeller granted aggregates only read a
    named patient's identifier (or diagnosis) out of `Could not convert string 'A00-000042' to
    INT32`. The pod sends the error's kind; its custodian's log keeps the message."""
    for query in (f"SELECT COUNT(*) AS n FROM {DATASET} WHERE age = 41 AND CAST(patient_id AS INTEGER) = 0",
                  f"SELECT COUNT(*) AS n FROM {DATASET} WHERE age = 41 AND patient_id::DATE IS NULL",
                  f"SELECT COUNT(*) AS n FROM {DATASET} WHERE age = 41 AND error(patient_id) IS NULL"):
        with pytest.raises(TaskFailed) as failed:
            modeller.sql(query, datasets=[f"alice/{DATASET}"], aggregate=True)
        assert failed.value.kind == "SqlExecutionError" and "failed on a value in the data" in str(failed.value)
        assert "A00-" not in str(failed.value), failed.value
    wait_until(lambda: alice.output().count("told to its sender without this message") == 3, what="the pod's log")
    assert "Could not convert string 'A00-" in alice.output()
    answer = modeller.sql(f"SELECT COUNT(*) AS n FROM {DATASET}", datasets=[f"alice/{DATASET}"], aggregate=True)
    assert isinstance(answer, pd.DataFrame) and int(answer["n"][0]) == 400


def test_a_column_that_hides_the_row_ids_gets_no_unchecked_aggregate(pod_factory: PodFactory, tmp_path: Path,
                                                                     modeller_identity: Identity,
                                                                     modeller: Modeller) -> None:
    """A SQLite export often carries its rowid. As a column it hides DuckDB's row ids, by which the
    differencing ledger tells cohorts apart: with one value in every row, an answer over all 40
    patients and one over 39 looked like the same cohort, and both were released."""
    csv = tmp_path / "visits.csv"
    csv.write_text("rowid,age\n" + "".join(f"1,{20 + i}\n" for i in range(40)))
    policies = Policy().grant(modeller_identity.name, modeller_identity.fingerprint, "visits", ["sql_aggregate"])
    bob = pod_factory("bob", [DatasetSpec(name="visits", type="csv", path=str(csv))], [modeller_identity],
                      policies=policies)
    query, target = "SELECT COUNT(*) AS n, SUM(age) AS s FROM visits", ["bob/visits"]
    with pytest.raises(AccessDenied, match=r"visits has a column named rowid.*\[rule: protect_differencing\]"):
        modeller.sql(query, datasets=target)
    PodFolder(bob.config_path).set_limit("visits", "protect_differencing", "false")  # the custodian's choice
    answer = modeller.sql(query, datasets=target)
    assert isinstance(answer, dict) and answer["bob/visits"]["n"].iloc[0] == 40


def test_live_policy_edits_apply_to_the_next_task_and_are_audited(alice: RunningPod, modeller: Modeller) -> None:
    folder = PodFolder(alice.config_path)
    target = [f"alice/{DATASET}"]
    before = modeller.sql(f"SELECT sex, COUNT(*) AS n FROM {DATASET} GROUP BY sex", datasets=target)
    assert isinstance(before, dict) and len(before[target[0]]) == 2
    folder.set_limit(DATASET, "min_group_size", "1000")
    after = modeller.sql(f"SELECT sex, COUNT(*) AS n FROM {DATASET} GROUP BY sex", datasets=target)
    assert isinstance(after, dict) and after[target[0]].empty
    assert after.disclosure[target[0]] == {"suppressed_groups": 2, "min_group_size": 1000}
    changes = [e["changes"] for e in audit_events(alice, "policy-changed")]
    assert {"datasets.ehr.min_group_size": [3, 1000]} in changes
    with pytest.raises(ConfigError, match="min_group_size"):
        folder.set_limit(DATASET, "min_group_size", "-1")
    with pytest.raises(ConfigError, match="unknown modeller or group"):
        folder.replace_policy("datasets: {ehr: {grants: [{to: [ghost], kinds: [train]}]}}", "test")
    assert folder.config.policies.datasets[DATASET].min_group_size == 1000  # the running policy is untouched
    folder.set_limit(DATASET, "columns.deny", "sex")
    # named, or read without being named: by DuckDB's COLUMNS(regex), by position, in the whole row,
    # renamed by the table's alias
    for reading in (f"SELECT sex, COUNT(*) AS n FROM {DATASET} GROUP BY sex",
                    f"SELECT MAX(COLUMNS('s.*')) AS m FROM {DATASET}", f"SELECT MAX(#2) AS m FROM {DATASET}",
                    f"SELECT COUNT(*) AS n FROM {DATASET} t WHERE CAST(t AS VARCHAR) LIKE '%F%'",
                    f"SELECT c, COUNT(*) AS n FROM {DATASET} AS t(a, b, c) GROUP BY c"):  # c is sex
        with pytest.raises(AccessDenied, match=r"column\(s\) \[.*'sex'.*\] of alice/ehr are not released"):
            modeller.sql(reading, datasets=target)


def test_a_custodian_can_withhold_min_and_max(alice: RunningPod, modeller: Modeller) -> None:
    target = [f"alice/{DATASET}"]
    oldest = f"SELECT sex, MAX(age) AS oldest FROM {DATASET} GROUP BY sex"
    assert len(modeller.sql(oldest, datasets=target, aggregate=True)) == 2  # released by default
    folder = PodFolder(alice.config_path)
    folder.set_limit(DATASET, "release_extremes", "false")
    with pytest.raises(AccessDenied, match=r"releases MIN and MAX, each one member's value, only to holders of "
                                           r"sql_rows.*\[rule: release_extremes\]"):
        modeller.sql(oldest, datasets=target, aggregate=True)
    with pytest.raises(AccessDenied, match=r"give a histogram its value_range"):  # by default it spans MIN to MAX
        federated_histogram(modeller, "age", table=DATASET, datasets=target)
    ages = federated_histogram(modeller, "age", table=DATASET, datasets=target, bins=4, value_range=(0, 120))
    assert sum(ages.counts) == 400 and ages.below == ages.above == 0
    folder.change_policy(lambda p: p.grant("modeller", p.modellers["modeller"], DATASET, ["sql_rows"]), "test")
    assert len(modeller.sql(oldest, datasets=target, aggregate=True)) == 2  # its rows grant covers them


def test_row_queries_are_capped_at_max_rows_and_say_so(alice: RunningPod, modeller: Modeller) -> None:
    folder = PodFolder(alice.config_path)
    folder.change_policy(lambda p: p.grant("modeller", p.modellers["modeller"], DATASET, ["sql_rows"]), "test")
    folder.set_limit(DATASET, "max_rows", "25")
    result = modeller.sql(f"SELECT age, sex FROM {DATASET}", datasets=[f"alice/{DATASET}"])
    assert isinstance(result, dict) and len(result[f"alice/{DATASET}"]) == 25
    assert result.disclosure == {f"alice/{DATASET}": {"rows_capped_at": 25}}


def training(modeller: Modeller, tmp_path: Path) -> Experiment:
    return Experiment(datasets=[f"alice/{DATASET}"], training_plan_class="logistic_regression",
                      model_args={"target": "outcome", "features": ["age", "bmi", "smoker"]},
                      training_args={"num_updates": 5, "loader_args": {"batch_size": 32},
                                     "optimizer_args": {"lr": 0.05}, "test_ratio": 0.25, "test_metric": "auc"},
                      round_limit=1, modeller=modeller, experiments_root=tmp_path / "experiments")


def test_training_refusals_name_their_rule_and_evaluate_is_its_own_grant(alice: RunningPod, modeller: Modeller,
                                                                          tmp_path: Path) -> None:
    folder = PodFolder(alice.config_path)
    experiment = training(modeller, tmp_path)
    with pytest.raises(RoundFailed, match=r"no grant of train on alice/ehr \[rule: grants\]"):
        experiment.run_once()
    folder.change_policy(lambda p: p.grant("modeller", p.modellers["modeller"], DATASET, ["evaluate"]), "test")
    scored = experiment.evaluate()["alice"]  # validation only: granted without train
    assert scored["num_samples"] == 100 and 0.0 <= scored["global_auc"] <= 1.0
    def evaluations() -> list[dict[str, object]]:  # the others are the SQL of the features' standardisation
        return [e for e in audit_events(alice, "task-completed") if "num_samples" in e]

    wait_until(lambda: len(evaluations()) == 1, 10, "the evaluation in the audit log")
    evaluated = evaluations()[0]  # the scores went back, not the modeller's own model
    assert evaluated["returned"] == "scores" and evaluated["result_blake3"] == bulk_digest([]).hex()
    experiment.set_test_ratio(0.005)  # 2 of the 400 rows: a metric that all but names their labels
    assert "the test rows are fewer than 3, this pod's min_group_size" in experiment.evaluate()["alice"]["error"]
    folder.change_policy(lambda p: p.grant("modeller", p.modellers["modeller"], DATASET, ["train"]), "test")
    with pytest.raises(RoundFailed, match=r"the test rows are fewer than 3.*\[rule: min_group_size\]"):
        experiment.run_once()
    experiment.set_test_ratio(0.25)
    folder.set_limit(DATASET, "models", "[mlp]")
    with pytest.raises(RoundFailed, match=r"model 'logistic_regression' is not among .*\[rule: models\]"):
        experiment.run_once()
    folder.set_limit(DATASET, "models", "null")
    folder.set_limit(DATASET, "require_secure_aggregation", "true")
    with pytest.raises(RoundFailed, match=r"only under secure aggregation \[rule: require_secure_aggregation\]"):
        experiment.run_once()
    folder.set_limit(DATASET, "require_secure_aggregation", "false")
    assert experiment.run_once() == 1
    experiment.close()


def test_rate_limits_and_expired_grants_are_refused_naming_the_rule(alice: RunningPod, modeller: Modeller) -> None:
    folder = PodFolder(alice.config_path)
    target = [f"alice/{DATASET}"]
    folder.set_limit(DATASET, "tasks_per_hour", "2")
    query = f"SELECT COUNT(*) AS n FROM {DATASET}"
    modeller.sql(query, datasets=target)
    modeller.sql(query, datasets=target)
    with pytest.raises(AccessDenied, match=r"ran 2 task\(s\) on alice/ehr in the last hour.*\[rule: tasks_per_hour\]"):
        modeller.sql(query, datasets=target)
    folder.set_limit(DATASET, "tasks_per_hour", "null")

    def expired(policy: Policy) -> Policy:
        data = policy.model_dump(mode="json")
        for grant in data["datasets"][DATASET]["grants"]:
            grant["expires"] = "2020-01-01"
        return Policy.model_validate(data)

    folder.change_policy(expired, "test")
    with pytest.raises(AccessDenied, match=r"expired on 2020-01-01 \[rule: expires\]"):
        modeller.sql(query, datasets=target)


def test_a_differencing_pair_is_refused_and_the_refusal_audited(alice: RunningPod, modeller: Modeller) -> None:
    """The classic attack vantage6 documents it does not stop: an average over a cohort, then over
    the same cohort but one patient — the difference would give that patient's age."""
    target = [f"alice/{DATASET}"]
    patients = pd.read_csv(PodFolder(alice.config_path).config.datasets[0].path)
    someone = patients.loc[patients["sex"] == "F", "patient_id"].iloc[0]
    first = modeller.sql(f"SELECT AVG(age) AS a FROM {DATASET} WHERE sex = 'F'", datasets=target)
    assert isinstance(first, dict)
    assert modeller.sql(f"SELECT AVG(age) AS a FROM {DATASET} WHERE sex = 'F'", datasets=target)  # the same again
    with pytest.raises(AccessDenied, match=r"differs by fewer than 3 rows from one already released.*differencing"):
        modeller.sql(f"SELECT AVG(age) AS a FROM {DATASET} WHERE sex = 'F' AND patient_id <> '{someone}'",
                     datasets=target)
    with pytest.raises(AccessDenied, match="protect_differencing"):  # also hidden in a FILTER of one query
        modeller.sql(f"SELECT AVG(age) AS a, AVG(age) FILTER (WHERE patient_id <> '{someone}') AS b FROM {DATASET}",
                     datasets=target)
    wait_until(lambda: len(audit_events(alice, "task-failed")) == 2, 10, "both refusals in the audit log")
    assert all(e["error"] == "AccessDenied" for e in audit_events(alice, "task-failed"))
    # her left out at random: an answer without her is refused, even where the comparison's own
    # selection (random() again) would have kept her and found no difference
    wandering = (f"SELECT AVG(age) AS a FROM {DATASET} WHERE sex = 'F' "
                 f"AND NOT (patient_id = '{someone}' AND random() < 0.5)")
    refused = 0
    for _ in range(12):
        try:
            answer = modeller.sql(wandering, datasets=target)
        except AccessDenied:
            refused += 1
            continue
        assert isinstance(answer, dict)
        assert answer[target[0]]["a"].iloc[0] == pytest.approx(first[target[0]]["a"].iloc[0])  # with her
    assert refused
    PodFolder(alice.config_path).set_limit(DATASET, "protect_differencing", "false")  # the custodian's choice
    assert modeller.sql(f"SELECT AVG(age) AS a FROM {DATASET} WHERE sex = 'F' AND patient_id <> '{someone}'",
                        datasets=target)
