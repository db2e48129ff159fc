"""The attacker's tools: a raw nats-py client on the open broker (a misconfigured broker is
the worst case every defence behind the broker must survive), and ways to read what crosses it."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pandas as pd
import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, RunningPod


def envelope_header(frame: bytes) -> dict:  # type: ignore[type-arg]
    """What any broker client can read of an envelope: its header (signed, not encrypted)."""
    (length,) = struct.unpack(">I", frame[4:8])
    header: dict = msgpack.unpackb(frame[8 : 8 + length])  # type: ignore[type-arg]
    return header


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
