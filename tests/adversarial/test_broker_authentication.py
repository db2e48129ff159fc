"""Finding 1 of the hardening issue, at the broker: only parties the broker was told about may
connect, and each may subscribe only to what its role needs. The attacker is a raw nats-py client."""

from __future__ import annotations

import asyncio
import os

import nats
import nats.errors
import nkeys
import pytest

from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker

pytestmark = pytest.mark.integration


async def test_anonymous_and_unknown_clients_are_refused(broker: EmbeddedBroker) -> None:
    unknown = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    for credentials in ({}, {"nkeys_seed_str": unknown}):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(broker.url, allow_reconnect=False, connect_timeout=2, **credentials)


async def test_a_pod_cannot_listen_on_another_pods_inbox_or_on_everything(broker: EmbeddedBroker) -> None:
    alice, bob, modeller = Identity.generate("alice"), Identity.generate("bob"), Identity.generate("modeller")
    for role, party in (("pod", alice), ("pod", bob), ("modeller", modeller)):
        broker.allow(role, party.public)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    spy = await nats.connect(broker.url, nkeys_seed_str=alice.nats_seed, error_cb=on_error,
                             inbox_prefix=subjects.replies(alice.fingerprint))
    sender = await nats.connect(broker.url, nkeys_seed_str=modeller.nats_seed,
                                inbox_prefix=subjects.replies(modeller.fingerprint))
    try:
        overheard: list[bytes] = []

        async def on_message(msg: nats.aio.msg.Msg) -> None:
            overheard.append(msg.data)

        for subject in (subjects.inbox(bob.fingerprint), ">", subjects.HEARTBEATS):
            await spy.subscribe(subject, cb=on_message)
        await spy.flush()
        await sender.publish(subjects.inbox(bob.fingerprint), b"for bob only")
        await sender.flush()
        for _ in range(100):
            if len(errors) >= 3:
                break
            await asyncio.sleep(0.02)
        assert overheard == []
        assert sum("permissions violation for subscription" in str(e) for e in errors) == 3
        with pytest.raises(nats.errors.Error):  # nor may it publish another pod's heartbeat
            await spy.publish(subjects.heartbeat(bob.fingerprint), b"forged")
            await spy.flush()
            for _ in range(50):
                if any("publish" in str(e) for e in errors):
                    raise nats.errors.Error(str(errors[-1]))
                await asyncio.sleep(0.02)
    finally:
        await spy.close()
        await sender.close()
