"""Findings 1 and 2 of the hardening issue: what a stranger on the broker could do to chunked
transfers. Each test replays the attack with a raw nats-py client against real pods, on an open
broker (so the defence shown is the pod's and the modeller's own, not the broker's)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import nats
import psutil
import pytest

from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.security.tickets import issue_ticket
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from fedpod.transport.bus import H_BEGIN, H_INDEX, H_TRANSFER
from tests.conftest import RunningPod

pytestmark = pytest.mark.integration
HALF_GIB = 512 * 1024 * 1024


def rss_mb(pod: RunningPod) -> float:
    return float(psutil.Process(pod.process.pid).memory_info().rss) / 2**20


async def test_begin_requests_from_strangers_allocate_nothing(exposed_pod: RunningPod,
                                                              open_broker: EmbeddedBroker) -> None:
    """Finding 1: a begin request announcing 512 MiB made the pod allocate it on admission."""
    before = rss_mb(exposed_pod)
    stranger = Identity.generate("stranger")
    raw = await nats.connect(open_broker.url)
    inbox = subjects.inbox(exposed_pod.identity.fingerprint)
    try:
        answers = []
        for index in range(12):
            # unsigned, as in the report; then with a valid signature from a key the pod never accepted
            ticket = b"" if index % 2 else issue_ticket(stranger, exposed_pod.identity.public, f"x{index}",
                                                        HALF_GIB, [os.urandom(32)] * 512)
            answers.append((await raw.request(inbox, ticket, timeout=5,
                                              headers={H_TRANSFER: f"x{index}", H_BEGIN: "1",
                                                       "Fedpod-Size": str(HALF_GIB)})).data.decode())
    finally:
        await raw.close()
    assert all(a.startswith("refused") for a in answers)
    assert any("no transfer ticket" in a for a in answers)
    assert any("may not send large messages" in a for a in answers)
    time.sleep(0.5)
    assert rss_mb(exposed_pod) - before < 20, f"pod grew from {before:.0f} MB to {rss_mb(exposed_pod):.0f} MB"


class Eavesdropper:
    """A raw client on the open broker that watches an inbox and strikes once per message."""

    def __init__(self, url: str, subject: str, strike: object) -> None:
        self.url, self.subject, self.strike = url, subject, strike
        self.seen: list[nats.aio.msg.Msg] = []
        self.struck = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),))

    async def _run(self) -> None:
        raw = await nats.connect(self.url)

        async def on_message(msg: nats.aio.msg.Msg) -> None:
            self.seen.append(msg)
            if await self.strike(raw, msg):  # type: ignore[operator]
                self.struck.set()

        await raw.subscribe(self.subject, cb=on_message)
        await raw.flush()
        self.ready.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.02)
        await raw.close()

    def __enter__(self) -> Eavesdropper:
        self.ready = threading.Event()
        self._thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def modeller_inbox(exposed_modeller: Modeller) -> Iterator[str]:
    yield subjects.inbox(exposed_modeller.identity.fingerprint)


def test_a_reply_from_anyone_but_the_pod_never_settles_the_task(
        exposed_pod: RunningPod, exposed_modeller: Modeller, open_broker: EmbeddedBroker,
        modeller_inbox: str) -> None:
    """Finding 2a: a TaskFailure signed by a fresh key calling itself "alice", with the task id
    read off the wire, failed the modeller's task with TrustError. Task ids are sealed now
    (finding 11); this attacker learned the id anyway (here: from the modeller's memory)."""
    from fedpod.security.envelope import seal
    from fedpod.wire.codec import pack
    from fedpod.wire.messages import TaskFailure

    impostor = Identity.generate("alice")

    async def forge_failure(raw: nats.aio.client.Client, msg: nats.aio.msg.Msg) -> bool:
        if msg.headers and H_BEGIN in msg.headers:
            return False
        if not exposed_modeller._core._pending:
            return False  # a discovery request: no task under way yet
        task = next(iter(exposed_modeller._core._pending))
        forged = seal(impostor, TaskFailure.TYPE, pack(TaskFailure(task_id=task, kind="Boom", message="forged")),
                      recipients=[exposed_modeller.identity.public], task_id=task)
        await raw.publish(modeller_inbox, b"".join(bytes(p) for p in forged))
        return True

    with Eavesdropper(open_broker.url, subjects.inbox(exposed_pod.identity.fingerprint), forge_failure) as spy:
        result = exposed_modeller.sql("SELECT COUNT(*) AS n FROM t WHERE md5(CAST(a AS VARCHAR)) LIKE '%ab%'",
                                      datasets=["alice/t"])
        assert spy.struck.wait(5)
    assert isinstance(result, dict) and int(result["alice/t"]["n"][0]) > 0
    assert exposed_modeller._core.ignored_replies >= 1


def test_a_chunk_injected_into_a_large_reply_is_ignored(
        exposed_pod: RunningPod, exposed_modeller: Modeller, open_broker: EmbeddedBroker,
        modeller_inbox: str) -> None:
    """Finding 2b: one 1-byte chunk with a transfer id seen on the wire cut a large reply, and
    the modeller waited out the whole timeout."""

    async def inject(raw: nats.aio.client.Client, msg: nats.aio.msg.Msg) -> bool:
        if not (msg.headers and msg.headers.get(H_INDEX) == "0"):
            return False  # strike once the transfer is under way: its id is on the wire, the receiver is filling it
        transfer = msg.headers[H_TRANSFER]
        for index in range(1, 4):
            await raw.publish(modeller_inbox, b"x", headers={H_TRANSFER: transfer, H_INDEX: str(index)})
        return True

    with Eavesdropper(open_broker.url, modeller_inbox, inject) as spy:
        started = time.monotonic()
        result = exposed_modeller.sql("SELECT * FROM t LIMIT 90000", datasets=["alice/t"])
        assert spy.struck.is_set()
    assert isinstance(result, dict) and len(result["alice/t"]) == 90_000
    assert time.monotonic() - started < 10
    assert exposed_modeller._core.channel is not None
    assert exposed_modeller._core.channel.bus.ignored_chunks >= 1


async def test_strangers_cannot_hold_the_modellers_admission_slots(
        exposed_pod: RunningPod, exposed_modeller: Modeller, open_broker: EmbeddedBroker,
        modeller_inbox: str) -> None:
    """Finding 2c: six 2 MiB begin requests held every admission slot of the modeller, and each
    large reply timed out (45 s), blamed on the pod."""
    raw = await nats.connect(open_broker.url)
    squatters = [Identity.generate(f"squatter{i}") for i in range(6)]
    try:
        for index, squatter in enumerate(squatters):
            ticket = issue_ticket(squatter, exposed_modeller.identity.public, f"s{index}", 2 * 1024 * 1024,
                                  [os.urandom(32)] * 3)
            answer = await raw.request(modeller_inbox, ticket, timeout=5, headers={H_TRANSFER: f"s{index}",
                                                                                   H_BEGIN: "1"})
            assert answer.data.startswith(b"refused")
    finally:
        await raw.close()
    started = time.monotonic()
    result = await asyncio.to_thread(exposed_modeller.sql, "SELECT * FROM t LIMIT 90000", datasets=["alice/t"])
    assert isinstance(result, dict) and len(result["alice/t"]) == 90_000
    assert time.monotonic() - started < 10


async def test_a_cast_survives_injected_chunks_and_forged_acknowledgements(open_broker: EmbeddedBroker) -> None:
    """Issue 11, item 4: anyone on an open broker sees a cast's subject and its acknowledgement
    subject. Junk chunks with its transfer id, a whole message on its subject and acknowledgements
    forged for every recipient change nothing for the recipients: they take only the chunks their
    ticket signed for, and what they pass on is the sealed envelope, opened and verified."""
    from fedpod.channel import SecureChannel
    from fedpod.transport.bus import BrokerOptions, Bus
    from fedpod.wire.codec import unpack
    from fedpod.wire.messages import TaskResult

    sender = Identity.generate("modeller")
    channel = SecureChannel(await Bus.connect(BrokerOptions(open_broker.url), login=sender), sender)
    recipients, inboxes = [], []
    for index in range(3):
        identity = Identity.generate(f"pod{index}")
        listener = SecureChannel(await Bus.connect(BrokerOptions(open_broker.url), login=identity), identity,
                                 accept_transfers_from={sender.fingerprint}.__contains__)
        inbox: asyncio.Queue[object] = asyncio.Queue()
        await listener.listen_inbox(inbox.put, inbox.put)
        recipients.append(listener)
        inboxes.append(inbox)
    raw = await nats.connect(open_broker.url)
    struck: list[str] = []

    async def strike(msg: nats.aio.msg.Msg) -> None:
        headers = msg.headers or {}
        if headers.get(H_INDEX) == "0":
            struck.append("chunks")
            for index in range(1, 4):
                await raw.publish(msg.subject, os.urandom(64), headers={H_TRANSFER: headers[H_TRANSFER],
                                                                        H_INDEX: str(index)})
            await raw.publish(msg.subject, b"a whole message where only chunks belong")
        if msg.reply:
            struck.append("acknowledgements")
            for party in recipients:
                for status in ("ok", "done"):
                    await raw.publish(msg.reply, f"{status} {headers.get(H_INDEX)} {party.fingerprint}".encode())

    await raw.subscribe(f"{subjects.PREFIX}.cast.>", cb=strike)
    await raw.flush()
    try:
        payload = os.urandom(6 * 1024 * 1024)
        received = await channel.cast([r.identity.public for r in recipients],
                                       TaskResult(task_id="t", dataset="d", table=payload, seconds=0.0), timeout_s=30)
        assert received == {r.fingerprint for r in recipients}
        for inbox in inboxes:
            opened = await asyncio.wait_for(inbox.get(), 10)
            assert bytes(unpack(opened.payload, TaskResult).table) == payload  # type: ignore[attr-defined]
            assert inbox.empty()  # nothing else reached the handler: no junk, no stray message
        assert {"chunks", "acknowledgements"} <= set(struck)
        assert all(r.bus.ignored_chunks >= 1 for r in recipients)
    finally:
        await raw.close()
        for party in [channel, *recipients]:
            await party.bus.close()


async def test_only_a_modeller_may_publish_on_its_cast_subjects(broker: EmbeddedBroker) -> None:
    """With broker authentication on, a pod (or another modeller) cannot publish chunks on a
    modeller's cast subject; pods may listen there, where everything is ciphertext."""
    modeller, pod = Identity.generate("modeller"), Identity.generate("pod")
    broker.allow("modeller", modeller.public)
    broker.allow("pod", pod.public)
    refusals: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        refusals.append(exc)

    raw = await nats.connect(broker.url, nkeys_seed_str=pod.nats_seed, error_cb=on_error)
    try:
        await raw.subscribe(subjects.cast(modeller.fingerprint, "*"))
        await raw.publish(subjects.cast(modeller.fingerprint, "x"), b"chunk")
        await raw.flush()
        await asyncio.sleep(0.5)
    finally:
        await raw.close()
    assert [str(e) for e in refusals if "publish" in str(e).lower()], refusals
    assert not [e for e in refusals if "subscription" in str(e).lower()]
