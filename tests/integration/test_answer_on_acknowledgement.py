"""A quick task's reply rides on the acknowledgement of its request (`fedpod.channel`), and a
request sent again because that answer was lost is answered alike — not run twice, not left to
time out. A live pod, and the modeller's side played with a raw bus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from fedpod.channel import SecureChannel
from fedpod.errors import EnvelopeRejected
from fedpod.governance.audit import AuditLog
from fedpod.modeller.client import Modeller
from fedpod.security.envelope import Opened, ReplayGuard, open_envelope, seal, seal_bytes
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from fedpod.transport.bus import BrokerOptions, Bus
from fedpod.wire.codec import pack, table_from_bytes, unpack
from fedpod.wire.messages import SqlQueryAlgorithm, TaskRequest, TaskResult
from tests.conftest import PodFactory, three_rows

pytestmark = pytest.mark.integration


def test_a_quick_result_comes_on_the_acknowledgement_and_a_resent_copy_gets_the_same(
        pod_factory: PodFactory, tmp_path: Path, modeller_identity: Identity, keystore: Path,
        broker: EmbeddedBroker) -> None:
    pod = pod_factory("alice", [three_rows(tmp_path)], [modeller_identity])
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=20) as modeller:
        warm = modeller.sql("SELECT SUM(a) AS s FROM t", datasets=["alice/t"])  # the pod's first query imports DuckDB
    assert isinstance(warm, dict) and int(warm["alice/t"]["s"][0]) == 6
    request = TaskRequest(task_id="quick", dataset="t", algorithm=SqlQueryAlgorithm(query="SELECT SUM(a) AS s FROM t"))
    envelope = b"".join(seal(modeller_identity, "task", pack(request), recipients=[pod.identity.public],
                             task_id="quick"))

    async def send_twice() -> tuple[bytes, bytes]:
        bus = await Bus.connect(BrokerOptions(broker.url), login=modeller_identity)
        try:
            first = await bus.send(subjects.inbox(pod.identity.fingerprint), envelope)
            again = await bus.send(subjects.inbox(pod.identity.fingerprint), envelope)  # as if `first` was lost
        finally:
            await bus.close()
        return first, again

    first, again = asyncio.run(send_twice())
    assert first and again == first
    opened = open_envelope(first, modeller_identity, ReplayGuard())
    assert opened.sender.fingerprint == pod.identity.fingerprint and opened.header.type == TaskResult.TYPE
    result = unpack(opened.payload, TaskResult)
    assert result.task_id == "quick" and int(table_from_bytes(result.table).column("s")[0].as_py()) == 6
    pod.stop()
    assert AuditLog.verify(pod.audit_path).ok
    events = [json.loads(line) for line in pod.audit_path.read_text().splitlines()]
    assert [e["event"] for e in events if e.get("task") == "quick"] == ["task-received", "task-completed"]
    assert events[-1]["event"] == "pod-stopped" and events[-1]["rejected"]["replayed"] == 1


@pytest.mark.parametrize("answer", [b"the answer", b""])
async def test_a_copy_sent_while_the_original_is_handled_is_answered_as_the_original(
        open_broker: EmbeddedBroker, answer: bytes) -> None:
    """The sender's connection was restored while the receiver handled its request, so the
    answer to the original goes to a request the sender gave up on. The copy it sends waits for
    that answer (empty if the original was acknowledged plainly: the reply then travels on its
    own) — acknowledged empty at once, it would leave its sender waiting for a reply that left."""
    sender, receiver = Identity.generate("modeller"), Identity.generate("pod")
    inbox = subjects.inbox(receiver.fingerprint)
    channel = SecureChannel(await Bus.connect(BrokerOptions(open_broker.url), login=receiver), receiver)
    release = asyncio.Event()

    async def on_opened(opened: Opened) -> None:
        await release.wait()
        await opened.acknowledge(answer)
        await asyncio.sleep(3)  # handled on after the acknowledgement, as a pod runs a long task

    async def on_rejected(exc: EnvelopeRejected) -> None:
        pass

    await channel.listen_inbox(on_opened, on_rejected)
    envelope = seal_bytes(sender, "task", [b"payload"], recipients=[receiver.public], task_id="t1")
    raw = await nats.connect(open_broker.url)
    bus = await Bus.connect(BrokerOptions(open_broker.url), login=sender)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await raw.request(inbox, envelope, timeout=0.3)  # the original, whose answer is lost
        copy = asyncio.ensure_future(bus.send(inbox, envelope, timeout_s=10))
        await asyncio.sleep(0.3)
        assert not copy.done()  # not acknowledged empty while the original is handled
        release.set()
        assert await asyncio.wait_for(copy, 2) == answer
        assert await bus.send(inbox, envelope, timeout_s=2) == answer  # and a later copy alike
        assert channel.rejections["replayed"] == 2
    finally:
        await raw.close()
        await bus.close()
        await channel.bus.close()
