"""A NATS cluster on loopback: several `nats-server` members joined by authenticated routes,
with JetStream clustered across them, for `fedpod broker start --cluster` and the tests.

NATS is the distributed engine; fedpod only writes each member's configuration. Every member
lists every member's route port, so the full mesh forms whichever starts first, and a member
that dies and comes back rejoins by itself. Clients are given every member's URL (and learn
the rest by gossip), so a party whose member dies reconnects to another within a fraction of
a second. The members share one folder's parties: `allow` (or `fedpod broker allow --folder`)
makes all of them reload. Members can accept leaf-node servers (`leafnodes=True`): a site's
leaf node is given every member's leaf URL, so it too survives the loss of one.
"""

from __future__ import annotations

import json
import secrets
import socket
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from fedpod.errors import BrokerUnavailable
from fedpod.transport.broker import EmbeddedBroker, Role, Routes, allow_on


class BrokerCluster:
    """`size` members named `<name>-1`..`<name>-N`; `url` lists them all, comma-separated (what
    `--broker` and pod configs take). Options such as `open`, `parties`, `accounts` and
    `max_payload` apply to every member."""

    def __init__(self, size: int = 3, *, folder: Path | None = None, name: str = "fedpod", leafnodes: bool = False,
                 ready_timeout_s: float = 20.0, **member_options: Any) -> None:
        if size < 2:
            raise BrokerUnavailable(f"a cluster needs at least 2 members, not {size}")
        self._tmp = tempfile.TemporaryDirectory(prefix="fedpod-cluster-")
        self.folder = folder or Path(self._tmp.name)
        self.name = name
        self.ready_timeout_s = ready_timeout_s
        secret = secrets.token_hex(16)
        ports = tuple(_free_ports(size))
        self.members = [
            EmbeddedBroker(folder=self.folder, store=self.folder / f"{name}-{i + 1}" / "jetstream", monitor=True,
                           routes=Routes(name, f"{name}-{i + 1}", port, ports, secret), leafnodes=leafnodes,
                           ready_timeout_s=ready_timeout_s, **member_options)
            for i, port in enumerate(ports)]

    @property
    def url(self) -> str:
        return ",".join(member.url for member in self.members if member.port is not None)

    @property
    def leafnode_urls(self) -> list[str]:
        return [member.leafnode_url for member in self.members]

    def start(self) -> BrokerCluster:
        try:
            for member in self.members:
                member.start()
            self.wait_for_routes()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_routes(self, members: list[EmbeddedBroker] | None = None) -> None:
        """Return once every running member has a route to every other running member."""
        alive = [m for m in self.members if m.running]
        deadline = time.monotonic() + self.ready_timeout_s
        for member in members or alive:
            while len(_routed_servers(member)) < len(alive) - 1:
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"cluster member {member.routes and member.routes.member} did not "
                                            f"route to the other {len(alive) - 1} within {self.ready_timeout_s}s",
                                            where=str(member.log_path))
                time.sleep(0.02)

    def allow(self, role: Role, public: Any) -> None:
        """Let a party in on every member; returns once they have all reloaded."""
        allow_on(self.members, role, public)

    def kill(self, index: int) -> None:
        """SIGKILL one member (a crash, for tests): its clients fail over to the others."""
        self.members[index].kill()

    def restart(self, index: int) -> None:
        """Start a killed member again on its old ports; returns once it routes to the others."""
        member = self.members[index]
        member.start()
        self.wait_for_routes([member])

    def wait(self) -> int:
        """Block until any member exits (for `fedpod broker start --cluster` in the foreground)."""
        while True:
            if not all(member.running for member in self.members):
                return 1
            time.sleep(0.2)

    def stop(self) -> None:
        for member in self.members:
            member.stop()
        self._tmp.cleanup()

    def __enter__(self) -> BrokerCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _routed_servers(member: EmbeddedBroker) -> set[str]:
    """The other members this one has a route to, from NATS's /routez (route pooling opens
    several connections per pair, hence a set of server names)."""
    if member.monitoring_url is None:
        return set()
    try:
        with urllib.request.urlopen(f"{member.monitoring_url}/routez", timeout=2) as answer:
            routez = json.loads(answer.read())
    except (OSError, ValueError):
        return set()
    return {route.get("remote_name") or route.get("remote_id", "") for route in routez.get("routes") or []}


def _free_ports(count: int) -> list[int]:
    """Loopback ports free now, for the members' route listeners: every member must know every
    other's route port before any starts, so these cannot be left to the server to choose."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
