"""`fedpod demo --governance`: what a custodian controls, on one machine.

Three pods as processes, each with its own policy: alice and bob grant the modeller aggregate
SQL only (with a minimum group size of 5), charlie knows no one. The demo shows a refusal that
names its access request, the custodian approving it (the next query succeeds, no restart), a
row query refused for want of a grant, small groups suppressed and reported, and charlie's
audit log shown and verified. Alice's page is served; its URL and token are printed (with
`--keep-open` the federation stays up until Ctrl-C so a person can look around).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpod.data.catalog import inspect
from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.errors import AccessDenied, FedpodError
from fedpod.governance.audit_view import rows
from fedpod.governance.policy import Policy
from fedpod.modeller.client import Modeller
from fedpod.pod.custodian import PodFolder
from fedpod.pod.local import pod_processes, write_pod
from fedpod.pod.status import running_pid
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

DATASET = "ehr-records-2025"
COUNTS = f"SELECT smoker, COUNT(*) AS patients, AVG(age) AS mean_age FROM `{DATASET}` GROUP BY smoker ORDER BY smoker"
BY_AGE = (f"SELECT age, COUNT(*) AS patients FROM `{DATASET}` WHERE age >= 80 GROUP BY age ORDER BY age")
ROWS = f"SELECT patient_id, age FROM `{DATASET}` LIMIT 5"
MIN_GROUP_SIZE = 5


def _policy(modeller: Identity | None) -> Policy:
    if modeller is None:
        return Policy()
    granted = Policy().grant(modeller.name, modeller.fingerprint, DATASET, ["sql_aggregate"])
    data = granted.model_dump(mode="json")
    data["datasets"][DATASET]["min_group_size"] = MIN_GROUP_SIZE
    return Policy.model_validate(data)


def _refusal(console: Console, error: AccessDenied) -> None:
    console.print(f"[red]refused:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)


def _wait_until_serving(configs: list[Path], processes: list[subprocess.Popen[bytes]],
                        deadline_s: float = 60.0) -> None:
    """Discovery cannot tell: charlie advertises nothing to a modeller it does not know."""
    deadline = time.monotonic() + deadline_s
    while not all(running_pid(PodFolder(c).storage) for c in configs):
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            raise FedpodError("a pod did not start", hint="see the logs folder of the demo")
        time.sleep(0.1)


def _page_address(config: Path, deadline_s: float = 30.0) -> dict[str, Any]:
    path = PodFolder(config).storage / "ui.json"
    deadline = time.monotonic() + deadline_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise FedpodError("alice's page did not start", where=str(path))
        time.sleep(0.1)
    address: dict[str, Any] = json.loads(path.read_text())
    return address


def run_governance_demo(out: Path, *, seed: int, keep_open: bool, console: Console) -> dict[str, Any]:
    from fedpod.cli.app import disclosure_note, print_frame

    started = time.perf_counter()
    keystore = out / "keys"
    lab = Identity.generate("lab")
    lab.save(keystore)
    centres = generate(3, 900, seed)
    folders = write(centres, out / "data")
    facts: dict[str, Any] = {}
    console.rule("[bold]fedpod demo --governance")
    with EmbeddedBroker() as broker:
        configs = []
        for index, (centre, folder) in enumerate(zip(centres, folders, strict=True)):
            spec = inspect(DatasetSpec(name=DATASET, kind="csv", path=str((folder / "patients.csv").resolve()),
                                       tags=["ehr"]), out / "pods" / centre.name)
            configs.append(write_pod(out / "pods" / centre.name, centre.name, broker, [spec], [lab], heartbeat_s=0.5,
                                     policies=_policy(lab if index < 2 else None)))
        alice, charlie = configs[0], configs[2]
        with pod_processes(configs, out / "logs", {alice: ["--ui", "--ui-port", "0"]}) as processes, \
                Modeller(lab, broker=broker.url, keystore=keystore, known_pods=out / "known_pods.json") as modeller:
            _wait_until_serving(configs, processes)
            names = [c.name for c in centres]
            console.print(f"pods {', '.join(names)} up; alice and bob grant modeller 'lab' aggregate SQL "
                          f"(min_group_size {MIN_GROUP_SIZE}); charlie knows no one")
            identifiers = [f"{name}/{DATASET}" for name in names]

            console.rule("1. a refusal names its rule and the request to approve")
            console.print(f"[dim]{COUNTS}[/dim] on {identifiers[2]}", highlight=False)
            try:
                modeller.sql(COUNTS, datasets=[identifiers[2]], aggregate=True)
                raise FedpodError("charlie answered a modeller it does not know")
            except AccessDenied as error:
                _refusal(console, error)
                facts["refused_rule"], request_id = error.rule, error.request_id
            assert request_id is not None

            console.rule("2. charlie's custodian approves the request")
            custodian = PodFolder(charlie)
            listing = Table(title=f"$ fedpod access list --config {charlie}", title_justify="left")
            for column in ("id", "modeller", "fingerprint", "dataset", "kinds", "tasks"):
                listing.add_column(column)
            for entry in custodian.requests.entries():
                listing.add_row(str(entry["id"]), entry["name"], entry["fingerprint"], entry["dataset"],
                                ", ".join(entry["kinds"]), str(entry["count"]))
            console.print(listing)
            console.print(f"$ fedpod access approve {request_id} --kinds sql_aggregate --config {charlie}",
                          highlight=False)
            custodian.approve(request_id, ["sql_aggregate"])
            merged = modeller.sql(COUNTS, datasets=identifiers, aggregate=True)
            assert isinstance(merged, pd.DataFrame)
            print_frame(merged, "the same query, now over all three pods (no pod restarted)")
            facts["approved_then_answered"] = merged.attrs["datasets"] == identifiers

            console.rule("3. a row query needs a grant of sql_rows")
            console.print(f"[dim]{ROWS}[/dim] on {identifiers[0]}", highlight=False)
            try:
                modeller.sql(ROWS, datasets=[identifiers[0]])
                raise FedpodError("alice returned rows without a grant of sql_rows")
            except AccessDenied as error:
                _refusal(console, error)
                facts["rows_refused_rule"] = error.rule

            console.rule(f"4. groups of fewer than {MIN_GROUP_SIZE} patients never leave a pod")
            console.print(f"[dim]{BY_AGE}[/dim]", highlight=False)
            by_age = modeller.sql(BY_AGE, datasets=identifiers, aggregate=True)
            assert isinstance(by_age, pd.DataFrame)
            print_frame(by_age, "aggregated over the three pods")
            for identifier, limits in by_age.attrs["disclosure"].items():
                console.print(f"[yellow]disclosure control:[/yellow] {identifier} {disclosure_note(limits)}",
                              highlight=False, soft_wrap=True)
            facts["suppressed_groups"] = {i: d.get("suppressed_groups", 0)
                                          for i, d in by_age.attrs["disclosure"].items()}

            console.rule("5. charlie's audit log, shown and verified")
            audit = Table(title=f"$ fedpod audit show --config {charlie}", title_justify="left")
            for column in ("seq", "event", "requester", "kind", "decision"):
                audit.add_column(column, no_wrap=True)
            audit.add_column("details", overflow="ellipsis", no_wrap=True, max_width=60)
            for row in rows(custodian.audit.entries())[-10:]:
                audit.add_row(*(escape(str(row[c])) for c in ("seq", "event", "requester", "kind", "decision",
                                                              "details")))
            console.print(audit)
            result = custodian.verify_audit()
            facts["audit_verified"] = result.ok
            console.print(f"$ fedpod audit verify --config {charlie}\n"
                          f"{'[green]audit log intact[/green]' if result.ok else '[red]TAMPERED[/red]'}: "
                          f"{result.entries} entries, {result.checkpoints} signed checkpoint(s)", highlight=False)

            console.rule("alice's page")
            page = _page_address(alice)
            facts["page"] = page["url"]
            console.print(f"open {page['url']} and log in with the token {page['token']}", highlight=False,
                          soft_wrap=True)
            if keep_open:
                console.print("the federation stays up until Ctrl-C")
                try:
                    while all(p.poll() is None for p in processes):
                        time.sleep(0.5)
                except KeyboardInterrupt:
                    pass
    facts["seconds"] = round(time.perf_counter() - started, 2)
    (out / "governance.json").write_text(json.dumps(facts, indent=2))
    return facts
