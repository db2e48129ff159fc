"""A live pod facing forged, tampered, replayed and garbage messages: it rejects, counts,
summarises them in its audit log, and keeps serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fedpod.modeller.client import Modeller
from fedpod.security.envelope import seal
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from fedpod.transport.bus import BrokerOptions, Bus
from fedpod.wire.codec import pack
from fedpod.wire.messages import SqlQueryAlgorithm, TaskRequest
from tests.conftest import Impersonator, PodFactory, three_rows

pytestmark = pytest.mark.integration


def audit_events(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bad_envelopes_are_rejected_audited_and_the_pod_keeps_serving(
        pod_factory: PodFactory, tmp_path: Path, modeller_identity: Identity, keystore: Path,
        broker: EmbeddedBroker) -> None:
    pod = pod_factory("alice", [three_rows(tmp_path)], [modeller_identity])
    request = TaskRequest(task_id="x1", dataset="t", algorithm=SqlQueryAlgorithm(query="SELECT 1"))

    async def attack() -> None:
        insider = Identity.generate("insider")  # a party the broker lets in, whom the pod does not accept
        broker.allow("modeller", insider.public)
        bus = await Bus.connect(BrokerOptions(broker.url), login=insider)
        inbox = subjects.inbox(pod.identity.fingerprint)
        # 1. garbage
        await bus.send(inbox, b"\x00garbage")
        # 2. forged: Mallory signs a header claiming the trusted modeller's keys
        mallory = Impersonator(Identity.generate("modeller"), modeller_identity)
        await bus.send(inbox, seal(mallory, "task", pack(request), recipients=[pod.identity.public],  # type: ignore[arg-type]
                                   task_id="x1"))
        # 3. tampered: a genuine envelope from the modeller with one bit flipped in its body
        genuine = b"".join(seal(modeller_identity, "task", pack(request), recipients=[pod.identity.public]))
        flipped = bytearray(genuine)
        flipped[-5] ^= 0x10
        await bus.send(inbox, bytes(flipped))
        # 4. replay: the same genuine envelope twice (the first one is served)
        await bus.send(inbox, genuine)
        await bus.send(inbox, genuine)
        await bus.close()

    asyncio.run(attack())
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=10) as modeller:
        result = modeller.sql("SELECT SUM(a) AS s FROM t", datasets=["alice/t"])
    assert isinstance(result, dict) and int(result["alice/t"]["s"][0]) == 6
    assert pod.process.poll() is None
    pod.stop()
    from fedpod.governance.audit import AuditLog

    assert AuditLog.verify(pod.audit_path).ok
    events = audit_events(pod.audit_path)
    assert not [e for e in events if e["event"] == "envelope-rejected"]  # counted, not written one by one
    summary = next(e for e in events if e["event"] == "rejections")
    assert {"malformed", "bad-signature", "tampered", "replayed"} <= set(summary["counts"])
    stopped = events[-1]
    assert stopped["event"] == "pod-stopped" and stopped["rejected"]["replayed"] == 1
