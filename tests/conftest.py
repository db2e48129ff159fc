"""Shared fixtures: a real NATS server, pods as real processes, and a real PostgreSQL server.

Nothing here sleeps for a fixed time: every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpod.data.catalog import inspect
from fedpod.data.datasets import DatasetSpec
from fedpod.pod.local import write_pod
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from fedpod.transport.cluster import BrokerCluster


@dataclass(frozen=True)
class Impersonator:
    """A forger: puts `victim`'s public keys in the envelopes it seals, but can only sign them
    with its own key (pass it to `seal` as the sender)."""

    own: Identity
    victim: Identity

    @property
    def public(self) -> object:
        return self.victim.public

    def sign(self, data: bytes) -> bytes:
        return self.own.sign(data)


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """The broker as fedpod runs it: only parties let in with `allow` may connect."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture(scope="session")
def open_broker() -> Iterator[EmbeddedBroker]:
    """A misconfigured broker that lets anyone in: for defences that must hold without the broker."""
    with EmbeddedBroker(open=True) as running:
        yield running


@pytest.fixture
def keystore(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def modeller_identity(keystore: Path, broker: EmbeddedBroker) -> Identity:
    identity = Identity.generate("modeller")
    identity.save(keystore)
    broker.allow("modeller", identity.public)
    return identity


@dataclass
class RunningPod:
    name: str
    config_path: Path
    process: subprocess.Popen[bytes]
    log: Path
    identity: Identity

    @property
    def audit_path(self) -> Path:
        return self.config_path.parent / "storage" / "audit.jsonl"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


PodFactory = Callable[..., RunningPod]


def three_rows(folder: Path) -> DatasetSpec:
    """Dataset `t`: one column `a` holding 1, 2, 3 — for tests about everything but the data."""
    csv = folder / "t.csv"
    csv.write_text("a\n1\n2\n3\n")
    return DatasetSpec(name="t", type="csv", path=str(csv))


def start_pod_process(config_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = config_path.parent / "pod.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "fedpod.cli", "pod", "start", "--config", str(config_path)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: "ready" in log.read_text(errors="replace") or process.poll() is not None, 60, "pod ready")
    if process.poll() is not None:
        raise AssertionError(f"pod exited: {log.read_text()}")
    return process, log


@pytest.fixture
def pod_factory(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[PodFactory]:
    """Start pods as separate `fedpod pod start` processes. `datasets` is a list of
    DatasetSpec; `allow` the identities whose tasks the pod accepts; `on` another broker than
    the session's authenticating one (the open one, for attacks a broker would have stopped)."""
    running: list[RunningPod] = []

    def make(name: str, datasets: list[DatasetSpec], allow: list[Identity], *,
             on: EmbeddedBroker | BrokerCluster | None = None, **settings: object) -> RunningPod:
        folder = tmp_path / "pods" / name
        folder.mkdir(parents=True)
        specs = [inspect(spec, folder) for spec in datasets]
        settings.setdefault("heartbeat_s", 0.2)
        config_path = write_pod(folder, name, on or broker, specs, allow, **settings)
        identity = Identity.load_or_create(name, folder / "keys")
        process, log = start_pod_process(config_path)
        pod = RunningPod(name, config_path, process, log, identity)
        running.append(pod)
        return pod

    yield make
    for pod in running:
        pod.stop()


# --- PostgreSQL -------------------------------------------------------------------------------

def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PostgresServer:
    dsn: str


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL server on 127.0.0.1 (scripts/test.sh installs it).
    In CI a missing server is a failure, not a skip."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are missing; scripts/test.sh installs them")
        pytest.skip("PostgreSQL server binaries not installed (scripts/test.sh installs them)")
    root = Path(tempfile.mkdtemp(prefix="fedpod-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
        os.chmod(root, 0o755)
    port = _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "fedpod", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-w", "-t", "60", "-l", str(root / "pg.log"), "-o",
                    f"-p {port} -k {sockets} -h 127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield PostgresServer(f"host=127.0.0.1 port={port} user=fedpod dbname=postgres")
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def heartbeats(broker: EmbeddedBroker, pod: RunningPod) -> Iterator[list[float]]:
    """Times (monotonic) at which the pod's heartbeats arrive, observed from another connection
    (which cannot open them: it only sees the pod announce its keys) until the block ends; the
    first two have arrived when the block starts."""
    import asyncio
    import threading

    from fedpod.security.envelope import announced_sender
    from fedpod.transport import subjects
    from fedpod.transport.bus import BrokerOptions, Bus

    beats: list[float] = []
    stop = threading.Event()

    async def listen() -> None:
        observer = Identity.generate("observer")
        broker.allow("modeller", observer.public)
        bus = await Bus.connect(BrokerOptions(broker.url), login=observer)
        keys = (pod.identity.public.sign_public, pod.identity.public.box_public)

        async def on_beat(frame: bytes, ack: object, vouched_by: object) -> None:
            if announced_sender(frame) == keys:
                beats.append(time.monotonic())

        await bus.subscribe(subjects.heartbeat(pod.identity.fingerprint), on_beat)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await bus.close()

    listener = threading.Thread(target=asyncio.run, args=(listen(),))
    listener.start()
    try:
        wait_until(lambda: len(beats) >= 2, 10, "first heartbeats")
        yield beats
    finally:
        stop.set()
        listener.join(10)
