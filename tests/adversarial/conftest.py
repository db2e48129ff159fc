"""The attacker's tools: a raw nats-py client on the open broker (a misconfigured broker is
the worst case every defence behind the broker must survive), and ways to read what crosses it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from fedpod.channel import SecureChannel
from fedpod.data.datasets import DatasetSpec
from fedpod.modeller.client import Modeller
from fedpod.security.envelope import Opened, seal
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.broker import EmbeddedBroker
from fedpod.transport.bus import BrokerOptions, Bus
from fedpod.wire.codec import pack
from fedpod.wire.messages import Discover, Heartbeat, PodAdvert, SqlQueryAlgorithm, TaskRequest
from tests.conftest import PodFactory, RunningPod


@pytest.fixture
def table_csv(tmp_path: Path) -> Path:
    """200,000 rows: a row query's answer is several MB, so it travels chunked."""
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": range(200_000), "b": [f"value-{i}" for i in range(200_000)]}).to_csv(path, index=False)
    return path


@pytest.fixture
def exposed_pod(pod_factory: PodFactory, open_broker: EmbeddedBroker, modeller_identity: Identity,
                table_csv: Path) -> RunningPod:
    """A pod with one dataset `t` on the open broker, accepting `modeller_identity`."""
    return pod_factory("alice", [DatasetSpec(name="t", type="csv", path=str(table_csv))], [modeller_identity],
                       on=open_broker)


@pytest.fixture
def exposed_modeller(open_broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path) -> Modeller:
    with Modeller(modeller_identity, broker=open_broker.url, keystore=keystore, timeout_s=30) as client:
        yield client  # type: ignore[misc]


async def ignore(exc: object) -> None:
    return None


@contextlib.contextmanager
def rogue_party(url: str, identity: Identity, subscribe: Callable[[SecureChannel], Awaitable[None]], *,
                login: bool = False) -> Iterator[None]:
    """A party of the attacker's own (an impostor pod, a poisoning pod): a SecureChannel in its own
    thread and event loop, listening where `subscribe` says, until the block ends."""
    stop, ready = threading.Event(), threading.Event()

    async def run() -> None:
        channel = SecureChannel(await Bus.connect(BrokerOptions(url), login=identity if login else None), identity)
        await subscribe(channel)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await channel.bus.close()

    thread = threading.Thread(target=asyncio.run, args=(run(),))
    thread.start()
    try:
        assert ready.wait(10)
        yield
    finally:
        stop.set()
        thread.join(10)


TaskHandler = Callable[[SecureChannel, Opened], Awaitable[None]]


def rogue_pod(identity: Identity, advert: PodAdvert, on_task: TaskHandler | None = None,
              ) -> Callable[[SecureChannel], Awaitable[None]]:
    """What a pod of the attacker's own does (pass it to `rogue_party`): it announces its keys
    when a modeller pings, answers discovery requests with `advert` and hands anything else to
    `on_task`."""

    async def subscribe(channel: SecureChannel) -> None:
        async def on_ping(frame: object, ack: object, vouched_by: object) -> None:
            beat = Heartbeat(pod=advert.pod, fingerprint=identity.fingerprint, ts=0, running_tasks=0, uptime_s=0)
            await channel.announce(subjects.heartbeat(identity.fingerprint), beat, [])

        async def on_message(opened: Opened) -> None:
            if opened.header.type == Discover.TYPE:
                await channel.send(opened.sender, advert, timeout_s=5)
            elif on_task is not None:
                await on_task(channel, opened)

        await channel.bus.subscribe(subjects.DISCOVER, on_ping)
        await channel.listen_inbox(on_message, ignore)

    return subscribe


def sealed_task(sender: Identity, pod: RunningPod, task_id: str, dataset: str, query: str) -> bytes:
    """A signed, sealed SQL task from `sender` to `pod`, as a raw client would publish it."""
    request = TaskRequest(task_id=task_id, dataset=dataset, algorithm=SqlQueryAlgorithm(query=query))
    frame = seal(sender, TaskRequest.TYPE, pack(request), recipients=[pod.identity.public], task_id=task_id)
    return b"".join(bytes(part) for part in frame)
