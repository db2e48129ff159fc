"""A three-member NATS cluster: pods on different members from the modeller's, and a member
killed mid-experiment — SQL and training both complete, and every audit log verifies with each
task in it once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.governance.audit import AuditLog
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.modeller.standardise import global_standardisation
from fedpod.security.identity import Identity
from fedpod.transport.cluster import BrokerCluster
from tests.conftest import PodFactory, RunningPod, wait_until

pytestmark = pytest.mark.integration
PODS = ["alice", "bob", "charlie"]
FEATURES = ["age", "bmi", "smoker", "diabetes", "systolic_bp", "cholesterol", "hba1c"]


@pytest.fixture
def cluster(tmp_path: Path, modeller_identity: Identity) -> Iterator[BrokerCluster]:
    with BrokerCluster(3, folder=tmp_path / "cluster") as running:
        running.allow("modeller", modeller_identity.public)
        yield running


@pytest.fixture
def pods(cluster: BrokerCluster, pod_factory: PodFactory, tmp_path: Path,
         modeller_identity: Identity) -> list[RunningPod]:
    """alice and bob on member 1, charlie on member 2; the modeller will use member 3."""
    files = [folder / "patients.csv" for folder in write(generate(3, 1500, seed=11), tmp_path / "data")]
    return [pod_factory(name, [DatasetSpec(name="ehr", kind="csv", path=str(csv), tags=["ehr"])],
                        [modeller_identity], on=cluster.members[0 if i < 2 else 1], heartbeat_s=0.5)
            for i, (name, csv) in enumerate(zip(PODS, files, strict=True))]


def completed_tasks(pod: RunningPod) -> list[str]:
    assert AuditLog.verify(pod.audit_path).ok
    return [e["task"] for e in AuditLog(pod.audit_path).entries() if e["event"] == "task-completed"]


def in_background(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_sql_loses_nothing_when_members_die(cluster: BrokerCluster, pods: list[RunningPod],
                                            modeller_identity: Identity, keystore: Path) -> None:
    """Queries run back to back while the pods' member dies (and comes back), then while the
    modeller's own member dies: every query answers, exactly."""
    with Modeller(modeller_identity, broker=cluster.members[2].url, keystore=keystore, timeout_s=60) as modeller:
        def total() -> int:
            frame = modeller.sql("SELECT COUNT(*) AS n FROM ehr", datasets=[f"{p}/ehr" for p in PODS], aggregate=True)
            return int(frame["n"][0])

        expected = total()
        answered = 1
        for victim in (0, 2):
            killer = in_background(lambda victim=victim: (time.sleep(0.3), cluster.kill(victim)))
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                assert total() == expected
                answered += 1
            killer.join()
            cluster.restart(victim)
        assert total() == expected
    tasks = [task for pod in pods for task in completed_tasks(pod)]
    assert len(tasks) == len(set(tasks)) == (answered + 1) * len(pods)  # each task ran once, none was lost


def test_training_completes_when_the_modellers_member_dies(cluster: BrokerCluster, pods: list[RunningPod],
                                                          modeller_identity: Identity, keystore: Path,
                                                          tmp_path: Path) -> None:
    with Modeller(modeller_identity, broker=cluster.members[2].url, keystore=keystore, timeout_s=120) as modeller:
        exp = Experiment(tags=["ehr"], training_plan_class="logistic_regression",
                         model_args={"target": "outcome"} | global_standardisation(
                             modeller, modeller.resolve(tags=["ehr"]), FEATURES),
                         training_args={"num_updates": 400, "loader_args": {"batch_size": 16},
                                        "optimizer_args": {"lr": 0.05}, "random_seed": 3},
                         round_limit=4, modeller=modeller, experiments_root=tmp_path / "experiments")
        trained = lambda: sum(  # noqa: E731
            1 for pod in pods for e in AuditLog(pod.audit_path).entries()
            if e["event"] == "task-received" and e.get("kind") == "train")
        killer = in_background(lambda: (wait_until(lambda: trained() >= 4, 60, "round 2 to start"),
                                        cluster.kill(2)))
        assert exp.run() == 4
        killer.join()
        assert not cluster.members[2].running
        assert sorted(exp.training_replies()) == [0, 1, 2, 3]
    for pod in pods:
        entries = list(AuditLog(pod.audit_path).entries())
        training = {e["task"] for e in entries if e["event"] == "task-received" and e.get("kind") == "train"}
        assert len(training) == 4 and training <= set(completed_tasks(pod))


def test_jetstream_is_replicated_across_the_members(tmp_path: Path) -> None:
    """A stream with three replicas keeps its messages, and takes new ones, after a member dies."""
    with BrokerCluster(3, folder=tmp_path / "cluster", open=True) as cluster:
        async def scenario() -> None:
            client = await nats.connect(cluster.url.split(","))
            stream = client.jetstream()
            deadline = time.monotonic() + 20
            while True:  # the members elect a JetStream meta leader first
                try:
                    await stream.add_stream(name="journal", subjects=["journal.>"], num_replicas=3)
                    break
                except nats.errors.Error:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            for i in range(5):
                await stream.publish("journal.entry", f"entry {i}".encode())
            info = await stream.stream_info("journal")
            assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2
            cluster.kill(0)
            deadline = time.monotonic() + 20
            while True:  # a new stream leader if the dead member led it
                try:
                    await stream.publish("journal.entry", b"after the loss", timeout=2)
                    break
                except (nats.errors.Error, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            assert (await stream.stream_info("journal")).state.messages == 6
            await client.close()

        asyncio.run(scenario())
