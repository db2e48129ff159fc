"""Access requests under attack: a raw nats-py client minting fresh keys (and one key repeating
itself) cannot grow the queue past its bound, nor learn anyone else's requests; the pod keeps
answering the modeller it knows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from fedpod.errors import AccessDenied
from fedpod.governance.requests import MAX_PENDING
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from tests.adversarial.conftest import sealed_task
from tests.conftest import RunningPod, wait_until

pytestmark = pytest.mark.integration


def requests_file(pod: RunningPod) -> Path:
    return pod.config_path.parent / "storage" / "access-requests.json"


async def test_fresh_keys_cannot_grow_the_request_queue_past_its_bound(
        exposed_pod: RunningPod, open_broker: EmbeddedBroker, exposed_modeller: Modeller, tmp_path: Path) -> None:
    # A stranger asking about requests learns only its own. (Asked first: after the flood below,
    # the pod has spent this minute's budget of answers to strangers.)
    nosy = Identity.generate("nosy")
    with Modeller(nosy, broker=open_broker.url, keystore=tmp_path / "nosy", timeout_s=20) as client:
        with pytest.raises(AccessDenied, match="access request 1 is pending"):
            await asyncio.to_thread(client.sql, "SELECT COUNT(*) FROM t", datasets=["alice/t"])
        exposed_pod_requests = json.loads(requests_file(exposed_pod).read_text())
        exposed_pod_requests.append({**exposed_pod_requests[0], "id": 2, "fingerprint": "SOME-ONEE-LSEE-KEYY"})
        requests_file(exposed_pod).write_text(json.dumps(exposed_pod_requests))
        [status] = await asyncio.to_thread(client.access_status, ["alice"])
    assert [(r.id, r.dataset) for r in status.requests] == [(1, "t")] and status.granted == {}

    inbox = subjects.inbox(exposed_pod.identity.fingerprint)
    raw = await nats.connect(open_broker.url)
    repeater = Identity.generate("repeater")
    try:
        for index in range(2 * (MAX_PENDING + 100)):
            sender = repeater if index % 2 else Identity.generate(f"fresh{index}")
            await raw.publish(inbox, sealed_task(sender, exposed_pod, f"r{index}", "t", "SELECT 1"))
        await raw.flush()
    finally:
        await raw.close()

    def settled() -> bool:
        if not requests_file(exposed_pod).exists():
            return False
        entries = json.loads(requests_file(exposed_pod).read_text())
        mine = [e for e in entries if e["fingerprint"] == repeater.fingerprint]
        return len(mine) == 1 and mine[0]["count"] == MAX_PENDING + 100  # counts flushed on a heartbeat

    await asyncio.to_thread(wait_until, settled, 30, "the repeater's count to be flushed")
    entries = json.loads(requests_file(exposed_pod).read_text())
    assert sum(e["status"] == "pending" for e in entries) == MAX_PENDING
    assert requests_file(exposed_pod).stat().st_size < 100 * 1024
    # The modeller the pod knows is still answered.
    answer = await asyncio.to_thread(exposed_modeller.sql, "SELECT COUNT(*) AS n FROM t", datasets=["alice/t"])
    assert isinstance(answer, dict) and int(answer["alice/t"]["n"][0]) > 0
