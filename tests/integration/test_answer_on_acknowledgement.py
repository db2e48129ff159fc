"""A quick task's reply rides on the acknowledgement of its request (`fedpod.channel`), and a
request sent again because that answer was lost is answered alike — not run twice, not left to
time out. A live pod, and the modeller's side played with a raw bus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fedpod.governance.audit import AuditLog
from fedpod.modeller.client import Modeller
from fedpod.security.envelope import ReplayGuard, open_envelope, seal
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
