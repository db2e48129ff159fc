"""The custodian's commands: `fedpod access ...` (requests and grants) and `fedpod policy ...`.

Each is a thin shell over `pod.custodian.PodFolder`, which the web page uses too. `fedpod
access status` is the one modeller-side command here: it asks the pods about the caller's own
requests.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpod.cli.options import BrokerUrl, ConfigPath, Creds, IdentityName, Keystore, Timeout, TlsCa, TlsCert, TlsKey
from fedpod.errors import ConfigError
from fedpod.pod.custodian import LIMIT_FIELDS, PodFolder, parse_kinds, policy_yaml

console = Console()
access_app = typer.Typer(help="Access requests and grants (custodian), and your own requests' state (modeller).",
                         no_args_is_help=True)
policy_app = typer.Typer(help="Show and change a pod's policies; a running pod applies changes at its next task.",
                         no_args_is_help=True)


def applies(config: Path) -> str:
    """When a change reaches the pod — said, never left to guess."""
    from fedpod.pod.status import running_pid

    pid = running_pid(PodFolder(config).storage)
    if pid is None:
        return "the pod is not running: it applies at the next `fedpod pod start`"
    return f"the running pod (pid {pid}) applies it to its next task, without a restart"


def _expiry(text: str | None) -> dt.date | None:
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--expires {text!r} is not a date", hint="write it as YYYY-MM-DD") from None


@access_app.command("list")
def access_list(config: ConfigPath = Path("pod.yaml"),
                every: Annotated[bool, typer.Option("--all", help="decided requests too")] = False) -> None:
    """Pending access requests (tasks the policy did not cover), newest last."""
    table = Table(title="access requests", title_justify="left")
    for column in ("id", "status", "modeller", "fingerprint", "dataset", "kinds", "first seen", "tasks"):
        table.add_column(column)
    for entry in PodFolder(config).requests.entries():
        if every or entry["status"] == "pending":
            table.add_row(str(entry["id"]), entry["status"], escape(entry["name"]), entry["fingerprint"],
                          escape(entry["dataset"]), ", ".join(entry["kinds"]), entry["first_seen"], str(entry["count"]))
    console.print(table)


@access_app.command("approve")
def access_approve(
    request_id: Annotated[int, typer.Argument(help="the request's id (`fedpod access list`)")],
    kinds: Annotated[str | None, typer.Option(help="task kinds to grant, comma-separated (default: as asked)")] = None,
    expires: Annotated[str | None, typer.Option(help="last day of the grant, YYYY-MM-DD")] = None,
    name: Annotated[str | None, typer.Option("--as", help="the name to know this modeller by")] = None,
    config: ConfigPath = Path("pod.yaml"),
) -> None:
    """Grant a request: its modeller may run those kinds of task on that dataset."""
    decided = PodFolder(config).approve(request_id, parse_kinds(kinds) if kinds else None, _expiry(expires), name)
    until = f" until {decided['expires']}" if decided.get("expires") else ""
    console.print(f"granted {', '.join(decided['granted'])} on {escape(decided['dataset'])} to "
                  f"{escape(decided['name'])} ({decided['fingerprint']}){until}; {applies(config)}", highlight=False)


@access_app.command("deny")
def access_deny(request_id: int, config: ConfigPath = Path("pod.yaml")) -> None:
    """Refuse a request; that key's later tasks on that dataset are refused naming it."""
    decided = PodFolder(config).deny(request_id)
    console.print(f"denied request {request_id} from {escape(decided['name'])} ({decided['fingerprint']})",
                  highlight=False)


@access_app.command("revoke")
def access_revoke(who: Annotated[str, typer.Argument(help="the modeller's name or fingerprint")],
                  config: ConfigPath = Path("pod.yaml")) -> None:
    """Remove a modeller and every grant it holds."""
    PodFolder(config).revoke(who)
    console.print(f"revoked {escape(who)}; {applies(config)}", highlight=False)


@access_app.command("status")
def access_status(
    pods: Annotated[list[str] | None, typer.Option("--pod", help="ask only this pod (repeatable)")] = None,
    identity: IdentityName = "modeller", keystore: Keystore = None, broker: BrokerUrl = "nats://127.0.0.1:4222",
    tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None, creds: Creds = None,
    timeout: Timeout = 10.0,
) -> None:
    """(Modeller) What each pod says about your access requests and grants."""
    from fedpod.cli.app import _modeller

    with _modeller(identity, keystore, broker, tls_ca, tls_cert, tls_key, creds, timeout) as modeller:
        answers = modeller.access_status(pods)
    table = Table(title=f"access of {escape(identity)}", title_justify="left")
    for column in ("pod", "dataset", "state", "kinds", "request"):
        table.add_column(column)
    for answer in answers:
        for dataset, kinds in answer.granted.items():
            table.add_row(escape(answer.pod), escape(dataset), "granted", ", ".join(kinds), "")
        for request in answer.requests:
            if request.status != "approved":
                table.add_row(escape(answer.pod), escape(request.dataset), request.status, ", ".join(request.kinds),
                              f"{request.id} ({request.count} task(s) since {request.first_seen})")
    console.print(table)


@policy_app.command("show")
def policy_show(config: ConfigPath = Path("pod.yaml")) -> None:
    """The `policies` section as the pod applies it (defaults included)."""
    console.print(policy_yaml(PodFolder(config).config.policies), highlight=False, markup=False)


@policy_app.command("budget")
def policy_budget(config: ConfigPath = Path("pod.yaml")) -> None:
    """Epsilon spent by differential privacy per dataset and modeller, against each budget."""
    rows = PodFolder(config).privacy_spend()
    if not rows:
        console.print("no differentially private task has run on this pod")
        return
    table = Table("dataset", "modeller", "spent", "budget", "remaining", "scope")
    for row in rows:
        table.add_row(escape(row["dataset"]), escape(row["modeller"]), f"{row['spent']:.4g}",
                      "none" if row["budget"] is None else f"{row['budget']:g}",
                      "" if row["remaining"] is None else f"{max(row['remaining'], 0):.4g}", row["scope"])
    console.print(table)


@policy_app.command("set")
def policy_set(
    dataset: Annotated[str, typer.Argument(help="a dataset of the pod, or '*' for every dataset without its own")],
    field: Annotated[str, typer.Argument(help=", ".join(LIMIT_FIELDS))],
    # \[: rich took the list's brackets for markup and dropped them
    value: Annotated[str, typer.Argument(help=r"YAML: 5, null, true, \[a, b] (or a,b for columns)")],
    config: ConfigPath = Path("pod.yaml"),
) -> None:
    """Change one limit of a dataset's policy (checked whole; refused naming the field if invalid)."""
    old, new = PodFolder(config).set_limit(dataset, field, value)
    console.print(f"{escape(dataset)}.{field}: {old!r} -> {new!r}; {applies(config)}", highlight=False)


@policy_app.command("edit")
def policy_edit(config: ConfigPath = Path("pod.yaml")) -> None:
    """Edit the whole `policies` section in $EDITOR; saved only if it validates."""
    folder = PodFolder(config)
    with tempfile.NamedTemporaryFile("w+", suffix=".yaml", delete=False) as draft:
        draft.write(policy_yaml(folder.config.policies))
    try:
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        subprocess.run([*editor.split(), draft.name], check=True)
        old, new = folder.replace_policy(Path(draft.name).read_text(), "fedpod policy edit")
    finally:
        Path(draft.name).unlink(missing_ok=True)
    if old == new:
        console.print("no change")
    else:
        console.print(f"policy saved; {applies(config)}", highlight=False)
