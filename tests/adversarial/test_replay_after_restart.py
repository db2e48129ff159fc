"""Finding 4 of the hardening issue: the replay cache lived in memory, so a task envelope captured
off the wire and replayed after the pod restarted (within the 5-minute validity window) ran
again, audited as the modeller's own allowed task."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from fedpod.modeller.client import Modeller
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import RunningPod, start_pod_process

pytestmark = pytest.mark.integration


def test_a_task_captured_before_a_restart_does_not_run_after_it(
        exposed_pod: RunningPod, exposed_modeller: Modeller, open_broker: EmbeddedBroker) -> None:
    inbox = subjects.inbox(exposed_pod.identity.fingerprint)
    captured: list[bytes] = []
    asyncio.run(capture_spy_and_query(exposed_modeller, open_broker.url, inbox, captured))
    assert len(captured) == 2  # a discovery request and the task: sealed, the spy cannot tell which is which

    exposed_pod.stop()
    received = task_ids(exposed_pod)
    assert len(received) == 1
    exposed_pod.process, exposed_pod.log = start_pod_process(exposed_pod.config_path)

    async def replay() -> None:
        raw = await nats.connect(open_broker.url)
        for frame in captured:
            await raw.publish(inbox, frame)
        await raw.flush()
        await asyncio.sleep(1.0)
        await raw.close()

    asyncio.run(replay())
    exposed_pod.stop()
    assert task_ids(exposed_pod) == received, "the replayed task ran again"
    entries = [json.loads(line) for line in exposed_pod.audit_path.read_text().splitlines()]
    assert entries[-1]["event"] == "pod-stopped" and entries[-1]["rejected"] == {"replayed": 2}


def task_ids(pod: RunningPod) -> list[str]:
    entries = [json.loads(line) for line in pod.audit_path.read_text().splitlines()]
    return [e["task"] for e in entries if e["event"] == "task-received"]


async def capture_spy_and_query(modeller: Modeller, url: str, inbox: str, captured: list[bytes]) -> None:
    """Listen on the pod's inbox (as anyone on an open broker can) while the modeller runs a query."""
    raw = await nats.connect(url)

    async def keep(msg: nats.aio.msg.Msg) -> None:
        captured.append(bytes(msg.data))

    await raw.subscribe(inbox, cb=keep)
    await raw.flush()
    await asyncio.to_thread(modeller.sql, "SELECT COUNT(*) AS n FROM t", datasets=["alice/t"])
    await raw.flush()
    await raw.close()
