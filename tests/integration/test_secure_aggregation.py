"""Secure aggregation over real NATS with pods as processes (issue 10, item 1): the same model as
a plain run within the fixed-point tolerance; pods lost after masking or failing after the key
exchange recovered; a pod whose policy requires it refuses plain aggregation."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedpod.aggregation.secure.fixedpoint import Quantisation
from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.errors import AccessDenied
from fedpod.governance.audit import AuditLog
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment, RoundFailed
from fedpod.pod.custodian import PodFolder
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, RunningPod

pytestmark = pytest.mark.integration
DATASET = "ehr"
FEATURES = ["age", "bmi", "smoker", "diabetes", "systolic_bp", "cholesterol", "hba1c"]
MODEL_ARGS = {"target": "outcome", "features": FEATURES}
TRAINING = {"num_updates": 10, "loader_args": {"batch_size": 32}, "optimizer_args": {"lr": 0.05}, "random_seed": 7,
            "test_ratio": 0.2, "test_metric": "auc", "test_on_global_updates": True}


@pytest.fixture
def modeller(broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path) -> Any:
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=60) as client:
        yield client


def start_pods(pod_factory: PodFactory, identity: Identity, csvs: list[Path], names: list[str]) -> list[RunningPod]:
    return [pod_factory(name, [DatasetSpec(name=DATASET, kind="csv", path=str(csv), tags=["ehr"])], [identity])
            for name, csv in zip(names, csvs, strict=True)]


def experiment(modeller: Modeller, tmp_path: Path, folder: str, **overrides: Any) -> Experiment:
    arguments: dict[str, Any] = {"tags": ["ehr"], "training_plan_class": "logistic_regression",
                                 "model_args": MODEL_ARGS, "training_args": TRAINING, "round_limit": 2,
                                 "modeller": modeller, "standardize": False, "experiments_root": tmp_path / folder}
    return Experiment(**{**arguments, **overrides})


def test_a_secure_run_gives_the_plain_runs_model_within_the_fixed_point_tolerance(
        pod_factory: PodFactory, modeller: Modeller, modeller_identity: Identity, tmp_path: Path) -> None:
    csvs = [f / "patients.csv" for f in write(generate(3, 900, seed=3), tmp_path / "data")]
    pods = start_pods(pod_factory, modeller_identity, csvs, ["alice", "bob", "charlie"])
    plain = experiment(modeller, tmp_path, "plain")
    plain.run()
    secure = experiment(modeller, tmp_path, "secure", secagg=True)
    secure.run()
    for name, value in plain.aggregated_params()[1]["params"].items():
        difference = np.max(np.abs(secure.aggregated_params()[1]["params"][name] - value))
        assert difference <= 1e-4, (name, difference)  # 2 rounds, each within 1.9e-6 of the plain average
    replies = secure.training_replies()[1]
    assert set(replies) == {"alice", "bob", "charlie"} and all("global_auc" in r for r in replies.values())
    assert all(r["num_samples"] == 0 and r["secagg_clipped"] == 0 for r in replies.values())  # no count leaves
    for pod in pods:
        entries = [e for e in AuditLog(pod.audit_path).entries() if e["event"] == "secagg-unmasked"]
        assert len(entries) == 2 and entries[0]["self_mask_shares"] == 3 and entries[0]["mask_key_shares"] == 0
    plain.close()
    secure.close()
    assert Quantisation().step < 2e-6


def test_a_pod_requiring_secure_aggregation_refuses_a_plain_task(
        pod_factory: PodFactory, modeller: Modeller, modeller_identity: Identity, tmp_path: Path) -> None:
    csvs = [f / "patients.csv" for f in write(generate(2, 600, seed=4), tmp_path / "data")]
    pods = start_pods(pod_factory, modeller_identity, csvs, ["alice", "bob"])
    PodFolder(pods[0].config_path).set_limit(DATASET, "require_secure_aggregation", "true")
    plain = experiment(modeller, tmp_path, "plain", round_limit=1)
    with pytest.raises((RoundFailed, AccessDenied), match=r"require_secure_aggregation"):
        plain.run_once()
    plain.close()
    secure = experiment(modeller, tmp_path, "secure", round_limit=1, secagg=True)
    assert secure.run_once() == 1
    secure.close()


def test_a_pod_failing_after_the_key_exchange_is_recovered_and_named(
        pod_factory: PodFactory, modeller: Modeller, modeller_identity: Identity, tmp_path: Path) -> None:
    csvs = [f / "patients.csv" for f in write(generate(4, 1200, seed=5), tmp_path / "data")]
    broken = tmp_path / "no-target.csv"
    pd.read_csv(csvs[3]).drop(columns=["outcome"]).to_csv(broken, index=False)  # trains, then fails: no target
    start_pods(pod_factory, modeller_identity, [*csvs[:3], broken], ["alice", "bob", "charlie", "dave"])
    secure = experiment(modeller, tmp_path, "secure", round_limit=1, secagg=True, min_pods=3)
    assert secure.run_once() == 1
    replies = secure.training_replies()[0]
    assert "dropped out: training step" in replies["dave"]["error"] and "outcome" in replies["dave"]["error"]
    reference = experiment(modeller, tmp_path, "plain", round_limit=1, nodes=["alice", "bob", "charlie"])
    reference.run_once()
    for name, value in reference.aggregated_params()[0]["params"].items():
        assert np.max(np.abs(secure.aggregated_params()[0]["params"][name] - value)) <= 2e-6
    secure.close()
    reference.close()


def test_two_of_ten_pods_killed_after_masking_and_the_round_still_completes(
        pod_factory: PodFactory, modeller: Modeller, modeller_identity: Identity, tmp_path: Path) -> None:
    """The two small pods finish training first; the test kills each as soon as its masked update
    has arrived, before the eight large pods are done, so that the unmasking goes on without
    them: their self masks are rebuilt from the others' shares."""
    sizes = [100, 100] + [1500] * 8
    centres = generate(10, 16_000, seed=6)
    folders = write([dataclasses.replace(c, patients=c.patients.head(size)) for c, size in zip(centres, sizes,
                                                                                              strict=True)],
                    tmp_path / "data")
    names = [f"pod{i}" for i in range(10)]
    pods = start_pods(pod_factory, modeller_identity, [f / "patients.csv" for f in folders], names)
    slow = {**TRAINING, "num_updates": None, "epochs": 1, "loader_args": {"batch_size": 8}, "test_ratio": 0.0}
    secure = experiment(modeller, tmp_path, "secure", round_limit=1, secagg=True, min_pods=8,
                        training_plan_class="mlp", model_args={**MODEL_ARGS, "hidden": [64]}, training_args=slow)
    killed: list[str] = []

    def kill_the_small_pods_once_masked() -> None:
        deadline = time.monotonic() + 120
        while len(killed) < 2 and time.monotonic() < deadline:
            for pod in pods[:2]:
                if pod.name not in killed and any(phase == "done" for phase, _ in
                                                  secure.round_progress().get(0, {}).get(pod.name, [])):
                    pod.process.kill()
                    killed.append(pod.name)
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_the_small_pods_once_masked)
    watcher.start()
    assert secure.run_once() == 1
    watcher.join()
    assert sorted(killed) == ["pod0", "pod1"]
    replies = secure.training_replies()[0]  # the two killed pods' updates are in the sum: they took part
    assert all(f"pod{i}" in replies and "error" not in replies[f"pod{i}"] for i in range(10)), replies
    assert pods[2].process.poll() is None
    secure.close()


def test_secure_sql_sums_equal_the_plain_ones_and_a_pod_lost_after_the_keys_is_named(
        pod_factory: PodFactory, modeller: Modeller, modeller_identity: Identity, tmp_path: Path) -> None:
    """Issue 10, item 1 for SQL: COUNT, SUM and AVG summed under secure aggregation."""
    from fedpod.errors import NotMergeable

    csvs = [f / "patients.csv" for f in write(generate(3, 1500, seed=11), tmp_path / "data")]
    few = tmp_path / "few-smokers.csv"  # a fourth pod whose cell holds 2 smokers: it refuses after the key exchange
    frame = pd.read_csv(csvs[0])
    pd.concat([frame[frame.smoker == 1].head(2), frame[frame.smoker == 0].head(50)]).to_csv(few, index=False)
    start_pods(pod_factory, modeller_identity, [*csvs, few], ["alice", "bob", "charlie", "dave"])
    query = f"SELECT COUNT(*) AS n, AVG(age) AS mean_age, SUM(bmi) AS total_bmi FROM {DATASET} WHERE smoker = 1"
    three = [f"{name}/{DATASET}" for name in ("alice", "bob", "charlie")]
    plain = modeller.sql(query, datasets=three, aggregate=True)
    secure = modeller.sql(query, datasets=three, aggregate=True, secure=True)
    assert isinstance(plain, pd.DataFrame) and isinstance(secure, pd.DataFrame) and secure.attrs["secure"]
    assert int(secure["n"][0]) == int(plain["n"][0])  # counts are exact
    assert abs(float(secure["total_bmi"][0]) - float(plain["total_bmi"][0])) <= 3 * 2**-21
    assert float(secure["mean_age"][0]) == pytest.approx(float(plain["mean_age"][0]), rel=1e-12)
    everyone = modeller.sql(query, tags=["ehr"], aggregate=True, secure=True, min_datasets=3)
    assert isinstance(everyone, pd.DataFrame) and int(everyone["n"][0]) == int(plain["n"][0])
    assert "min_group_size" in everyone.attrs["missing"][f"dave/{DATASET}"]
    with pytest.raises(NotMergeable, match="GROUP BY"):
        modeller.sql(f"SELECT sex, COUNT(*) FROM {DATASET} GROUP BY sex", tags=["ehr"], aggregate=True, secure=True)
