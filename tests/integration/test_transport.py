"""The bus and secure channel over a real NATS server: large payloads, flow control, rejection."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import nats
import pytest

from fedpod.channel import SecureChannel
from fedpod.errors import EnvelopeRejected, PodUnreachable, TransportError
from fedpod.security import envelope
from fedpod.security.envelope import Opened, seal
from fedpod.security.identity import Identity
from fedpod.security.tickets import issue_ticket
from fedpod.transport import bus as bus_module
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from fedpod.transport.bus import H_BEGIN, H_INDEX, H_TRANSFER, BrokerOptions, Bus
from fedpod.wire.codec import unpack
from fedpod.wire.messages import TaskResult

pytestmark = pytest.mark.integration


Inbox = tuple[SecureChannel, asyncio.Queue[Opened], asyncio.Queue[EnvelopeRejected]]


async def listening(url: str, name: str, *, tls_ca: Path | None = None) -> Inbox:
    """A channel listening on its inbox, with what it opened and what it rejected."""
    channel = SecureChannel(await Bus.connect(BrokerOptions(url, tls_ca=tls_ca)), Identity.generate(name))
    opened: asyncio.Queue[Opened] = asyncio.Queue()
    rejected: asyncio.Queue[EnvelopeRejected] = asyncio.Queue()

    async def on_opened(message: Opened) -> None:
        await opened.put(message)

    async def on_rejected(exc: EnvelopeRejected) -> None:
        await rejected.put(exc)

    await channel.listen_inbox(on_opened, on_rejected)
    return channel, opened, rejected


@contextlib.asynccontextmanager
async def paired(broker: EmbeddedBroker) -> AsyncIterator[tuple[SecureChannel, SecureChannel, asyncio.Queue[Opened],
                                                                asyncio.Queue[EnvelopeRejected]]]:
    """A sender and a listening receiver, both closed afterwards."""
    sender = SecureChannel(await Bus.connect(BrokerOptions(broker.url)), Identity.generate("sender"))
    receiver, opened, rejected = await listening(broker.url, "receiver")
    try:
        yield sender, receiver, opened, rejected
    finally:
        await sender.bus.close()
        await receiver.bus.close()


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024 + 7, 48 * 1024 * 1024])
async def test_payloads_of_any_size_arrive_intact(open_broker: EmbeddedBroker, size: int) -> None:
    async with paired(open_broker) as (sender, receiver, opened, _):
        assert sender.bus.chunk_size < 1024 * 1024  # the stock 1 MiB max_payload is in force
        blob = os.urandom(size)
        await sender.send(receiver.identity.public, TaskResult(task_id="t", dataset="d", table=blob, seconds=0))
        message = await asyncio.wait_for(opened.get(), 30)
        assert message.sender.fingerprint == sender.fingerprint
        from fedpod.wire.codec import unpack

        assert hashlib.sha256(unpack(message.payload, TaskResult).table).digest() == hashlib.sha256(blob).digest()


async def test_tampered_chunk_is_rejected_and_the_receiver_keeps_running(open_broker: EmbeddedBroker) -> None:
    async with paired(open_broker) as (sender, receiver, opened, rejected):
        head, body = seal(sender.identity, "result", os.urandom(3 * 1024 * 1024), recipients=[receiver.identity.public])
        corrupted = bytearray(body)
        corrupted[2 * 1024 * 1024] ^= 0x01
        await sender.bus.send(subjects.inbox(receiver.fingerprint), [head, bytes(corrupted)],
                              ticket=partial(issue_ticket, sender.identity, receiver.identity.public))
        assert (await asyncio.wait_for(rejected.get(), 10)).reason == "tampered"
        await sender.send(receiver.identity.public, TaskResult(task_id="t2", dataset="d", table=b"ok", seconds=0))
        assert (await asyncio.wait_for(opened.get(), 10)).header.task == ""
        assert receiver.rejections["tampered"] == 1


async def test_sending_to_an_inbox_nobody_listens_on_fails_at_once(open_broker: EmbeddedBroker) -> None:
    bus = await Bus.connect(BrokerOptions(open_broker.url))
    try:
        with pytest.raises(PodUnreachable, match="nobody is listening for ghost"):
            await bus.send(subjects.inbox("GHST-GHST-GHST-GHST"), b"x" * 10, recipient="ghost", timeout_s=5)
        with pytest.raises(PodUnreachable):
            await bus.send(subjects.inbox("GHST-GHST-GHST-GHST"), os.urandom(3 * 1024 * 1024), recipient="ghost")
    finally:
        await bus.close()


async def test_many_large_senders_to_one_receiver_on_a_stock_broker() -> None:
    """Twelve pods replying 8 MB each at once must not overrun NATS's default 64 MB buffer for
    the receiving client (the server would cut it off as a slow consumer)."""
    with EmbeddedBroker(max_pending=64 * 1024 * 1024, open=True) as stock:
        receiver, arrived, rejected = await listening(stock.url, "modeller")
        senders = [SecureChannel(await Bus.connect(BrokerOptions(stock.url)), Identity.generate(f"pod{i}"))
                   for i in range(12)]
        try:
            await asyncio.gather(*(s.send(receiver.identity.public, TaskResult(
                task_id=str(i), dataset="d", table=os.urandom(8 * 1024 * 1024), seconds=0), timeout_s=60)
                for i, s in enumerate(senders)))
            received = [await asyncio.wait_for(arrived.get(), 60) for _ in senders]
            assert sorted(m.sender.name for m in received) == sorted(f"pod{i}" for i in range(12))
            assert receiver.bus.connected
            assert rejected.empty()
        finally:
            for channel in [*senders, receiver]:
                await channel.bus.close()


async def test_a_transfer_over_the_receivers_limit_is_refused_before_any_data_moves(
        open_broker: EmbeddedBroker) -> None:
    async with paired(open_broker) as (sender, receiver, opened, _):
        receiver.bus.max_transfer_bytes = 2 * 1024 * 1024
        with pytest.raises(TransportError, match=r"refused: transfer of \d+ bytes \(limit 2097152\)"):
            await sender.bus.send(subjects.inbox(receiver.fingerprint), os.urandom(3 * 1024 * 1024),
                                  recipient="receiver",
                                  ticket=partial(issue_ticket, sender.identity, receiver.identity.public))
        assert receiver.bus.dropped_transfers == 1
        await sender.send(receiver.identity.public, TaskResult(task_id="t", dataset="d", table=b"ok", seconds=0))
        assert (await asyncio.wait_for(opened.get(), 10)).sender.name == "sender"


async def test_chunks_of_a_transfer_that_was_never_admitted_are_dropped(open_broker: EmbeddedBroker) -> None:
    async with paired(open_broker) as (_sender, receiver, opened, _):
        raw = await nats.connect(open_broker.url)
        await raw.request(subjects.inbox(receiver.fingerprint), b"x" * 1000, timeout=5,
                          headers={H_TRANSFER: "forged", H_INDEX: "0"})
        await raw.close()
        assert receiver.bus.ignored_chunks == 1
        assert opened.empty()


async def begin_and_vanish(url: str, receiver: SecureChannel, count: int, prefix: str) -> None:
    """`count` transfers begun with valid tickets by parties that then die (two per party, the
    most one sender may hold)."""
    raw = await nats.connect(url)
    for index in range(count):
        if index % bus_module.MAX_PER_SENDER == 0:
            dead = Identity.generate(f"{prefix}{index}")
        transfer = f"{prefix}{index}"
        ticket = issue_ticket(dead, receiver.identity.public, transfer, 5 * 1024 * 1024, [b"\0" * 32] * 5)
        answer = await raw.request(subjects.inbox(receiver.fingerprint), ticket, timeout=5,
                                   headers={H_TRANSFER: transfer, H_BEGIN: "1"})
        assert answer.data == b""
    await raw.close()


async def test_a_sender_that_vanishes_mid_transfer_gives_its_slot_back(open_broker: EmbeddedBroker,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every admission slot taken by senders that died: a live sender still gets through once
    the dead transfers go stale (the receiver must not wedge)."""
    monkeypatch.setattr(bus_module, "STALE_TRANSFER_S", 1.0)
    async with paired(open_broker) as (sender, receiver, opened, _):
        await begin_and_vanish(open_broker.url, receiver, bus_module.MAX_ACTIVE_TRANSFERS, "dead")
        await sender.send(receiver.identity.public, TaskResult(task_id="t", dataset="d",
                                                                table=os.urandom(3 * 1024 * 1024), seconds=0))
        assert (await asyncio.wait_for(opened.get(), 10)).sender.name == "sender"
        assert receiver.bus.dropped_transfers == bus_module.MAX_ACTIVE_TRANSFERS


async def test_a_broker_restart_frees_the_slots_of_transfers_it_cut() -> None:
    """Transfers cut by a broker restart never resume (senders resend whole): their admission
    slots are freed on reconnection, not after STALE_TRANSFER_S, so replies flow at once."""
    first = EmbeddedBroker(open=True).start()
    second: EmbeddedBroker | None = None
    receiver, opened, rejected = await listening(first.url, "receiver")
    try:
        await begin_and_vanish(first.url, receiver, bus_module.MAX_ACTIVE_TRANSFERS, "cut")
        port = first.port
        first.stop()
        second = EmbeddedBroker(port=port, open=True).start()
        for _ in range(100):
            if receiver.bus.connected and receiver.bus.dropped_transfers:
                break
            await asyncio.sleep(0.1)
        assert receiver.bus.dropped_transfers == bus_module.MAX_ACTIVE_TRANSFERS
        sender = SecureChannel(await Bus.connect(BrokerOptions(second.url)), Identity.generate("sender"))
        try:
            await sender.send(receiver.identity.public, TaskResult(task_id="t", dataset="d",
                                                                    table=os.urandom(3 * 1024 * 1024), seconds=0),
                              timeout_s=10)
            assert (await asyncio.wait_for(opened.get(), 10)).sender.name == "sender"
            assert rejected.empty()
        finally:
            await sender.bus.close()
    finally:
        await receiver.bus.close()
        if second is not None:
            second.stop()
        first.stop()


async def authenticated(broker: EmbeddedBroker, role: str, name: str,
                        accept: set[str] | None = None) -> tuple[SecureChannel, asyncio.Queue[Opened]]:
    """A party let in on the authenticating broker with `role`'s permissions, listening on its
    inbox; a listener takes large messages only from the fingerprints in `accept`."""
    identity = Identity.generate(name)
    broker.allow(role, identity.public)  # type: ignore[arg-type]
    bus = await Bus.connect(BrokerOptions(broker.url), login=identity)
    channel = SecureChannel(bus, identity, accept_transfers_from=None if accept is None else accept.__contains__)
    opened: asyncio.Queue[Opened] = asyncio.Queue()

    async def on_opened(message: Opened) -> None:
        await opened.put(message)

    async def on_rejected(exc: EnvelopeRejected) -> None:
        return None

    await channel.listen_inbox(on_opened, on_rejected)
    return channel, opened


async def test_a_cast_sends_one_copy_to_many_pods_and_leaves_out_one_that_refuses(
        broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11, item 4: the modeller's link carries a large message once whatever the number of
    recipients; a pod that refuses the sender's ticket gets nothing and is reported missing,
    and the others still receive it whole (with broker permissions on, as deployed). The body
    is hashed whole once, by its sender: each pod's bus checked every chunk against the ticket
    the sender signed, which vouches for the bytes as the body digest would."""
    hashed: list[int] = []
    digest = envelope.bulk_digest
    monkeypatch.setattr(envelope, "bulk_digest", lambda body: hashed.append(len(body)) or digest(body))
    modeller, _ = await authenticated(broker, "modeller", "modeller")
    pods = [await authenticated(broker, "pod", f"pod{i}", {modeller.fingerprint}) for i in range(4)]
    refusing, _ = await authenticated(broker, "pod", "refusing", set())
    try:
        payload = os.urandom(12 * 1024 * 1024)
        message = TaskResult(task_id="t", dataset="d", table=payload, seconds=0.0)
        sent_before, _ = modeller.bus.traffic
        received = await modeller.cast([p.identity.public for p, _ in pods] + [refusing.identity.public], message,
                                       timeout_s=30)
        sent = modeller.bus.traffic[0] - sent_before
        assert received == {p.fingerprint for p, _ in pods}
        assert len(payload) < sent < 1.1 * len(payload)  # one copy, not five
        for _, inbox in pods:
            opened = await asyncio.wait_for(inbox.get(), 10)
            assert opened.sender.fingerprint == modeller.fingerprint
            assert bytes(unpack(opened.payload, TaskResult).table) == payload
        assert refusing.bus.dropped_transfers == 1
        assert len(hashed) == 1
    finally:
        for party in [modeller, refusing, *(p for p, _ in pods)]:
            await party.bus.close()


async def test_an_answer_rides_on_the_acknowledgement_once_and_only_if_it_fits(open_broker: EmbeddedBroker) -> None:
    """What the receiver answers on its acknowledgement is what `send` returns; the
    acknowledgement goes once (a later answer must travel on its own), and an answer larger than
    one message is not carried: the sender hears a plain acknowledgement."""
    options = BrokerOptions(open_broker.url)
    sender, receiver = await Bus.connect(options), await Bus.connect(options)
    carried: list[tuple[bool, bool]] = []

    async def answer(whole: bus_module.Payload, ack: bus_module.Ack, vouched_by: str | None) -> None:
        size = receiver.chunk_size + 1 if bytes(whole) == b"big" else 5
        carried.append((await ack(b"x" * size), await ack(b"late")))

    await receiver.subscribe("answers", answer)
    try:
        assert await sender.send("answers", b"small") == b"xxxxx"
        assert await sender.send("answers", b"big") == b""
        assert carried == [(True, False), (False, False)]
    finally:
        await sender.close()
        await receiver.close()
