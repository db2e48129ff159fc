"""Differential privacy over real NATS with pods as processes (issue 10, items 3 and 4): a DP run
reports epsilon per round and pod, in `training_replies()` and metrics.csv; a pod with an epsilon
budget refuses training without DP, and refuses DP rounds once the budget is spent — also after
it restarts; central DP under secure aggregation trains a model that still predicts."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedpod.algorithms.training.privacy import Mechanism, epsilon
from fedpod.data.synth import generate, write
from fedpod.errors import AccessDenied
from fedpod.governance.audit import AuditLog
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import RoundFailed
from fedpod.pod.custodian import PodFolder
from fedpod.security.identity import Identity
from tests.conftest import PodFactory, start_pod_process
from tests.integration.test_secure_aggregation import DATASET, TRAINING, experiment, modeller, start_pods

pytestmark = pytest.mark.integration
__all__ = ["modeller"]  # the fixture, shared
LOCAL = {**TRAINING, "dp_args": {"type": "local", "sigma": 1.0, "clip": 1.0, "delta": 1e-5}}


def round_mechanism(csv_path: Path) -> Mechanism:
    """What one round of LOCAL costs at the pod serving `csv_path` (its training split's batches)."""
    rows = len(pd.read_csv(csv_path))
    batches = math.ceil((rows - round(rows * TRAINING["test_ratio"])) / TRAINING["loader_args"]["batch_size"])
    return Mechanism(1.0, 1 / batches, TRAINING["num_updates"])


def test_a_dp_run_reports_epsilon_and_the_budget_refuses_once_spent_also_after_a_restart(
        pod_factory: PodFactory, modeller: Modeller, modeller_identity: Identity, tmp_path: Path) -> None:
    csvs = [f / "patients.csv" for f in write(generate(2, 800, seed=8), tmp_path / "data")]
    pods = start_pods(pod_factory, modeller_identity, csvs, ["alice", "bob"])
    one_round = {pod.name: epsilon([round_mechanism(path)], 1e-5) for pod, path in zip(pods, csvs, strict=True)}
    two_rounds = {pod.name: epsilon([round_mechanism(path)] * 2, 1e-5) for pod, path in zip(pods, csvs, strict=True)}
    for pod in pods:  # room for two rounds of one experiment, not for a third round of another
        PodFolder(pod.config_path).set_limit(DATASET, "epsilon_budget", str(two_rounds[pod.name] * 1.2))

    plain = experiment(modeller, tmp_path, "plain", round_limit=1)
    with pytest.raises((RoundFailed, AccessDenied), match=r"rule: epsilon_budget"):
        plain.run_once()
    plain.close()

    private = experiment(modeller, tmp_path, "private", training_args=LOCAL)
    private.run()
    replies = private.training_replies()
    for pod in ("alice", "bob"):
        assert replies[0][pod]["dp_epsilon"] == pytest.approx(one_round[pod])
        assert replies[1][pod]["dp_epsilon"] == pytest.approx(two_rounds[pod])  # the rounds compose (RDP)
    assert all("loss" not in r and "global_auc" not in r for pods_ in replies.values() for r in pods_.values())
    with (private.experimentation_path() / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["dp_epsilon"]) for r in rows if r["pod"] == "alice"] == pytest.approx(
        [one_round["alice"], two_rounds["alice"]])
    private.close()

    alice = pods[0]
    alice.stop()
    alice.process, alice.log = start_pod_process(alice.config_path)  # the ledger is on disk
    again = experiment(modeller, tmp_path, "again", training_args=LOCAL, round_limit=1)
    with pytest.raises((RoundFailed, AccessDenied), match=r"remains of .* budget .*rule: epsilon_budget"):
        again.run_once()
    again.close()
    charges = [e for e in AuditLog(alice.audit_path).entries() if e["event"] == "privacy-charge"]
    assert len(charges) == 2 and sum(c["epsilon"] for c in charges) == pytest.approx(two_rounds["alice"], rel=1e-4)


def test_central_dp_under_secure_aggregation_trains_a_useful_model(
        pod_factory: PodFactory, modeller: Modeller, modeller_identity: Identity, tmp_path: Path) -> None:
    csvs = [f / "patients.csv" for f in write(generate(3, 3000, seed=9), tmp_path / "data")]
    start_pods(pod_factory, modeller_identity, csvs, ["alice", "bob", "charlie"])
    training: dict[str, Any] = {**TRAINING, "num_updates": 30,
                                "dp_args": {"type": "central", "sigma": 0.1, "clip": 1.0, "delta": 1e-5}}
    private = experiment(modeller, tmp_path, "central", secagg=True, training_args=training, round_limit=3,
                         standardize=True)
    private.run()
    replies = private.training_replies()
    # each pod adds a 1/sqrt(3) share of sigma * clip and counts on the threshold of 2 shares
    expected = epsilon([Mechanism(0.1 * math.sqrt(2 / 3) / 2, 1.0, 1)] * 3, 1e-5)
    assert all(r["dp_epsilon"] == pytest.approx(expected) for r in replies[2].values())
    plain = experiment(modeller, tmp_path, "plain", training_args={**training, "dp_args": None}, round_limit=3,
                       standardize=True)
    plain.run()
    # the custodian's `evaluate` grant: exact scores, outside epsilon
    scores, reference = private.evaluate(), plain.evaluate()
    for pod, score in scores.items():
        assert score["global_auc"] > reference[pod]["global_auc"] - 0.05, (scores, reference)
    private.close()
    plain.close()


def test_noisy_sql_charges_the_same_budget_and_is_refused_once_it_is_spent(
        pod_factory: PodFactory, modeller: Modeller, modeller_identity: Identity, tmp_path: Path) -> None:
    csvs = [f / "patients.csv" for f in write(generate(2, 20_000, seed=10), tmp_path / "data")]
    pods = start_pods(pod_factory, modeller_identity, csvs, ["alice", "bob"])
    for pod in pods:
        PodFolder(pod.config_path).set_limit(DATASET, "epsilon_budget", "1.2")
    query = f"SELECT COUNT(*) AS n, AVG(age) AS mean_age FROM {DATASET} WHERE smoker = 1"
    exact = pd.concat([pd.read_csv(c) for c in csvs]).query("smoker == 1")
    # Each pod adds Laplace noise to 3 partials (COUNT(*), SUM(age), COUNT(age)) with epsilon 0.5/3 each:
    # scale 6 on a count, 660 on the sum. The sum of two pods' noise exceeds 30 scales with
    # probability about 1e-12, which bounds the answers without making the test a coin toss.
    tail, count_scale, sum_scale = 30, 1 * 3 / 0.5, 110 * 3 / 0.5
    count_tolerance = tail * count_scale
    mean_tolerance = (tail * sum_scale + 110 * count_tolerance) / (len(exact) - count_tolerance)
    for _ in range(2):
        noisy = modeller.sql(query, tags=["ehr"], aggregate=True, dp={"epsilon": 0.5, "bounds": {"age": [0, 110]}})
        assert isinstance(noisy, pd.DataFrame)
        assert abs(int(noisy["n"][0]) - len(exact)) < count_tolerance
        assert abs(float(noisy["mean_age"][0]) - exact["age"].mean()) < mean_tolerance
        assert float(noisy["mean_age"][0]) != exact["age"].mean()  # noise was added
    assert all(d["dp_epsilon"] == 0.5 for d in noisy.attrs["disclosure"].values())
    assert [d["dp_epsilon_remaining"] for d in noisy.attrs["disclosure"].values()] == pytest.approx([0.2, 0.2])
    with pytest.raises(AccessDenied, match=r"only 0\.2 remains of modeller's budget of 1\.2 .*rule: epsilon_budget"):
        modeller.sql(query, tags=["ehr"], aggregate=True, dp={"epsilon": 0.5, "bounds": {"age": [0, 110]}})
    exact_answer = modeller.sql(query, tags=["ehr"], aggregate=True)  # exact aggregates stay under disclosure control
    assert isinstance(exact_answer, pd.DataFrame) and int(exact_answer["n"][0]) == len(exact)
    charges = [e for e in AuditLog(pods[0].audit_path).entries() if e["event"] == "privacy-charge"]
    assert [c["epsilon"] for c in charges] == [0.5, 0.5]
    [spend] = PodFolder(pods[0].config_path).privacy_spend()  # the custodian's view
    assert spend == {"dataset": DATASET, "modeller": "modeller", "spent": 1.0, "budget": 1.2,
                     "scope": "per_modeller", "remaining": pytest.approx(0.2)}
    shown = subprocess.run([sys.executable, "-m", "fedpod.cli", "policy", "budget", "--config",
                            str(pods[0].config_path)], capture_output=True, text=True, check=True,
                           env={**os.environ, "COLUMNS": "200"}).stdout
    assert "modeller" in shown and "1.2" in shown and "0.2" in shown
