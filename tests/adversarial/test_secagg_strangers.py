"""Strangers and secure aggregation (issue 10): a flood of signed, sealed SecAggRequests from
unknown keys opens no session at a real pod, writes nothing to its audit log, and leaves it
answering the modeller it knows; that modeller's own session requests are bounded per key."""

from __future__ import annotations

import asyncio
import os

import nats
import pytest

from fedpod.governance.audit import AuditLog
from fedpod.modeller.client import Modeller
from fedpod.security.envelope import seal
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from fedpod.wire.codec import pack
from fedpod.wire.messages import SecAggRequest
from tests.conftest import RunningPod, wait_until

pytestmark = pytest.mark.integration


def sealed_keys_request(sender: Identity, pod: RunningPod, index: int) -> bytes:
    request = SecAggRequest(task_id=f"s{index}", session=os.urandom(16).hex(), dataset="t", step="keys",
                            participants=["alice/t", f"mallory{index}/t"])
    frame = seal(sender, SecAggRequest.TYPE, pack(request), recipients=[pod.identity.public], task_id=f"s{index}")
    return b"".join(bytes(part) for part in frame)


async def test_strangers_open_no_secure_aggregation_session(exposed_pod: RunningPod, open_broker: EmbeddedBroker,
                                                            exposed_modeller: Modeller) -> None:
    entries_before = len(AuditLog(exposed_pod.audit_path).entries())
    raw = await nats.connect(open_broker.url)
    try:
        inbox = subjects.inbox(exposed_pod.identity.fingerprint)
        for index in range(300):
            await raw.publish(inbox, sealed_keys_request(Identity.generate(f"m{index}"), exposed_pod, index))
        await raw.flush()
    finally:
        await raw.close()
    await asyncio.to_thread(wait_until, lambda: "secagg-stranger" in exposed_pod.output(), 20,
                            "the pod to count the strangers' requests")
    answer = await asyncio.to_thread(exposed_modeller.sql, "SELECT COUNT(*) AS n FROM t", datasets=["alice/t"])
    assert isinstance(answer, dict) and int(answer["alice/t"]["n"][0]) > 0
    new = AuditLog(exposed_pod.audit_path).entries()[entries_before:]
    assert not [e for e in new if "secagg" in e["event"]]
    assert len(new) <= 10  # the SQL task's entries and at most a summary of refusals, not one per message
    assert exposed_pod.output().count("secagg-stranger") <= 2  # the log says it once a minute, then counts
