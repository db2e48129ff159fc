"""Federated SQL across pods running as separate processes over a real NATS server."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.errors import AccessDenied, DatasetNotFound, PodUnreachable, TaskFailed
from fedpod.governance.audit import AuditLog
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, RunningPod, heartbeats

pytestmark = pytest.mark.integration
DATASET = "ehr-records-2025"
QUERY = (f"SELECT sex, smoker, COUNT(*) AS n, AVG(age) AS mean_age, STDDEV(bmi) AS sd_bmi, MIN(hba1c), MAX(hba1c) "
         f"FROM `{DATASET}` WHERE age > 30 GROUP BY sex, smoker HAVING COUNT(*) > 5 ORDER BY sex, smoker")


@pytest.fixture
def centres(tmp_path: Path) -> list[Path]:
    return [folder / "patients.csv" for folder in write(generate(3, 1500, seed=3), tmp_path / "data")]


@pytest.fixture
def three_pods(pod_factory: PodFactory, centres: list[Path], modeller_identity: Identity) -> list[RunningPod]:
    names = ["alice", "bob", "charlie"]
    return [pod_factory(name, [DatasetSpec(name=DATASET, type="csv", path=str(csv), tags=["ehr"])],
                        [modeller_identity]) for name, csv in zip(names, centres, strict=True)]


@pytest.fixture
def modeller(broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path) -> Modeller:
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=20) as client:
        yield client  # type: ignore[misc]


def pooled(query: str, files: list[Path]) -> pd.DataFrame:
    con = duckdb.connect()
    con.execute(f'CREATE TABLE "{DATASET}" AS ' + " UNION ALL ".join(f"SELECT * FROM read_csv('{f}')" for f in files))
    return con.sql(query.replace("`", '"')).df()


def identifiers(pods: list[RunningPod]) -> list[str]:
    return [f"{p.name}/{DATASET}" for p in pods]


def test_aggregated_query_equals_the_pooled_query(three_pods: list[RunningPod], modeller: Modeller,
                                                  centres: list[Path]) -> None:
    merged = modeller.sql(QUERY, datasets=identifiers(three_pods), aggregate=True)
    expected = pooled(QUERY, centres)
    assert isinstance(merged, pd.DataFrame)
    assert list(merged.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(merged.reset_index(drop=True), expected, check_dtype=False, rtol=1e-9)


def native_libraries(pod: RunningPod) -> set[str]:
    """Which of DuckDB's and numpy's compiled libraries the pod process has mapped."""
    maps = Path(f"/proc/{pod.process.pid}/maps").read_text()
    return {name for name, library in (("duckdb", "/_duckdb."), ("numpy", "/numpy/_core/")) if library in maps}


def test_a_pod_loads_duckdb_on_its_first_task_not_to_be_discovered(three_pods: list[RunningPod],
                                                                   modeller: Modeller) -> None:
    """An idle pod is lean (issue 11, item 5): its datasets' schemas come from a child process,
    so discovery needs no DuckDB in the pod; the first SQL task loads it."""
    found = modeller.datasets(tags=["ehr"])
    assert {d.identifier for d in found} == set(identifiers(three_pods))
    assert all(d.dataset.columns and d.dataset.rows_rounded for d in found)
    assert native_libraries(three_pods[0]) == set()
    modeller.sql(f"SELECT COUNT(*) AS n FROM `{DATASET}`", datasets=identifiers(three_pods)[:1], aggregate=True)
    assert native_libraries(three_pods[0]) == {"duckdb", "numpy"}


def test_quantiles_equal_the_pooled_quantiles(three_pods: list[RunningPod], modeller: Modeller,
                                              centres: list[Path]) -> None:
    """Exact federated quantiles (issue 10, item 6), searched over counts the pods merge."""
    query = (f"SELECT MEDIAN(age) AS median_age, QUANTILE_CONT(bmi, 0.9) AS bmi_p90, QUANTILE_DISC(hba1c, 0.25), "
             f"PERCENTILE_CONT(0.75) WITHIN GROUP (ORDER BY systolic_bp) AS sbp_p75 FROM `{DATASET}` WHERE smoker = 1")
    merged = modeller.sql(query, datasets=identifiers(three_pods), aggregate=True)
    expected = pooled(query, centres)
    assert isinstance(merged, pd.DataFrame) and list(merged.columns) == list(expected.columns)
    for column in expected.columns:
        assert float(merged[column][0]) == pytest.approx(float(expected[column][0]), rel=4e-16), column
    assert merged.attrs["steps"] <= 10 and merged.attrs["datasets"] == identifiers(three_pods)
    entries = [e for e in AuditLog(three_pods[0].audit_path).entries()
               if e["event"] == "task-received" and e.get("mode") == "quantile-step"]
    assert len(entries) == merged.attrs["steps"]  # each step audited at each pod, like any task


def test_a_histogram_over_the_global_range_equals_the_pooled_one(three_pods: list[RunningPod], modeller: Modeller,
                                                                 centres: list[Path]) -> None:
    from fedpod.modeller.histogram import federated_histogram

    ages = pooled(f"SELECT CAST(age AS DOUBLE) AS age FROM `{DATASET}`", centres)["age"].to_numpy()
    fixed = federated_histogram(modeller, "age", table=DATASET, bins=8, value_range=(20.0, 80.0),
                                datasets=identifiers(three_pods))
    expected, suppressed = np.zeros(8, dtype=int), 0
    for csv in centres:  # each pod suppresses its own bins of 1 or 2 patients before anything leaves
        own = pooled(f"SELECT CAST(age AS DOUBLE) AS age FROM `{DATASET}`", [csv])["age"].to_numpy()
        counts, _ = np.histogram(own[(own >= 20) & (own <= 80)], bins=8, range=(20.0, 80.0))
        expected += np.where((counts > 0) & (counts < 3), 0, counts)
        suppressed += int(((counts > 0) & (counts < 3)).sum())
    assert fixed.counts == expected.tolist()
    assert sum(d["suppressed_groups"] for d in fixed.disclosure.values()) >= suppressed > 0
    assert fixed.below <= int((ages < 20).sum()) and fixed.above <= int((ages > 80).sum())
    default = federated_histogram(modeller, "age", table=DATASET, datasets=identifiers(three_pods))
    assert (default.edges[0], default.edges[-1]) == (ages.min(), ages.max())
    assert default.below == default.above == 0 and sum(default.counts) <= len(ages)  # less any suppressed bins


def test_per_dataset_results_come_back_one_per_dataset(three_pods: list[RunningPod], modeller: Modeller,
                                                       centres: list[Path]) -> None:
    results = modeller.sql(QUERY, datasets=identifiers(three_pods))
    assert isinstance(results, dict) and list(results) == identifiers(three_pods)
    for identifier, csv in zip(identifiers(three_pods), centres, strict=True):
        pd.testing.assert_frame_equal(results[identifier], pooled(QUERY, [csv]), check_dtype=False)


def test_tags_select_one_dataset_per_pod(three_pods: list[RunningPod], modeller: Modeller, centres: list[Path]) -> None:
    count = modeller.sql(f"SELECT COUNT(*) AS n FROM `{DATASET}`", tags=["ehr"], aggregate=True)
    assert isinstance(count, pd.DataFrame) and int(count["n"][0]) == 1500


def test_unknown_modeller_is_refused_with_a_clear_error(three_pods: list[RunningPod], broker: EmbeddedBroker,
                                                        tmp_path: Path, modeller: Modeller) -> None:
    stranger = Identity.generate("stranger")
    broker.allow("modeller", stranger.public)  # on the broker, but no pod accepts it
    with Modeller(stranger, broker=broker.url, keystore=tmp_path / "stranger", timeout_s=20) as client:
        with pytest.raises(AccessDenied, match=r"unknown to pod alice \[rule: modeller\].*access request 1 is pending"):
            client.sql(f"SELECT COUNT(*) FROM `{DATASET}`", datasets=[f"alice/{DATASET}"])
        assert client.datasets() == []  # no identifiers, tags, columns or row counts for strangers
    assert modeller.sql(f"SELECT COUNT(*) AS n FROM `{DATASET}`", datasets=[f"alice/{DATASET}"])


def test_malicious_sql_is_refused_and_the_pod_keeps_serving(three_pods: list[RunningPod], modeller: Modeller) -> None:
    target = [f"alice/{DATASET}"]
    for query in ("SELECT * FROM read_csv('/etc/passwd')", f"SELECT 1 FROM `{DATASET}`; DROP TABLE `{DATASET}`",
                  f"COPY `{DATASET}` TO '/tmp/leak.csv'"):
        with pytest.raises(TaskFailed, match="SqlRejected"):
            modeller.sql(query, datasets=target)
    result = modeller.sql(f"SELECT COUNT(*) AS n FROM `{DATASET}`", datasets=target)
    assert isinstance(result, dict) and int(result[target[0]]["n"][0]) > 0


def test_unknown_dataset_and_missing_pod_are_named(three_pods: list[RunningPod], modeller: Modeller) -> None:
    with pytest.raises(DatasetNotFound, match="pod 'alice' has no dataset 'nope'"):
        modeller.sql("SELECT 1", datasets=["alice/nope"])
    modeller._core.timeout_s = 1.0
    with pytest.raises(DatasetNotFound, match="pod 'zed' did not answer"):
        modeller.sql("SELECT 1", datasets=["zed/ehr"])


def test_pod_that_goes_offline_is_named_in_the_error(pod_factory: PodFactory, centres: list[Path],
                                                     modeller: Modeller, modeller_identity: Identity) -> None:
    pod = pod_factory("dora", [DatasetSpec(name=DATASET, type="csv", path=str(centres[0]))], [modeller_identity])
    targets = modeller.resolve([f"dora/{DATASET}"])
    pod.stop()
    from fedpod.wire.messages import SqlQueryAlgorithm

    with pytest.raises(PodUnreachable, match="dora"):
        modeller._call(modeller._core._sql_result(targets[0], SqlQueryAlgorithm(query="SELECT 1")))


def test_heartbeats_and_other_tasks_continue_during_a_long_query(pod_factory: PodFactory, centres: list[Path],
                                                                 modeller: Modeller, modeller_identity: Identity,
                                                                 broker: EmbeddedBroker) -> None:
    pod = pod_factory("erin", [DatasetSpec(name=DATASET, type="csv", path=str(centres[2]))], [modeller_identity],
                      sql_timeout_s=4.0)
    with heartbeats(broker, pod) as beats:
        slow = (f"SELECT SUM(a.age * b.age + c.age * d.age) FROM `{DATASET}` a, `{DATASET}` b, `{DATASET}` c, "
                f"`{DATASET}` d")
        failure: list[BaseException] = []

        def run_slow() -> None:
            try:
                modeller.sql(slow, datasets=[f"erin/{DATASET}"])
            except BaseException as exc:  # the pod stops the query at its timeout
                failure.append(exc)

        worker = threading.Thread(target=run_slow)
        started = time.monotonic()
        worker.start()
        quick = modeller.sql(f"SELECT COUNT(*) AS n FROM `{DATASET}`", datasets=[f"erin/{DATASET}"])
        quick_seconds = time.monotonic() - started
        worker.join(30)
        during = [b for b in beats if b > started]
    assert isinstance(quick, dict) and quick_seconds < 3.0
    assert failure and "TaskTimeout" in str(failure[0])
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert len(during) >= 10 and max(gaps) < 1.0, gaps


def test_a_query_that_asks_for_too_much_memory_fails_and_the_pod_goes_on(pod_factory: PodFactory,
                                                                       centres: list[Path], modeller: Modeller,
                                                                       modeller_identity: Identity) -> None:
    """DuckDB's memory_limit bounds its buffers, not the values its functions make: a list of
    age x 10M numbers for each row asks for gigabytes a row, which had the machine's kernel kill
    processes. Under the pod's cap the allocation fails, and with it the task alone."""
    pod = pod_factory("frank", [DatasetSpec(name=DATASET, type="csv", path=str(centres[0]))], [modeller_identity],
                      max_memory="1GB")
    target = [f"frank/{DATASET}"]
    before = modeller.sql(f"SELECT COUNT(*) AS n FROM `{DATASET}`", datasets=target)
    # checked before asking for more: 1GB is 10^9 bytes
    assert isinstance(before, dict) and "memory capped at 0.9 GiB (max_memory: 1.0GB)" in pod.output()
    with pytest.raises(TaskFailed, match=r"Out of Memory Error"):
        modeller.sql(f"SELECT COUNT(*) AS n FROM `{DATASET}` WHERE len(range(age * 10000000)) > 0", datasets=target)
    answer = modeller.sql(f"SELECT COUNT(*) AS n FROM `{DATASET}`", datasets=target)
    assert isinstance(answer, dict) and answer[target[0]].equals(before[target[0]]) and pod.process.poll() is None
