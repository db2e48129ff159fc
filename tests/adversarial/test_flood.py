"""Finding 3 of the hardening issue: unauthenticated traffic wrote one fsynced audit entry per
message on the event loop (9,390 entries in 20 s; the pod stopped answering and the broker cut
it off), and denied tasks were stored with the stranger's full query text."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time

import nats
import pytest

from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from tests.adversarial.conftest import sealed_task
from tests.conftest import RunningPod

pytestmark = pytest.mark.integration
RATE = 10_000  # messages per second
SECONDS = 10.0


def audit_lines(pod: RunningPod) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in pod.audit_path.read_text().splitlines()]


def flood(url: str, subject: str, stop: threading.Event, sent: list[int]) -> None:
    async def run() -> None:
        raw = await nats.connect(url)
        started = time.monotonic()
        count = 0
        while not stop.is_set() and time.monotonic() - started < SECONDS:
            for _ in range(100):
                await raw.publish(subject, os.urandom(64))
            count += 100
            ahead = count / RATE - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await raw.flush()
        await raw.close()
        sent.append(count)

    asyncio.run(run())


def test_a_garbage_flood_is_counted_not_written_and_queries_still_answer(
        exposed_pod: RunningPod, exposed_modeller: Modeller, open_broker: EmbeddedBroker) -> None:
    # the pod's first SQL task builds its engine (imports DuckDB, loads 200,000 rows): seconds on a
    # loaded 2-core machine, flood or not. Paid before the flood, so that the bound below is the flood's.
    exposed_modeller.sql("SELECT COUNT(*) AS n FROM t", datasets=["alice/t"])
    before = len(audit_lines(exposed_pod))
    stop, sent = threading.Event(), []  # type: ignore[var-annotated]
    attacker = threading.Thread(target=flood, args=(open_broker.url, subjects.inbox(exposed_pod.identity.fingerprint),
                                                    stop, sent))
    attacker.start()
    latencies = []
    try:
        while attacker.is_alive():
            started = time.monotonic()
            result = exposed_modeller.sql("SELECT COUNT(*) AS n FROM t", datasets=["alice/t"])
            latencies.append(time.monotonic() - started)
            assert isinstance(result, dict) and int(result["alice/t"]["n"][0]) == 200_000
            time.sleep(0.25)
    finally:
        stop.set()
        attacker.join()
    assert sent and sent[0] >= 0.8 * RATE * SECONDS, f"the attacker sent only {sent}"
    assert len(latencies) >= 10 and max(latencies) < 2.0, f"query latencies under flood: {latencies}"
    assert exposed_pod.process.poll() is None
    written = len(audit_lines(exposed_pod)) - before
    assert written <= 3 * len(latencies) + 5, f"{written} audit entries for {len(latencies)} queries"
    exposed_pod.stop()
    stopped = audit_lines(exposed_pod)[-1]
    assert stopped["event"] == "pod-stopped" and stopped["rejected"]["malformed"] >= 0.8 * sent[0]
    print(f"flood: {sent[0]} messages in {SECONDS:.0f}s; {len(latencies)} queries, median "
          f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; {written} audit entries")


@pytest.mark.parametrize("fresh_keys", [False, True], ids=["one-key", "a-fresh-key-each-time"])
async def test_denied_tasks_from_strangers_are_audited_sparingly_and_truncated(
        exposed_pod: RunningPod, open_broker: EmbeddedBroker, fresh_keys: bool) -> None:
    inbox = subjects.inbox(exposed_pod.identity.fingerprint)
    query = "SELECT a FROM t WHERE b = '" + "x" * 3000 + "'"
    before = len(audit_lines(exposed_pod))
    raw = await nats.connect(open_broker.url)
    stranger = Identity.generate("stranger")
    try:
        for index in range(300):
            if fresh_keys:
                stranger = Identity.generate(f"stranger{index}")
            await raw.publish(inbox, sealed_task(stranger, exposed_pod, f"d{index}", "t", query))
        await raw.flush()
    finally:
        await raw.close()
    await asyncio.sleep(3.0)  # 300 envelopes opened, each with a fresh key: 1 s was short on a loaded 2-core machine
    exposed_pod.stop()
    added = audit_lines(exposed_pod)[before:]
    denied = [e for e in added if e["event"] == "task-received"]
    assert all(e["decision"] == "deny" and len(e["query"]) <= 201 for e in denied)
    summary = next(e for e in added if e["event"] == "rejections")
    if fresh_keys:  # "once per sender" would be once per message: a window's budget caps it
        assert len(denied) == 20 and summary["counts"]["denied-unaudited"] == 280, summary
    else:
        assert len(denied) == 1 and summary["counts"]["denied-repeat"] == 299
    assert sum(len(json.dumps(e)) for e in added) < 25 * 1024
