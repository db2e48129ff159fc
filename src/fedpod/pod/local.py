"""Running pods as local processes: for `fedpod demo` and the benchmarks, which need a whole
federation on one machine. Each pod is a real `fedpod pod start` process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedpod.data.datasets import DatasetSpec
from fedpod.errors import FedpodError
from fedpod.governance.policy import EVERY_DATASET, TASK_KINDS, Policy
from fedpod.lifecycle import die_with_parent
from fedpod.modeller.client import Modeller
from fedpod.pod.config import BrokerSettings, PodConfig
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from fedpod.transport.cluster import BrokerCluster

EVENT_CODE_GROUPS = 1000  # the cells a local pod releases per aggregate of an events dataset (the vocabulary's)


def write_pod(folder: Path, name: str, broker: EmbeddedBroker | BrokerCluster | str, datasets: list[DatasetSpec],
              accept: list[Identity], **settings: Any) -> Path:
    """A pod folder ready to start: identity in `keys/`, `pod.yaml` with the datasets, granting
    every kind of task on every dataset to the `accept` modellers (unless `policies` is given),
    with `max_groups` raised for events datasets so that a federated vocabulary can count codes.
    Given the local broker (or cluster, or one member of it) itself, not only its URL, the pod
    and those modellers are let in."""
    folder.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(name, folder / "keys")
    if not isinstance(broker, str):
        broker.allow("pod", identity.public)
        for modeller in accept:
            broker.allow("modeller", modeller.public)
    broker_url = broker if isinstance(broker, str) else broker.url
    policies = Policy()
    for modeller in accept:
        policies = policies.grant(modeller.name, modeller.fingerprint, EVERY_DATASET, list(TASK_KINDS))
    for spec in datasets:  # a federated vocabulary counts every code of an events dataset: hundreds of cells
        if spec.kind == "events":
            policies = policies.limit(spec.name, max_groups=EVENT_CODE_GROUPS)
    settings.setdefault("policies", policies)
    config = PodConfig(name=name, identity=f"keys/{name}.key", broker=BrokerSettings(url=broker_url),
                       datasets=datasets, **settings)
    path = folder / "pod.yaml"
    config.save(path)
    return path


@contextmanager
def pod_processes(configs: list[Path], logs: Path,
                  options: dict[Path, list[str]] | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start one `fedpod pod start` process per config (with its `options`, e.g. `--ui`); always
    stop them all."""
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for config in configs:
            log = (logs / f"{config.parent.name}.log").open("wb")
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "fedpod.cli", "pod", "start", "--config", str(config),
                 *(options or {}).get(config, [])],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent))
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for_pods(modeller: Modeller, names: set[str], processes: list[subprocess.Popen[bytes]],
                  deadline_s: float = 60.0) -> None:
    """Wait until every named pod answers discovery; fail early if one exits."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        crashed = [p.args for p in processes if p.poll() is not None]
        if crashed:
            raise FedpodError(f"a pod exited during start-up: {crashed}", hint="see the pod logs")
        found = {t.pod.name for t in modeller.datasets(window_s=0.3)}
        if names <= found:
            return
    raise FedpodError(f"pods {sorted(names)} did not come up within {deadline_s:.0f}s")
