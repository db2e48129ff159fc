"""Leaf nodes, the recommended deployment across sites: each site runs `fedpod broker leaf`,
a nats-server on its own loopback that connects out to the cluster, and its pod connects only
to that. The modeller reaches the pods through the cluster; the sites survive the loss of the
member their leaf node was connected to."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from fedpod.data.catalog import inspect
from fedpod.data.datasets import DatasetSpec
from fedpod.errors import BrokerUnavailable, FedpodError
from fedpod.governance.audit import AuditLog
from fedpod.lifecycle import die_with_parent
from fedpod.modeller.client import Modeller
from fedpod.pod.config import BrokerSettings, PodConfig
from fedpod.pod.local import write_pod
from fedpod.security.identity import Identity
from fedpod.transport.bus import BrokerOptions, Bus
from fedpod.transport.cluster import BrokerCluster
from tests.conftest import start_pod_process, wait_until

pytestmark = pytest.mark.integration
SITES = {"alice": [1, 2, 3, 4], "bob": [10, 20, 30]}


@pytest.fixture
def hub(tmp_path: Path, modeller_identity: Identity) -> Iterator[BrokerCluster]:
    with BrokerCluster(3, folder=tmp_path / "cluster", leafnodes=True) as cluster:
        cluster.allow("modeller", modeller_identity.public)
        yield cluster


def start_site(name: str, values: list[int], hub: BrokerCluster, modeller: Identity, tmp_path: Path,
               running: list[subprocess.Popen[bytes]]) -> tuple[Path, str]:
    """A site as its operator sets it up: the pod's folder, the cluster's operator letting the
    pod's key in as a site, `fedpod broker leaf`, then the pod pointed at the leaf node."""
    folder = tmp_path / name
    folder.mkdir()
    pd.DataFrame({"value": values}).to_csv(folder / "data.csv", index=False)
    spec = inspect(DatasetSpec(name="measurements", kind="csv", path=str(folder / "data.csv")), folder)
    config = write_pod(folder, name, "nats://127.0.0.1:1", [spec], [modeller], heartbeat_s=0.5)
    hub.allow("site", Identity.load(folder / "keys" / f"{name}.key").public)
    leaf = subprocess.Popen([sys.executable, "-m", "fedpod.cli", "broker", "leaf", "--hub",
                             ",".join(hub.leafnode_urls), "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)
    running.append(leaf)
    assert leaf.stdout is not None
    url = leaf.stdout.readline().decode().strip()
    assert url.startswith("nats://127.0.0.1:"), url
    settings = PodConfig.load(config)
    settings.model_copy(update={"broker": BrokerSettings(url=url)}).save(config)
    process, _ = start_pod_process(config)
    running.append(process)
    return config, url


@pytest.fixture
def sites(hub: BrokerCluster, modeller_identity: Identity, tmp_path: Path) -> Iterator[dict[str, tuple[Path, str]]]:
    running: list[subprocess.Popen[bytes]] = []
    try:
        yield {name: start_site(name, values, hub, modeller_identity, tmp_path, running)
               for name, values in SITES.items()}
    finally:
        for process in reversed(running):  # pods first, then their leaf nodes
            process.terminate()
            process.wait(15)


def test_pods_behind_leaf_nodes_answer_through_the_cluster(hub: BrokerCluster, sites: dict[str, tuple[Path, str]],
                                                           modeller_identity: Identity, keystore: Path) -> None:
    identifiers = [f"{name}/measurements" for name in SITES]
    expected = sum(sum(values) for values in SITES.values())
    with Modeller(modeller_identity, broker=hub.members[2].url, keystore=keystore, timeout_s=30) as modeller:
        total = modeller.sql("SELECT SUM(value) AS s FROM measurements", datasets=identifiers, aggregate=True)
        assert int(total["s"][0]) == expected
        hub.kill(0)  # every leaf node that was connected to it reconnects to another member
        hub.kill(1)

        def answers() -> bool:
            try:
                frame = modeller.sql("SELECT SUM(value) AS s FROM measurements", datasets=identifiers, aggregate=True)
            except FedpodError:  # a leaf node reconnects within a second: usually the first query answers
                return False
            return int(frame["s"][0]) == expected

        wait_until(answers, 20, "the sites to answer through the last member")
    for config, _ in sites.values():
        assert AuditLog.verify(config.parent / "storage" / "audit.jsonl").ok


def test_a_leaf_node_lets_in_only_its_own_pod(sites: dict[str, tuple[Path, str]], modeller_identity: Identity) -> None:
    """The site's server is for its pod: the modeller (let in at the cluster) and the other
    site's pod are refused by it."""
    _, alice_leaf = sites["alice"]
    bob = Identity.load(sites["bob"][0].parent / "keys" / "bob.key")
    for stranger in (modeller_identity, bob):
        with pytest.raises(BrokerUnavailable, match="refused"):
            asyncio.run(Bus.connect(BrokerOptions(alice_leaf, connect_timeout_s=2), login=stranger))
