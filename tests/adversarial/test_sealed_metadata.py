"""Finding 11 of the hardening issue: envelope headers showed sender names, message types and
task ids to every broker client, and discovery requests and heartbeats were plaintext. Here an
observer subscribed to everything on the (open) broker records every message while a modeller
discovers, runs an aggregate and a row query and a training round; none of it names a party,
a dataset, a column, a message type, a query or a task."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from rich.console import Console

from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, RunningPod, wait_until

pytestmark = pytest.mark.integration
Seen = list[tuple[str, dict[str, str], bytes]]


@pytest.fixture
def cardiology(pod_factory: PodFactory, open_broker: EmbeddedBroker, modeller_identity: Identity,
               tmp_path: Path) -> RunningPod:
    folder = write(generate(1, 400, seed=5), tmp_path / "data")[0]
    spec = DatasetSpec(name="cardiology_visits", type="csv", path=str(folder / "patients.csv"), tags=["cardiology"])
    return pod_factory("stmarys", [spec], [modeller_identity], on=open_broker)


@pytest.fixture
def observer(open_broker: EmbeddedBroker) -> Iterator[Seen]:
    """Every message on the broker — subject, headers, data — as a stranger subscribed to `>` sees it."""
    seen: Seen = []
    stop, ready = threading.Event(), threading.Event()

    async def watch() -> None:
        raw = await nats.connect(open_broker.url)

        async def keep(msg: nats.aio.msg.Msg) -> None:
            seen.append((msg.subject, dict(msg.headers or {}), bytes(msg.data)))

        await raw.subscribe(">", cb=keep)
        await raw.flush()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await raw.flush()
        await raw.close()

    thread = threading.Thread(target=asyncio.run, args=(watch(),))
    thread.start()
    assert ready.wait(10)
    yield seen
    stop.set()
    thread.join(10)


def test_a_broker_client_learns_no_names_types_tasks_or_datasets(
        cardiology: RunningPod, observer: Seen, open_broker: EmbeddedBroker, modeller_identity: Identity,
        keystore: Path, tmp_path: Path) -> None:
    with Modeller(modeller_identity, broker=open_broker.url, keystore=keystore, timeout_s=60) as modeller:
        modeller.sql("SELECT AVG(bmi) AS mean_bmi FROM cardiology_visits", tags=["cardiology"], aggregate=True)
        modeller.sql("SELECT age, smoker FROM cardiology_visits LIMIT 5", datasets=["stmarys/cardiology_visits"])
        Experiment(tags=["cardiology"], training_plan_class="logistic_regression",
                   model_args={"target": "outcome", "features": ["age", "bmi", "smoker"]},
                   training_args={"num_updates": 3}, round_limit=1, modeller=modeller,
                   experiments_root=tmp_path / "experiments", console=Console(quiet=True)).run()
        wait_until(lambda: sum(s.startswith(subjects.heartbeat("")) for s, _, _ in observer) >= 3, 10, "heartbeats")
    cardiology.stop()
    tasks = [e["task"] for e in map(json.loads, cardiology.audit_path.read_text().splitlines())
             if e["event"] == "task-received"]
    assert len(tasks) == 4  # the aggregate, the row query, the standardisation aggregate, the training round

    secrets = [b"stmarys", b"modeller", b"cardiology", b"bmi", b"smoker", b"outcome", b"SELECT",
               b"logistic", b"discover", b"advert", b"heartbeat", b"task", b"result", b"train",
               modeller_identity.public.sign_public, modeller_identity.public.box_public,
               *(task.encode() for task in tasks)]
    kinds = {subject.split(".")[2] for subject, _, _ in observer}
    assert {"discover", "inbox", "reply", "heartbeat"} <= kinds, kinds
    for subject, headers, data in observer:
        visible = data + json.dumps(headers).encode()
        leaked = [secret for secret in secrets if secret in visible]
        assert not leaked, f"{subject} shows {leaked}"
        assert set(headers) <= {"Fedpod-Transfer", "Fedpod-Chunk", "Fedpod-Begin"}
        if subject == subjects.DISCOVER:
            assert data == b""  # the ping says nothing, not even who pings
    # What routing needs stays visible: subjects name the recipient's (and, for replies, the
    # sender's) fingerprint, and a heartbeat shows the pod's public keys, which that fingerprint
    # already commits to.
    assert any(subject == subjects.inbox(cardiology.identity.fingerprint) for subject, _, _ in observer)
