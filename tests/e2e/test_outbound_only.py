"""Outbound-only, proven: the project's own hosts as Linux network namespaces joined by veth
pairs — a broker host, a modeller host and three pod hosts whose only link and route is to the
broker host (which forwards nothing). The demo's SQL and training succeed across them, and no
pod host has a listening socket. Needs root and `ip netns`; skipped, saying why, elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from fedpod.cli.demo import AGGREGATE_QUERY, DATASET, frames_agree, pooled, prepare_pod
from fedpod.data.synth import generate, write
from fedpod.lifecycle import die_with_parent
from fedpod.security.identity import Identity
from tests.conftest import wait_until

pytestmark = pytest.mark.integration
PODS = ["alice", "bob", "charlie"]
PATIENTS, SEED = 1800, 21
BROKER_PORT = 4222  # the broker host is a namespace of its own: the port is free there


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30)


def namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None or shutil.which("ss") is None:
        return "iproute2 (ip, ss) is not installed"
    probe = f"fedpod-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        return f"this machine does not let the tests create network namespaces ({detail}); run as root"
    ip("netns", "del", probe)
    return None


class Hosts:
    """Namespaces named after their hosts, each pod's and the modeller's joined to the broker's
    by one veth pair on a /30 of its own: the only route any of them has."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000}"
        self.broker = f"fedpod-{self.tag}-broker"
        self.others = {name: f"fedpod-{self.tag}-{name}" for name in [*PODS, "modeller"]}
        self.address: dict[str, str] = {}  # host -> the broker's address as that host sees it
        self.processes: list[subprocess.Popen[bytes]] = []

    def build(self) -> None:
        for namespace in [self.broker, *self.others.values()]:
            ip("netns", "add", namespace)
            ip("-n", namespace, "link", "set", "lo", "up")
        for index, (host, namespace) in enumerate(self.others.items(), start=1):
            near, far = f"vb{self.tag}{index}", f"vh{self.tag}{index}"
            ip("link", "add", near, "netns", self.broker, "type", "veth", "peer", "name", far, "netns", namespace)
            ip("-n", self.broker, "addr", "add", f"10.231.{index}.1/30", "dev", near)
            ip("-n", namespace, "addr", "add", f"10.231.{index}.2/30", "dev", far)
            ip("-n", self.broker, "link", "set", near, "up")
            ip("-n", namespace, "link", "set", far, "up")
            self.address[host] = f"10.231.{index}.1"

    def run(self, namespace: str, command: list[str], log: Path) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *command], stdout=log.open("wb"),
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.processes.append(process)
        return process

    def listening(self, namespace: str) -> str:
        return subprocess.run(["ip", "netns", "exec", namespace, "ss", "-ltunH"], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    def tear_down(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        for namespace in [self.broker, *self.others.values()]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    built = Hosts()
    try:
        built.build()
        yield built
    finally:
        built.tear_down()


def fedpod(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedpod.cli", *args]


def test_pods_reach_only_the_broker_and_listen_on_nothing(hosts: Hosts, tmp_path: Path) -> None:
    keystore = tmp_path / "keys"
    modeller = Identity.load_or_create("modeller", keystore)
    folders = write(generate(3, PATIENTS, SEED), tmp_path / "data")
    broker_folder = tmp_path / "broker"
    configs = []
    for name, folder in zip(PODS, folders, strict=True):
        # the pod's config names the broker by the address its own host routes to
        config = prepare_pod(tmp_path / "pods" / name, name, f"nats://{hosts.address[name]}:{BROKER_PORT}",
                             folder / "patients.csv", modeller)
        subprocess.run(fedpod("broker", "allow", "--folder", str(broker_folder), "--role", "pod",
                              str(config.parent / "keys" / f"{name}.pub")), check=True, timeout=60)
        configs.append(config)
    subprocess.run(fedpod("broker", "allow", "--folder", str(broker_folder), "--role", "modeller",
                          str(keystore / "modeller.pub")), check=True, timeout=60)

    broker_log = tmp_path / "broker.log"
    hosts.run(hosts.broker, fedpod("broker", "start", "--host", "0.0.0.0", "--port", str(BROKER_PORT),
                                   "--folder", str(broker_folder)), broker_log)
    wait_until(lambda: "export FEDPOD_BROKER" in broker_log.read_text(), 30, "the broker host's server")
    for name, config in zip(PODS, configs, strict=True):
        log = tmp_path / f"{name}.log"
        hosts.run(hosts.others[name], fedpod("pod", "start", "--config", str(config)), log)
        wait_until(lambda log=log: "ready on" in log.read_text(errors="replace"), 60, f"pod {name}")

    identifiers = [f"{name}/{DATASET}" for name in PODS]
    answer = subprocess.run(
        ["ip", "netns", "exec", hosts.others["modeller"], sys.executable, str(Path(__file__).parent /
         "outbound_modeller.py"), f"nats://{hosts.address['modeller']}:{BROKER_PORT}", str(keystore),
         str(tmp_path / "modeller"), str(PATIENTS), str(SEED), *identifiers],
        capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-3000:]
    results = json.loads(answer.stdout.strip().splitlines()[-1])

    assert sorted(results["per_dataset"]) == sorted(identifiers)
    reference = pooled(AGGREGATE_QUERY, [folder / "patients.csv" for folder in folders])
    assert frames_agree(pd.DataFrame(results["aggregate"]), reference)
    assert results["training"]["federated"]["auc"] > 0.6

    for name in PODS:  # a pod host: no listening socket, and no way to the modeller's host
        assert hosts.listening(hosts.others[name]) == "", f"pod host {name} listens"
        reach = subprocess.run(["ip", "netns", "exec", hosts.others[name], sys.executable, "-c",
                                "import socket; socket.create_connection(('10.231.4.2', 9), timeout=2)"],
                               capture_output=True, text=True, timeout=30)
        assert reach.returncode != 0 and "unreachable" in reach.stderr.lower(), reach.stderr
    assert f":{BROKER_PORT}" in hosts.listening(hosts.broker)  # ss does see listeners in a namespace
