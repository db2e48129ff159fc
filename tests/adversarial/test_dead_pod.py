"""Finding 8 of the hardening issue: the modeller ignored heartbeats, so a pod killed mid-task
cost the whole timeout (61 s for SQL, 600 s for a training round), and a pod killed after
acknowledging a task left no `task-received` entry in its audit log. Killed mid-query and mid-round."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.errors import PodLost
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, wait_until

pytestmark = pytest.mark.integration
SLOW = ("SELECT COUNT(*) AS n FROM t x, t y WHERE x.a < 3000 "
        "AND md5(CAST(x.a * y.a AS VARCHAR)) LIKE 'abc%'")  # about a minute of work for the pod


def test_a_pod_killed_mid_task_is_declared_lost_within_seconds_and_its_log_kept_the_task(
        pod_factory: PodFactory, broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path,
        table_csv: Path) -> None:
    pod = pod_factory("alice", [DatasetSpec(name="t", type="csv", path=str(table_csv))], [modeller_identity],
                      sql_timeout_s=300)
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=120) as modeller:
        modeller.sql("SELECT COUNT(*) AS n FROM t", datasets=["alice/t"])
        killer = threading.Timer(1.5, pod.process.send_signal, args=(signal.SIGKILL,))
        killer.start()
        started = time.monotonic()
        with pytest.raises(PodLost, match="pod alice stopped sending heartbeats"):
            modeller.sql(SLOW, datasets=["alice/t"])
        elapsed = time.monotonic() - started
        killer.join()
    assert elapsed < 15, f"declared lost after {elapsed:.1f}s"
    entries = [json.loads(line) for line in pod.audit_path.read_text().splitlines()]
    assert any(e["event"] == "task-received" and e.get("query") == SLOW for e in entries)


def test_a_pod_killed_mid_round_is_declared_lost_and_the_round_completes_with_the_others(
        pod_factory: PodFactory, broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path,
        tmp_path: Path) -> None:
    """The same for training: with `min_pods=1` the round goes on with bob's update, within
    seconds of alice's death instead of the 600 s round timeout, and names alice as lost."""
    folders = write(generate(2, 4_000, seed=2), tmp_path / "data")
    alice, bob = (pod_factory(name, [DatasetSpec(name="ehr", type="csv", path=str(folder / "patients.csv"),
                                                 tags=["ehr"])], [modeller_identity])
                  for name, folder in zip(["alice", "bob"], folders, strict=True))

    killed_at: list[float] = []

    def kill_alice_once_training() -> None:
        """Once the modeller hears that alice works on the task (she acknowledged it and her
        heartbeat says so): she is still preparing (importing PyTorch), far from replying. Killed
        before she acknowledged, she would be unreachable instead, which is another test's matter."""
        def working() -> bool:
            steps = experiment.round_progress().get(0, {}).get("alice", [])
            return any(phase in ("preparing", "training") for phase, _ in steps)

        wait_until(working, 60, "alice at work on her training task")
        alice.process.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=600) as modeller:
        experiment = Experiment(tags=["ehr"], training_plan_class="logistic_regression", min_pods=1,
                                model_args={"target": "outcome", "features": ["age", "bmi", "smoker"]},
                                training_args={"num_updates": 200}, round_limit=1, modeller=modeller,
                                experiments_root=tmp_path / "experiments", console=Console(quiet=True))
        experiment._targets()  # discovery first, so the timer measures the round alone
        killer = threading.Thread(target=kill_alice_once_training)
        killer.start()
        started = time.monotonic()
        experiment.run()
        elapsed = time.monotonic() - started
        killer.join()
    failed, failed_at = experiment.round_progress()[0]["alice"][-1]
    assert failed == "failed"
    noticed = started + failed_at - killed_at[0]  # the round's clock starts just after `started`
    assert noticed < 15, f"alice was declared lost {noticed:.1f}s after she died (5 s of silence expected)"
    assert elapsed < 120, f"the round took {elapsed:.1f}s (the round timeout is 600 s)"
    replies = experiment.training_replies()[0]
    assert replies["bob"]["num_samples"] > 0
    assert "pod alice stopped sending heartbeats" in replies["alice"]["error"]
    assert bob.process.poll() is None
