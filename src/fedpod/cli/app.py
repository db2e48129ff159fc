"""`fedpod` commands. Thin: each parses options, calls the library, and prints with rich."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpod import __version__
from fedpod.cli.governance import _expiry, access_app, applies, policy_app
from fedpod.cli.options import (
    BrokerUrl,
    ConfigPath,
    Creds,
    IdentityName,
    Keystore,
    MinDatasets,
    RequirePinned,
    Timeout,
    TlsCa,
    TlsCert,
    TlsKey,
    broker_options,
)
from fedpod.cli.pod_start import announce_page, pod_start, pod_storage, resolve_beside, stop_on_signals
from fedpod.data.catalog import inspect
from fedpod.data.datasets import DatasetSpec
from fedpod.errors import ConfigError
from fedpod.governance.audit import AuditLog
from fedpod.governance.plans import PlanRegistry
from fedpod.governance.policy import EVERY_DATASET, TASK_KINDS
from fedpod.names import check_name
from fedpod.pod.config import BrokerSettings, PodConfig
from fedpod.pod.custodian import PodFolder, parse_kinds
from fedpod.pod.ui.server import open_page, serve_page
from fedpod.security.identity import Identity, PublicIdentity, check_fingerprint, default_keystore, fedpod_home
from fedpod.transport.broker import ROLES, Role

if TYPE_CHECKING:  # the modeller's libraries stay out of `fedpod pod start`
    import pandas as pd

    from fedpod.modeller.client import Modeller, SqlResults
    from fedpod.modeller.known_pods import KnownPods

console = Console()
err = Console(stderr=True)
app = typer.Typer(help="fedpod: federated data collaboration over NATS.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
broker_app = typer.Typer(help="Run a local NATS broker.", no_args_is_help=True)
identity_app = typer.Typer(help="Create and show identities (signing + encryption keys).", no_args_is_help=True)
pod_app = typer.Typer(help="Configure and run a pod.", no_args_is_help=True)
dataset_app = typer.Typer(help="Register datasets in a pod config.", no_args_is_help=True)
datasets_app = typer.Typer(help="Discover datasets that pods advertise.", no_args_is_help=True)
data_app = typer.Typer(help="Synthetic data.", no_args_is_help=True)
audit_app = typer.Typer(help="Inspect and verify a pod's audit log.", no_args_is_help=True)
plan_app = typer.Typer(help="Approve or reject custom training-plan code sent to this pod.", no_args_is_help=True)
known_pods_app = typer.Typer(help="Pinned pod fingerprints (like SSH's known_hosts).", no_args_is_help=True)
for sub, name in ((broker_app, "broker"), (identity_app, "identity"), (pod_app, "pod"), (dataset_app, "dataset"),
                  (datasets_app, "datasets"), (data_app, "data"), (audit_app, "audit"), (plan_app, "plan"),
                  (known_pods_app, "known-pods"), (access_app, "access"), (policy_app, "policy")):
    app.add_typer(sub, name=name)
accounts_app = typer.Typer(help="NATS operator/account JWTs for a cluster that fedpod does not run.",
                           no_args_is_help=True)
broker_app.add_typer(accounts_app, name="accounts")

def interrupt_on_signals() -> None:
    """Turn SIGINT and SIGTERM into KeyboardInterrupt, so that cleanup (stopping the broker,
    the demo's pods) runs however the command is stopped. Set explicitly because a process
    started with SIGINT ignored (a background job, some CI runners) would otherwise ignore it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


SHOWN_ROWS = 50  # a terminal table of a million rows takes minutes and gigabytes; the file has them all


def print_frame(frame: pd.DataFrame, title: str) -> None:
    import pandas as pd

    table = Table(title=escape(title), title_justify="left")
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(escape(str(column)), justify="right" if numeric else "left")
    for row in frame.head(SHOWN_ROWS).itertuples(index=False):
        table.add_row(*[f"{v:.6g}" if isinstance(v, float) else escape(str(v)) for v in row])
    console.print(table)
    if len(frame) > SHOWN_ROWS:
        console.print(f"[dim]showing {SHOWN_ROWS} of {len(frame):,} rows; all of them are in the file[/dim]")


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="print the version")] = False) -> None:
    if version:
        console.print(f"fedpod {__version__}")
        raise typer.Exit()


BrokerFolder = Annotated[Path | None, typer.Option(
    "--folder", help="the broker's configuration and parties (default $FEDPOD_HOME/broker)")]


def _broker_folder(folder: Path | None) -> Path:
    return folder or fedpod_home() / "broker"


@broker_app.command("start")
def broker_start(
    port: Annotated[int | None, typer.Option(help="port (default: a free one)")] = None,
    store: Annotated[Path | None, typer.Option(help="JetStream store folder (default: temporary)")] = None,
    folder: BrokerFolder = None,
    open_: Annotated[bool, typer.Option("--open", help="let anyone connect (experiments only)")] = False,
    cluster: Annotated[int, typer.Option(
        "--cluster", help="run a cluster of this many members (routes and JetStream across them), 0 for one "
                          "server")] = 0,
    leafnodes: Annotated[bool, typer.Option(help="accept sites' leaf nodes (`fedpod broker leaf`)")] = False,
    host: Annotated[str, typer.Option(help="address to listen on: 0.0.0.0 when pods on other hosts connect "
                                           "(one server only)")] = "127.0.0.1",
) -> None:
    """Run nats-server (JetStream on) on 127.0.0.1 until Ctrl-C; prints its URL. Only parties
    let in with `fedpod broker allow` may connect (NATS nkeys), unless --open. With --cluster N,
    N members joined by authenticated routes: give parties the comma-separated URL and they
    fail over to another member when theirs dies."""
    from fedpod.transport.broker import EmbeddedBroker, read_parties
    from fedpod.transport.cluster import BrokerCluster

    interrupt_on_signals()
    home = _broker_folder(folder)
    if cluster and (port or store or host != "127.0.0.1"):
        raise ConfigError("--port, --store and --host are for one server; a cluster's members listen on loopback "
                          "on free ports and keep their JetStream stores in the broker folder")
    broker = BrokerCluster(cluster, folder=home, open=open_, leafnodes=leafnodes) if cluster else \
        EmbeddedBroker(port=port, store=store, folder=home, open=open_, leafnodes=leafnodes, host=host)
    with broker:
        console.print(broker.url)
        if host != "127.0.0.1":
            console.print(f"[dim]listening on {host}:{broker.url.rsplit(':', 1)[1]}[/dim]", highlight=False)
        if leafnodes:
            leaf_urls = broker.leafnode_urls if isinstance(broker, BrokerCluster) else [broker.leafnode_url]
            console.print(f"[dim]sites' leaf nodes connect to {','.join(leaf_urls)} "
                          "(`fedpod broker leaf --hub URL`)[/dim]", highlight=False)
        if open_:
            err.print("[yellow]warning:[/yellow] the broker is OPEN: anyone who reaches it can connect, "
                      "listen and publish", highlight=False)
        else:
            known = read_parties(home)
            console.print(f"[dim]{len(known)} part{'y' if len(known) == 1 else 'ies'} may connect; add one with "
                          f"`fedpod broker allow --role pod|modeller|site NAME.pub` ({home})[/dim]", highlight=False)
        console.print(f"[dim]export FEDPOD_BROKER={broker.url}   # Ctrl-C stops the broker[/dim]", highlight=False)
        with contextlib.suppress(KeyboardInterrupt):
            broker.wait()


@broker_app.command("leaf")
def broker_leaf(
    hub: Annotated[str, typer.Option(help="the cluster's leaf-node URLs, comma-separated (nats-leaf://HOST:PORT)")],
    config: Annotated[Path, typer.Option(help="the site's pod config: the leaf node serves this pod only")],
    port: Annotated[int | None, typer.Option(help="port for the pod (default: a free one)")] = None,
    folder: Annotated[Path | None, typer.Option(help="the leaf node's configuration (default: beside the pod "
                                                     "config, leaf-node/)")] = None,
) -> None:
    """Run the site's leaf node: a nats-server on 127.0.0.1 that only the site's pod may use, which
    connects out to the cluster — nothing connects in to the site. It logs in to the cluster with
    the pod's key, which the cluster's operator lets in with `fedpod broker allow --role site
    POD.pub`; point the pod at the URL it prints (broker: url: in pod.yaml)."""
    from fedpod.transport.broker import EmbeddedBroker, Hub, Party, split_urls

    interrupt_on_signals()
    settings = PodConfig.load(config)
    identity = Identity.load(resolve_beside(config, settings.identity))
    urls = tuple(split_urls(hub))
    with EmbeddedBroker(port=port, folder=folder or config.parent / "leaf-node", hub=Hub(urls, identity.nats_seed),
                        parties=[Party.of("pod", identity.public)]) as leaf:
        console.print(leaf.url)
        console.print(f"[dim]leaf node for pod {settings.name} ({identity.fingerprint}), connected out to "
                      f"{', '.join(urls)}; set `broker: url: {leaf.url}` in {config}[/dim]", highlight=False)
        with contextlib.suppress(KeyboardInterrupt):
            leaf.wait()


def _public(party: Path, keystore: Path | None) -> PublicIdentity:
    """A NAME.pub file, or the name of an identity in the keystore."""
    from fedpod.security.identity import PublicIdentity

    if not party.exists() and party.suffix != ".pub" and len(party.parts) == 1:
        party = (keystore or default_keystore()) / f"{check_name(str(party), 'identity')}.pub"
    return PublicIdentity.load(party)


@broker_app.command("allow")
def broker_allow(
    public: Annotated[Path, typer.Argument(help="the party's NAME.pub file, or an identity's name in the keystore")],
    role: Annotated[str, typer.Option(help="pod | modeller | site (a pod behind its site's leaf node)")],
    folder: BrokerFolder = None,
    keystore: Keystore = None,
) -> None:
    """Let a pod or a modeller connect to the broker, with only the subjects its role needs.
    A running broker (every member of a cluster) reloads at once (SIGHUP); nothing restarts."""
    from fedpod.transport.broker import Party, grant

    party = Party.of(_role(role), _public(public, keystore))
    home = _broker_folder(folder)
    reloaded = grant(home, party)
    state = "the running broker reloaded" if reloaded else "it applies when the broker starts"
    console.print(f"{role} {party.name} ({party.fingerprint}) may connect; {state} ({home})", highlight=False)


AccountsFolder = Annotated[Path | None, typer.Option(
    "--folder", help="the operator and account keys (default $FEDPOD_HOME/broker/accounts)")]


def _accounts_folder(folder: Path | None) -> Path:
    return folder or _broker_folder(None) / "accounts"


def _role(role: str) -> Role:
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}",
                          hint="site: a pod that reaches the cluster through its site's leaf node")
    return role


@accounts_app.command("init")
def accounts_init(folder: AccountsFolder = None) -> None:
    """Create an operator and an account (NATS decentralised authentication) for a cluster run by
    others; writes accounts.conf for the cluster's nats-server configuration to include."""
    from fedpod.transport.accounts import AccountAuthority
    from fedpod.transport.broker import ACCOUNTS_FILE

    home = _accounts_folder(folder)
    authority = AccountAuthority.create(home)
    (home / ACCOUNTS_FILE).write_text(authority.server_config())
    console.print(f"operator and account {authority.account_public} created in {home}; give the cluster's "
                  f"operator {home / ACCOUNTS_FILE} to include (the .nk files stay here, secret)", highlight=False)


@accounts_app.command("issue")
def accounts_issue(
    public: Annotated[Path, typer.Argument(help="the party's NAME.pub file (written beside its key)")],
    role: Annotated[str, typer.Option(help="pod | modeller | site (a pod behind its site's leaf node)")],
    out: Annotated[Path | None, typer.Option(help="where to write the user JWT (default NAME.jwt here)")] = None,
    expires_days: Annotated[float | None, typer.Option(help="the JWT expires after this many days")] = None,
    folder: AccountsFolder = None,
) -> None:
    """Issue a user JWT for a pod or a modeller, with only the subjects its role needs. It holds
    no secret: the party connects with `--creds NAME.jwt` (pod config: broker.creds) and its own key."""
    from fedpod.transport.accounts import AccountAuthority
    from fedpod.transport.broker import Party

    party = Party.of(_role(role), _public(public, None))
    token = AccountAuthority.load(_accounts_folder(folder)).user_jwt(
        party, expires_s=expires_days * 86400 if expires_days else None)
    path = out or Path(f"{party.name}.jwt")
    path.write_text(token + "\n")
    console.print(f"{role} {party.name} ({party.fingerprint}): user JWT written to {path}", highlight=False)


@identity_app.command("create")
def identity_create(name: str, keystore: Keystore = None) -> None:
    """Create identity NAME: Ed25519 + X25519 keys, saved with mode 0600."""
    identity = Identity.generate(name)
    path = identity.save(keystore or default_keystore())
    console.print(f"created {name}  fingerprint [bold]{identity.fingerprint}[/bold]  ({path}; public half "
                  f"{path.with_suffix('.pub')})")


@identity_app.command("list")
def identity_list(keystore: Keystore = None) -> None:
    """The identities in the keystore, with their fingerprints."""
    store = keystore or default_keystore()
    keys = sorted(store.glob("*.key")) if store.exists() else []
    if not keys:
        console.print(f"no identity in {store}; create one with `fedpod identity create NAME`", highlight=False)
    for key in keys:
        console.print(f"{escape(key.stem)}  {Identity.load(key.stem, store).fingerprint}", highlight=False)


@identity_app.command("show")
def identity_show(name: str, keystore: Keystore = None) -> None:
    """Print an identity's fingerprint."""
    console.print(Identity.load(name, keystore or default_keystore()).fingerprint)


@pod_app.command("init")
def pod_init(
    name: Annotated[str, typer.Option(help="pod name: the owner part of dataset identifiers")],
    config: ConfigPath = Path("pod.yaml"),
    broker: BrokerUrl = "nats://127.0.0.1:4222",
    tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None, creds: Creds = None,
) -> None:
    """Write a pod config, creating the pod's identity beside it (keys/NAME.key)."""
    check_name(name, "pod")  # before anything is written: a name is never a path
    if config.exists():
        raise ConfigError(f"{config} exists already", hint="edit it, or choose another --config")
    config.parent.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(name, config.parent / "keys")
    settings = BrokerSettings(url=broker, tls_ca=_opt(tls_ca), tls_cert=_opt(tls_cert), tls_key=_opt(tls_key),
                              creds=_opt(creds))
    PodConfig(name=name, identity=f"keys/{name}.key", broker=settings).save(config)
    console.print(f"wrote {config}; pod {name} fingerprint [bold]{identity.fingerprint}[/bold]; the broker's "
                  f"operator lets it in with `fedpod broker allow --role pod {config.parent / 'keys' / name}.pub`")


def _opt(path: Path | None) -> str | None:
    return str(path.resolve()) if path else None


@pod_app.command("allow")
def pod_allow(
    modeller: Annotated[str, typer.Option("--name", help="modeller's name")],
    fingerprint: Annotated[str, typer.Option(help="modeller's fingerprint, compared out of band")],
    kinds: Annotated[str, typer.Option(help="task kinds, comma-separated")] = ",".join(TASK_KINDS),
    dataset: Annotated[str, typer.Option(help="a dataset of the pod, or '*' for all")] = EVERY_DATASET,
    expires: Annotated[str | None, typer.Option(help="last day of the grant, YYYY-MM-DD")] = None,
    config: ConfigPath = Path("pod.yaml"),
) -> None:
    """Grant a modeller, identified by its fingerprint, task kinds on a dataset (default: all, on all)."""
    check_fingerprint(fingerprint)
    check_name(modeller, "modeller")
    granted = parse_kinds(kinds)
    PodFolder(config).change_policy(
        lambda policy: policy.grant(modeller, fingerprint, dataset, granted, _expiry(expires)), "fedpod pod allow")
    console.print(f"pod {PodFolder(config).config.name} now grants {', '.join(granted)} on {escape(dataset)} to "
                  f"{escape(modeller)} ({fingerprint}); {applies(config)}", highlight=False)


def _applies(config: Path, live: bool) -> str:
    """When a config change reaches the pod — said, never left to guess."""
    from fedpod.pod.status import running_pid

    if live:
        return applies(config)
    pid = running_pid(pod_storage(config))
    if pid is None:
        return "the pod is not running: it applies at the next `fedpod pod start`"
    return f"the running pod (pid {pid}) serves it after a restart (stop it, then `fedpod pod start --config {config}`)"


@pod_app.command("revoke")
def pod_revoke(
    modeller: Annotated[str, typer.Argument(help="the modeller's name or fingerprint")],
    config: ConfigPath = Path("pod.yaml"),
) -> None:
    """Remove a modeller and its grants (same as `fedpod access revoke`)."""
    PodFolder(config).revoke(modeller, "fedpod pod revoke")
    console.print(f"pod {PodFolder(config).config.name} no longer accepts {escape(modeller)}; {applies(config)}",
                  highlight=False)


@pod_app.command("status")
def pod_status(
    config: ConfigPath = Path("pod.yaml"),
    wait: Annotated[float, typer.Option(help="wait up to this many seconds for the pod to serve; exit 1 if not")] = 0,
) -> None:
    """Running or not, datasets, accepted modellers, tasks served and refused, rejected messages."""
    import json
    import time

    from fedpod.pod.status import running_pid

    settings = PodConfig.load(config)
    storage = pod_storage(config)
    deadline = time.monotonic() + wait
    pid = running_pid(storage)
    while pid is None and time.monotonic() < deadline:
        time.sleep(0.1)
        pid = running_pid(storage)
    if wait and pid is None:
        raise ConfigError(f"pod {settings.name} is not serving after {wait:g}s", where=str(config),
                          hint=f"its log: {storage / 'pod.log'}")
    served = refused = 0
    rejected: dict[str, int] = {}
    audit = storage / "audit.jsonl"
    for line in audit.read_text().splitlines() if audit.exists() else []:
        entry = json.loads(line)
        event = entry.get("event")
        served += event == "task-completed"
        refused += event == "task-received" and entry.get("decision") == "deny"
        if event == "rejections":
            for reason, count in entry.get("counts", {}).items():
                rejected[reason] = rejected.get(reason, 0) + int(count)
    fingerprint = Identity.load(resolve_beside(config, settings.identity)).fingerprint
    state = f"running, pid {pid}" if pid else "not running"
    console.print(f"pod {escape(settings.name)} ({fingerprint}): {state}; broker {escape(settings.broker.url)}",
                  highlight=False)
    for spec in settings.datasets:
        console.print(f"  dataset {escape(spec.name)}: {spec.rows:,} rows, tags {escape(', '.join(spec.tags) or '-')}",
                      highlight=False)
    for name, known in settings.policies.modellers.items():
        console.print(f"  knows {escape(name)} ({known})", highlight=False)
    pending = sum(entry["status"] == "pending" for entry in PodFolder(config).requests.entries())
    if pending:
        console.print(f"  {pending} access request(s) pending: `fedpod access list --config {config}`", highlight=False)
    rejections = ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items())) or "none"
    console.print(f"  tasks served {served}, refused {refused} (audited); messages rejected: {rejections}",
                  highlight=False)


pod_app.command("start")(pod_start)


@pod_app.command("ui")
def pod_ui(config: ConfigPath = Path("pod.yaml"),
           host: Annotated[str, typer.Option(help="address the page listens on (keep it local)")] = "127.0.0.1",
           port: Annotated[int, typer.Option(help="port of the page (0: any free one)")] = 8765) -> None:
    """Serve the custodian's page for a pod (running or not): datasets, policies, approvals,
    audit log, live activity. Prints its URL and a fresh access token; Ctrl-C stops it."""
    folder = PodFolder(config)
    sock, address = open_page(folder, host, port)  # a config that does not load fails here
    announce_page(address)

    async def main() -> None:
        await serve_page(folder, sock, address, stop_on_signals())

    asyncio.run(main())


def _code_map(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    import csv

    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and not row[0].startswith("#")]
    if rows and rows[0][:2] == ["local", "shared"]:
        rows = rows[1:]
    bad = [i + 1 for i, row in enumerate(rows) if len(row) != 2 or not all(cell.strip() for cell in row)]
    if bad:
        raise ConfigError(f"{path}: line(s) {bad} are not 'local,shared' pairs")
    return {local.strip(): shared.strip() for local, shared in rows}


@dataset_app.command("add")
def dataset_add(
    name: Annotated[str, typer.Option(help="dataset name (the table name in SQL)")],
    kind: Annotated[str, typer.Option("--type", help="csv | parquet | sqlite | postgres | events")],
    config: ConfigPath = Path("pod.yaml"),
    tags: Annotated[str, typer.Option(help="comma-separated tags")] = "",
    path: Annotated[str | None, typer.Option(help="file (csv, parquet, sqlite; for events the event table)")] = None,
    dsn: Annotated[str | None, typer.Option(help="PostgreSQL connection string")] = None,
    table: Annotated[str | None, typer.Option(help="table in the SQLite/PostgreSQL database")] = None,
    description: str = "",
    static: Annotated[str | None, typer.Option(help="events: the static table (one row per patient), csv or "
                                                    "parquet; SQL names it DATASET_static")] = None,
    id_column: Annotated[str, typer.Option(help="events: the patient id column (in both tables)")] = "patient_id",
    time_column: Annotated[str, typer.Option(help="events: the timestamp column")] = "timestamp",
    code_column: Annotated[str, typer.Option(help="events: the code column")] = "code",
    value_column: Annotated[str | None, typer.Option(help="events: the value column, if any")] = "value",
    code_map: Annotated[Path | None, typer.Option(help="events: a CSV of local,shared code pairs, applied on "
                                                       "load so that counts and tensors use the shared codes")] = None,
) -> None:
    """Register a dataset; its schema and row count are inferred and stored."""
    settings = PodConfig.load(config)
    if settings.dataset(name):
        raise ConfigError(f"pod {settings.name} already has a dataset {name!r}", where=str(config))
    path, static = (str(Path(p).resolve()) if p and not Path(p).is_absolute() else p for p in (path, static))
    event_fields = {"static": static, "id_column": id_column, "time_column": time_column, "code_column": code_column,
                    "value_column": value_column, "code_map": _code_map(code_map)} if kind == "events" else {}
    try:
        spec = DatasetSpec.model_validate({"name": name, "type": kind, "tags": [t for t in tags.split(",") if t],
                                           "path": path, "dsn": dsn, "table": table, "description": description,
                                           **event_fields})
    except ValueError as exc:
        raise ConfigError(str(exc), where="fedpod dataset add") from exc
    spec = inspect(spec, config.parent.resolve())
    settings.datasets.append(spec)
    settings.save(config)
    static_part = (f"; table {spec.static_table}: {spec.static_rows} rows, columns {', '.join(spec.static_columns)}"
                   if spec.static_table else "")
    console.print(f"added {settings.name}/{name}: {spec.rows} rows, columns {', '.join(spec.columns)}{static_part}; "
                  f"{_applies(config, live=False)}", highlight=False)


@dataset_app.command("list")
def dataset_list(config: ConfigPath = Path("pod.yaml")) -> None:
    """The datasets this pod serves: name, type, tags, rows, columns, source."""
    settings = PodConfig.load(config)
    table = Table(title=f"pod {escape(settings.name)}: {len(settings.datasets)} dataset(s)", title_justify="left")
    for column in ("name", "type", "tags", "rows", "columns", "source"):
        table.add_column(column)
    for spec in settings.datasets:
        source = spec.path or (f"{spec.table} in a PostgreSQL database" if spec.dsn else spec.table) or ""
        table.add_row(escape(spec.name), spec.kind, escape(", ".join(spec.tags)), f"{spec.rows:,}",
                      str(len(spec.columns)), escape(str(source)))
    console.print(table)


@dataset_app.command("remove")
def dataset_remove(name: str, config: ConfigPath = Path("pod.yaml")) -> None:
    """Stop serving a dataset (its file is left where it is)."""
    settings = PodConfig.load(config)
    if settings.dataset(name) is None:
        raise ConfigError(f"pod {settings.name} has no dataset {name!r}", where=str(config),
                          hint="`fedpod dataset list` shows them")
    settings.datasets[:] = [d for d in settings.datasets if d.name != name]
    settings.save(config)
    console.print(f"removed {settings.name}/{name} from {config}; {_applies(config, live=False)}", highlight=False)


def _modeller(identity: str, keystore: Path | None, url: str, tls_ca: Path | None, tls_cert: Path | None,
              tls_key: Path | None, creds: Path | None, timeout: float, require_pinned: bool = False) -> Modeller:
    from fedpod.modeller.client import Modeller

    return Modeller(identity, broker=broker_options(url, tls_ca, tls_cert, tls_key, creds), keystore=keystore,
                    timeout_s=timeout, require_pinned=require_pinned)


def _report_ignored(modeller: Modeller) -> None:
    for pod, reason in sorted(modeller.ignored_adverts.items()):
        err.print(f"[yellow]warning:[/yellow] ignored pod {pod}: it {reason}", highlight=False)


def _known_pods(keystore: Path | None) -> KnownPods:
    from fedpod.modeller.known_pods import KnownPods

    return KnownPods((keystore or default_keystore()).parent / "known_pods.json")


@known_pods_app.command("add")
def known_pods_add(
    pod: str, fingerprint: str, keystore: Keystore = None,
    replace: Annotated[bool, typer.Option(help="replace an existing pin (the pod's keys really changed)")] = False,
) -> None:
    """Pin a pod's fingerprint before first contact (compare it with its custodian out of band)."""
    _known_pods(keystore).pin(pod, check_fingerprint(fingerprint), replace=replace)
    console.print(f"pinned {pod} to {fingerprint}")


@known_pods_app.command("list")
def known_pods_list(keystore: Keystore = None) -> None:
    """Print the pinned pods."""
    for pod, fingerprint in sorted(_known_pods(keystore).all().items()):
        console.print(f"{pod}  {fingerprint}", highlight=False)


@known_pods_app.command("remove")
@known_pods_app.command("forget")
def known_pods_remove(pod: str, keystore: Keystore = None) -> None:
    """Forget a pod's pin (the next task that targets it pins it again, unless --require-pinned)."""
    found = _known_pods(keystore).remove(pod)
    console.print(f"removed {pod}" if found else f"{pod} was not pinned")


@datasets_app.command("list")
def datasets_list(
    broker: BrokerUrl = "nats://127.0.0.1:4222", identity: IdentityName = "modeller", keystore: Keystore = None,
    tags: Annotated[str, typer.Option(help="only datasets carrying all these tags (comma-separated)")] = "",
    wait: Annotated[float, typer.Option(help="seconds to collect adverts")] = 1.0,
    tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None, creds: Creds = None,
    require_pinned: RequirePinned = False,
) -> None:
    """List the datasets that pods on the broker advertise to this modeller."""
    with _modeller(identity, keystore, broker, tls_ca, tls_cert, tls_key, creds, 30.0, require_pinned) as modeller:
        targets = modeller.datasets(tags=[t for t in tags.split(",") if t] or None, window_s=wait)
        _report_ignored(modeller)
    table = Table(title=f"{len(targets)} dataset(s)", title_justify="left")
    for column in ("identifier", "tags", "rows (rounded)", "columns", "pod fingerprint"):
        table.add_column(column)
    for target in targets:
        d = target.dataset
        table.add_row(d.identifier, ",".join(d.tags), str(d.rows_rounded), ", ".join(d.columns),
                      target.pod.fingerprint)
    console.print(table)


def _save_results(result: pd.DataFrame | SqlResults, out: Path, query: str) -> None:
    """Save and show a query's results, saying exactly which datasets they cover. An earlier
    result is never overwritten (the next free name is taken), and each file has the query and
    its coverage beside it (`NAME.json`)."""
    import json
    import time

    out.mkdir(parents=True, exist_ok=True)
    frames = dict(result) if isinstance(result, dict) else {"aggregate": result}
    missing = result.missing if isinstance(result, dict) else result.attrs.get("missing", {})
    covered = list(result) if isinstance(result, dict) else result.attrs.get("datasets", [])
    disclosure = result.disclosure if isinstance(result, dict) else result.attrs.get("disclosure", {})
    for identifier, frame in frames.items():
        file = _free_name(out, identifier.replace("/", "__"))
        frame.to_csv(file, index=False)
        whole = identifier == "aggregate"
        file.with_suffix(".json").write_text(json.dumps(
            {"query": query, "result": identifier, "datasets": covered if whole else [identifier],
             "missing": missing, "disclosure": disclosure if whole else disclosure.get(identifier, {}),
             "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
        print_frame(frame, f"{identifier}  →  {file}")
    if not isinstance(result, dict):
        console.print(f"aggregated over {len(covered)} dataset(s): {escape(', '.join(covered))}", highlight=False,
                      soft_wrap=True)
    for identifier, limits in sorted(disclosure.items()):
        err.print(f"[yellow]disclosure control:[/yellow] {escape(identifier)} {escape(disclosure_note(limits))}",
                  highlight=False, soft_wrap=True)
    for identifier, why in sorted(missing.items()):
        err.print(f"[yellow]missing:[/yellow] {escape(identifier)} — {escape(why)}", highlight=False, soft_wrap=True)


def disclosure_note(limits: dict[str, int | float]) -> str:
    """What a pod's disclosure limits did to its part of a result, in words."""
    notes = []
    if "suppressed_groups" in limits:
        notes.append(f"suppressed {limits['suppressed_groups']} group(s) of fewer than {limits['min_group_size']} rows "
                     "(their rows are left out of this result, which is therefore not exact)")
    if "withheld_values" in limits:
        notes.append(f"withheld {limits['withheld_values']} value(s) computed from fewer than "
                     f"{limits['min_group_size']} rows (shown empty; in a merge, left out of their totals)")
    if "rows_capped_at" in limits:
        notes.append(f"capped its rows at {limits['rows_capped_at']:,} (its policy's max_rows)")
    if "withheld_counts" in limits:
        notes.append(f"withheld {limits['withheld_counts']} count(s) near its smallest or largest values (the "
                     "quantile search went around them; the answer is exact)")
    if "dp_epsilon" in limits:
        remaining = limits.get("dp_epsilon_remaining")
        notes.append(f"added noise for epsilon {limits['dp_epsilon']:g}"
                     + (f" ({remaining:.4g} of its budget remains)" if remaining is not None else ""))
    return "; ".join(notes)


def _free_name(folder: Path, stem: str) -> Path:
    """`stem.csv`, or `stem-2.csv`, `stem-3.csv`, ... whichever does not exist yet."""
    candidate, number = folder / f"{stem}.csv", 1
    while candidate.exists():
        number += 1
        candidate = folder / f"{stem}-{number}.csv"
    return candidate


@app.command("run")
def run_task(
    task_file: Annotated[Path, typer.Argument(help="Bitfount-style task YAML")],
    out: Annotated[Path, typer.Option(help="results folder")] = Path("results"),
    broker: BrokerUrl = "nats://127.0.0.1:4222", identity: IdentityName = "modeller", keystore: Keystore = None,
    timeout: Timeout = 60.0,
    tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None, creds: Creds = None,
    require_pinned: RequirePinned = False, min_datasets: MinDatasets = None,
) -> None:
    """Run a task file: SQL results are saved as CSV (one per dataset, or aggregate.csv); training
    writes an experiment folder (metrics, final weights) under --out."""
    from fedpod.tasks.model import SqlTask
    from fedpod.tasks.yaml_front import load_task

    task = load_task(task_file)
    with _modeller(identity, keystore, broker, tls_ca, tls_cert, tls_key, creds, timeout, require_pinned) as modeller:
        if isinstance(task, SqlTask):
            result = modeller.sql(task.query, datasets=task.targets.identifiers or None,
                                  tags=task.targets.tags or None, aggregate=task.aggregate, min_datasets=min_datasets,
                                  secure=task.secagg if task.secagg is not None else False)
            _save_results(result, out, task.query)
            return
        from fedpod.modeller.training_task import run_training_task

        experiment = run_training_task(task, modeller, out, console, min_datasets)
    console.print(f"trained {task.plan} for {experiment.round_current()} rounds; metrics and weights in "
                  f"{experiment.experimentation_path()}")


@app.command("sql")
def sql(
    query: str,
    datasets: Annotated[str, typer.Option(help="comma-separated owner/name identifiers")] = "",
    tags: Annotated[str, typer.Option(help="comma-separated tags (every tag must match)")] = "",
    aggregate: Annotated[bool, typer.Option(help="one exact global result instead of one per dataset")] = False,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("results"),
    broker: BrokerUrl = "nats://127.0.0.1:4222", identity: IdentityName = "modeller", keystore: Keystore = None,
    timeout: Timeout = 60.0,
    tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None, creds: Creds = None,
    require_pinned: RequirePinned = False, min_datasets: MinDatasets = None,
) -> None:
    """Run one federated SQL query. Every dataset asked for must answer (each one that does not
    is named) unless --min-datasets accepts fewer; the result says which datasets it covers."""
    with _modeller(identity, keystore, broker, tls_ca, tls_cert, tls_key, creds, timeout, require_pinned) as modeller:
        result = modeller.sql(query, datasets=[d for d in datasets.split(",") if d] or None,
                              tags=[t for t in tags.split(",") if t] or None, aggregate=aggregate,
                              min_datasets=min_datasets)
    _save_results(result, out, query)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="output folder")],
    centres: Annotated[int, typer.Option(help="number of centres")] = 3,
    patients: Annotated[int, typer.Option(help="patients over all centres")] = 3000,
    seed: int = 0,
    journeys: Annotated[bool, typer.Option(
        help="years of encounters per patient (static table + long event table, a few hundred codes)")] = False,
    file_format: Annotated[str, typer.Option("--format", help="with --journeys: csv or parquet")] = "csv",
) -> None:
    """Write synthetic patients + observation events per centre (deterministic for a seed)."""
    if journeys:
        from fedpod.data.journeys import generate_journeys, write_journeys

        if file_format not in ("csv", "parquet"):
            raise ConfigError(f"--format {file_format!r}: choose csv or parquet")
        generated = generate_journeys(centres, patients, seed)
        written = write_journeys(generated, out, "parquet" if file_format == "parquet" else "csv")
        for centre, folder in zip(generated, written, strict=True):
            console.print(f"{folder}: {len(centre.patients)} patients, {len(centre.events):,} events, "
                          f"{centre.events['code'].nunique()} codes", highlight=False)
        return
    from fedpod.data.synth import generate, write

    for folder in write(generate(centres, patients, seed), out):
        rows = sum(1 for _ in (folder / "patients.csv").open()) - 1
        console.print(f"{folder}: {rows} patients")


AuditFilters = tuple[str | None, str | None, str | None, str | None]


def _audit_rows(config: Path, filters: AuditFilters) -> list[dict[str, object]]:
    from fedpod.governance.audit_view import parse_since, rows

    since, dataset, modeller, decision = filters
    return rows(AuditLog(pod_storage(config) / "audit.jsonl").entries(),
                since=parse_since(since) if since else None, dataset=dataset, modeller=modeller, decision=decision)


Since = Annotated[str | None, typer.Option(help="only entries since: 30m, 2h, 7d, or a date/time")]
OfDataset = Annotated[str | None, typer.Option("--dataset", help="only this dataset's entries")]
OfModeller = Annotated[str | None, typer.Option("--modeller", help="only this modeller's (name or fingerprint)")]
OfDecision = Annotated[str | None, typer.Option("--decision", help="allow | deny")]


@audit_app.command("show")
def audit_show(config: ConfigPath = Path("pod.yaml"), since: Since = None, dataset: OfDataset = None,
               modeller: OfModeller = None, decision: OfDecision = None,
               last: Annotated[int, typer.Option(help="at most this many (the newest)")] = 200) -> None:
    """The audit log as a table: who asked what of which dataset, what was decided and returned."""
    selected = _audit_rows(config, (since, dataset, modeller, decision))
    table = Table(title=f"{len(selected)} entr{'y' if len(selected) == 1 else 'ies'} (showing at most {last})",
                  title_justify="left")
    for column in ("seq", "time", "event", "requester", "dataset", "kind", "decision", "details"):
        table.add_column(column, overflow="fold")
    for row in selected[-last:]:
        table.add_row(*(escape(str(row[c]))[:160] for c in ("seq", "time", "event", "requester", "dataset", "kind",
                                                            "decision", "details")))
    console.print(table)


@audit_app.command("export")
def audit_export(out: Annotated[Path, typer.Option("--csv", help="CSV file to write")],
                 config: ConfigPath = Path("pod.yaml"), since: Since = None, dataset: OfDataset = None,
                 modeller: OfModeller = None, decision: OfDecision = None) -> None:
    """The audit log (filtered as `show`) as CSV, one entry per row, for a reviewer's own tools."""
    import csv

    from fedpod.governance.audit_view import COLUMNS

    selected = _audit_rows(config, (since, dataset, modeller, decision))
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(selected)
    console.print(f"wrote {len(selected)} entries to {out}", highlight=False)


@audit_app.command("verify")
def audit_verify(
    config: ConfigPath = Path("pod.yaml"),
    witness: Annotated[list[Path] | None, typer.Option(
        help="checkpoints a modeller kept ($FEDPOD_HOME/witness/POD-FINGERPRINT.jsonl); repeatable")] = None,
) -> None:
    """Check the pod's audit log: its hash chain, and that it still holds what every signed
    checkpoint (the pod's own, and any a modeller kept) vouches for. Exit 1 if not."""
    path = pod_storage(config) / "audit.jsonl"
    result = PodFolder(config).verify_audit(witness)
    if result.ok:
        console.print(f"audit log intact: {result.entries} entries, consistent with {result.checkpoints} signed "
                      f"checkpoint(s) ({path})", highlight=False)
        if result.note:
            err.print(f"[yellow]note:[/yellow] {result.note}", highlight=False)
    else:
        err.print(f"[red]audit log TAMPERED[/red] after {result.entries} good entries: {result.problem} ({path})",
                  highlight=False)
        raise typer.Exit(1)


def _plans(config: Path) -> PlanRegistry:
    return PodFolder(config).plans


@plan_app.command("list")
def plan_list(config: ConfigPath = Path("pod.yaml")) -> None:
    """Custom training plans this pod has seen, with their status."""
    table = Table(title="training plans", title_justify="left")
    for column in ("sha256", "class", "status", "requester"):
        table.add_column(column)
    for entry in _plans(config).entries():
        table.add_row(entry["sha256"][:16], entry["class"], entry["status"], entry["requester"])
    console.print(table)


@plan_app.command("show")
def plan_show(sha: str, config: ConfigPath = Path("pod.yaml")) -> None:
    """Print a plan's source (review it before approving)."""
    console.print(_plans(config).source(sha), highlight=False, markup=False)


@plan_app.command("approve")
def plan_approve(sha: str, config: ConfigPath = Path("pod.yaml")) -> None:
    """Allow this exact source (by hash) to run on this pod."""
    meta = PodFolder(config).decide_plan(sha, approved=True)
    console.print(f"approved {meta['class']} ({meta['sha256'][:16]})")


@plan_app.command("reject")
def plan_reject(sha: str, config: ConfigPath = Path("pod.yaml")) -> None:
    """Refuse this source; tasks using it fail with a clear error."""
    meta = PodFolder(config).decide_plan(sha, approved=False)
    console.print(f"rejected {meta['class']} ({meta['sha256'][:16]})")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="results folder")] = Path("fedpod-demo"),
    patients: Annotated[int | None, typer.Option(
        help="synthetic patients over the three centres (default 6,000; 3,000 with --journeys)")] = None,
    seed: int = 7,
    governance: Annotated[bool, typer.Option(
        help="the custodian's side instead: a refusal, an approval, suppression, the audit log, a pod's page")] = False,
    keep_open: Annotated[bool, typer.Option(help="with --governance: keep the pods up until Ctrl-C")] = False,
    journeys: Annotated[bool, typer.Option(
        help="Fed-BioMed's TanaT tutorial instead: patient journeys, tensors, an agreed vocabulary, a GRU")] = False,
) -> None:
    """The whole story on one machine: broker, three pods, federated SQL checked against pooled
    data, federated training against centralised; or, with --governance, what custodians control."""
    interrupt_on_signals()
    if journeys:
        from fedpod.cli.demo_journeys import run_journeys_demo

        run_journeys_demo(out, patients=patients or 3000, seed=seed)
        return
    if governance:
        import shutil

        from fedpod.cli.demo_governance import run_governance_demo

        if out.exists():
            shutil.rmtree(out)
        run_governance_demo(out, seed=seed, keep_open=keep_open, console=console)
        return
    from fedpod.cli.demo import run_demo

    run_demo(out, patients=patients or 6000, seed=seed, console=console)
