"""End-to-end: the `fedpod` command as a user types it, with pods as separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from tests.conftest import wait_until

pytestmark = pytest.mark.e2e
FEDPOD = str(Path(sys.executable).parent / "fedpod")
PODS = ["alice", "bob", "charlie"]
DATASET = "ehr-records-2025"

EXAMPLES = Path(__file__).parents[2] / "examples"



class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "FEDPOD_HOME": str(home / ".fedpod"), "COLUMNS": "200", "NO_COLOR": "1"}

    def __call__(self, *args: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([FEDPOD, *args], cwd=self.home, env=self.env, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if ok and result.returncode != 0:
            raise AssertionError(f"fedpod {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def start(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([FEDPOD, *args], cwd=self.home, env=self.env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("user")


@pytest.fixture(scope="module")
def cli(home: Path) -> Cli:
    return Cli(home)


@pytest.fixture(scope="module")
def federation(cli: Cli, home: Path) -> Iterator[str]:
    """A broker and three pods, set up with the CLI alone; yields the broker URL."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        broker_log = home / "broker.log"
        processes.append(cli.start("broker", "start", log=broker_log))
        wait_until(lambda: "nats://" in broker_log.read_text(), 20, "broker URL")
        url = next(w for w in broker_log.read_text().split() if w.startswith("nats://"))
        cli("identity", "create", "modeller")
        cli("broker", "allow", "--role", "modeller", ".fedpod/keys/modeller.pub")
        cli("data", "synth", "--centres", "3", "--patients", "900", "--seed", "1", "--out", "data")
        for name in PODS:
            configure_pod(cli, url, name, f"data/{name}/patients.csv", "ehr,synthetic")
        processes.extend(start_pods(cli, home, PODS))
        yield url
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGINT)
        for process in processes:
            process.wait(timeout=20)


def configure_pod(cli: Cli, url: str, name: str, csv: str, tags: str) -> None:
    """A pod set up with the CLI alone, as its custodian would: serving `csv` as DATASET."""
    config = f"pods/{name}/pod.yaml"
    cli("pod", "init", "--name", name, "--config", config, "--broker", url)
    cli("broker", "allow", "--role", "pod", f"pods/{name}/keys/{name}.pub")
    cli("dataset", "add", "--config", config, "--name", DATASET, "--type", "csv", "--path", csv, "--tags", tags)
    cli("pod", "allow", "--config", config, "--name", "modeller",
        "--fingerprint", cli("identity", "show", "modeller").stdout.strip())


def start_pods(cli: Cli, home: Path, names: list[str]) -> list[subprocess.Popen[bytes]]:
    processes = [cli.start("pod", "start", "--config", f"pods/{name}/pod.yaml", log=home / f"{name}.log")
                 for name in names]
    for name in names:
        wait_until(lambda name=name: "ready" in (home / f"{name}.log").read_text(), 60, f"{name} ready")
    return processes


def test_a_stopped_pod_is_named_never_silently_left_out_of_an_aggregate(cli: Cli, federation: str,
                                                                         home: Path) -> None:
    """Issue 7, item 1: with one of the pods a tag matched stopped, the aggregate used to cover
    the others and say "aggregated over all datasets", exit 0."""
    for name in ("erin", "fay"):
        configure_pod(cli, federation, name, "data/alice/patients.csv", "trial")
    erin, fay = start_pods(cli, home, ["erin", "fay"])
    query = f"SELECT COUNT(*) AS n FROM `{DATASET}`"
    try:
        both = cli("sql", query, "--tags", "trial", "--aggregate", "--broker", federation, "--out", "trial")
        assert f"aggregated over 2 dataset(s): erin/{DATASET}, fay/{DATASET}" in " ".join(both.stdout.split())
        fay.send_signal(signal.SIGINT)
        fay.wait(timeout=20)
        failed = cli("sql", query, "--tags", "trial", "--aggregate", "--broker", federation, "--out", "trial",
                     ok=False)
        said = " ".join(failed.stderr.split())
        assert failed.returncode == 1 and f"fay/{DATASET}" in said and "pod 'fay' did not answer discovery" in said
        partial = cli("sql", query, "--tags", "trial", "--aggregate", "--broker", federation, "--out", "trial",
                      "--min-datasets", "1")
        shown = " ".join((partial.stdout + partial.stderr).split())
        assert f"aggregated over 1 dataset(s): erin/{DATASET}" in shown
        assert f"missing: fay/{DATASET} — " in shown and "did not answer discovery" in shown
        # item 10: the second answer did not overwrite the first; each has its query and coverage beside it
        first, second = (json.loads((home / "trial" / name).read_text()) for name in ("aggregate.json",
                                                                                       "aggregate-2.json"))
        assert first["query"] == second["query"] == query and first["missing"] == {}
        assert second["datasets"] == [f"erin/{DATASET}"] and list(second["missing"]) == [f"fay/{DATASET}"]
        assert (home / "trial" / "aggregate.csv").exists() and (home / "trial" / "aggregate-2.csv").exists()
    finally:
        for process in (erin, fay):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=20)


def test_the_python_example_finds_the_broker_as_the_cli_does(cli: Cli, federation: str, home: Path) -> None:
    """Issue 7, item 2: examples/python_api.py runs unedited against a broker on a random port,
    given FEDPOD_BROKER as the CLI is; without it, the error names the Python argument too."""
    run = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py")], cwd=home, capture_output=True, text=True,
                         env={**cli.env, "FEDPOD_BROKER": federation}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "aggregated over alice/ehr-records-2025, bob/ehr-records-2025, charlie/ehr-records-2025" in run.stdout
    lost = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py")], cwd=home, capture_output=True,
                          text=True, env={**cli.env, "FEDPOD_BROKER": "nats://127.0.0.1:9"}, timeout=120)
    assert lost.returncode != 0 and "broker=URL in Python" in lost.stderr and "FEDPOD_BROKER" in lost.stderr


def test_custodian_commands_and_a_revocation_that_applies_without_a_restart(cli: Cli, federation: str,
                                                                            home: Path) -> None:
    """Issue 7, item 8 and issue 8: identity list, dataset list/remove, pod status/revoke, access requests
    approved from the CLI, live policy edits, known-pods forget."""
    fingerprint = cli("identity", "show", "modeller").stdout.strip()
    assert f"modeller  {fingerprint}" in cli("identity", "list").stdout
    configure_pod(cli, federation, "gus", "data/bob/patients.csv", "gus-only")
    config = "pods/gus/pod.yaml"
    assert "not running" in cli("pod", "status", "--config", config).stdout
    (gus,) = start_pods(cli, home, ["gus"])
    query = ["sql", f"SELECT COUNT(*) AS n FROM `{DATASET}`", "--datasets", f"gus/{DATASET}", "--broker", federation]
    try:
        cli(*query)
        status = " ".join(cli("pod", "status", "--config", config).stdout.split())
        assert "running, pid" in status and f"knows modeller ({fingerprint})" in status
        assert "tasks served 1" in status and f"dataset {DATASET}:" in status
        assert DATASET in cli("dataset", "list", "--config", config).stdout
        revoked = " ".join(cli("pod", "revoke", "modeller", "--config", config).stdout.split())
        assert "no longer accepts modeller" in revoked and "applies it to its next task, without a restart" in revoked
        refused = " ".join(cli(*query, ok=False).stderr.split())  # the very next task
        assert "unknown to pod gus [rule: modeller]" in refused and "access request 1 is pending at pod gus" in refused
        listed = " ".join(cli("access", "list", "--config", config).stdout.split())
        assert "pending" in listed and fingerprint in listed and "sql_aggregate" in listed
        mine = " ".join(cli("access", "status", "--broker", federation).stdout.split())
        assert "gus" in mine and "pending" in mine
        approved = " ".join(cli("access", "approve", "1", "--config", config).stdout.split())
        assert f"granted sql_aggregate on {DATASET} to modeller ({fingerprint})" in approved
        cli(*query)  # the next task succeeds: no restart, no wait
        assert "access approve" not in cli("access", "list", "--config", config).stdout
        changed = " ".join(cli("policy", "set", DATASET, "min_group_size", "100000", "--config", config).stdout.split())
        assert "min_group_size: 3 -> 100000" in changed
        suppressed = cli(*query)
        assert "suppressed 1 group(s) of fewer than 100000 rows" in " ".join(suppressed.stderr.split())
        assert "min_group_size: 100000" in cli("policy", "show", "--config", config).stdout
        invalid = cli("policy", "set", DATASET, "min_group_size", "0", "--config", config, ok=False)
        assert invalid.returncode == 1 and "min_group_size" in invalid.stderr
        unknown = cli("access", "approve", "99", "--config", config, ok=False)
        assert unknown.returncode == 1 and "no access request 99" in unknown.stderr
        cli.env["EDITOR"] = "sed -i s/min_group_size:.100000/min_group_size:\\x204/"  # `policy edit`, scripted
        try:
            assert "policy saved" in cli("policy", "edit", "--config", config).stdout
            assert "min_group_size: 4" in cli("policy", "show", "--config", config).stdout
            cli.env["EDITOR"] = "sed -i s/min_group_size:.4/min_group_size:\\x20-4/"
            refused = cli("policy", "edit", "--config", config, ok=False)
            assert refused.returncode == 1 and "min_group_size" in refused.stderr
            assert "min_group_size: 4" in cli("policy", "show", "--config", config).stdout  # untouched
        finally:
            del cli.env["EDITOR"]
        denials = cli("audit", "show", "--config", config, "--decision", "deny").stdout
        assert "task-received" in denials and "deny" in denials
        assert "policy-changed" in cli("audit", "show", "--config", config).stdout
        assert "audit log intact" in cli("audit", "verify", "--config", config).stdout
        added = " ".join(cli("dataset", "add", "--config", config, "--name", "more", "--type", "csv",
                             "--path", "data/alice/patients.csv").stdout.split())
        assert "serves it after a restart" in added
        removed = " ".join(cli("dataset", "remove", "more", "--config", config).stdout.split())
        assert "removed gus/more" in removed and "after a restart" in removed
    finally:
        gus.send_signal(signal.SIGINT)
        gus.wait(timeout=20)
    assert "not running" in cli("pod", "status", "--config", config).stdout
    assert "removed gus" in cli("known-pods", "forget", "gus").stdout


def test_a_party_the_broker_was_not_told_about_cannot_connect(cli: Cli, federation: str) -> None:
    cli("identity", "create", "stranger")
    refused = cli("datasets", "list", "--broker", federation, "--identity", "stranger", ok=False)
    assert refused.returncode == 1
    said = " ".join(refused.stderr.split())
    assert "refused stranger" in said and "Authorization Violation" in said and "fedpod broker allow" in said


def test_bitfount_example_runs_unchanged(cli: Cli, federation: str, home: Path) -> None:
    listing = cli("datasets", "list", "--broker", federation).stdout
    for name in PODS:
        assert f"{name}/{DATASET}" in listing
    cli("run", str(EXAMPLES / "bitfount-sql.yaml"), "--broker", federation, "--out", "results")
    for name in PODS:
        frame = pd.read_csv(home / "results" / f"{name}__{DATASET}.csv")
        assert len(frame) == 10
        assert set(frame["centre"]) == {name}


def test_aggregated_task_file_gives_the_pooled_answer(cli: Cli, federation: str, home: Path) -> None:
    task = EXAMPLES / "aggregate-sql.yaml"
    cli("run", str(task), "--broker", federation, "--out", "agg")
    merged = pd.read_csv(home / "agg" / "aggregate.csv")
    query = yaml.safe_load(task.read_text())["task"]["algorithm"]["arguments"]["query"]
    files = [str(home / "data" / name / "patients.csv") for name in PODS]
    connection = duckdb.connect()
    connection.execute(f'CREATE TABLE "{DATASET}" AS SELECT * FROM read_csv(?)', [files])
    pooled = connection.sql(query.replace("`", '"')).df()
    pd.testing.assert_frame_equal(merged, pooled, check_dtype=False)


def test_bitfount_training_task_file_trains_over_the_pods(cli: Cli, federation: str, home: Path) -> None:
    result = cli("run", str(EXAMPLES / "bitfount-training.yaml"), "--broker", federation, "--out", "training",
                 timeout=300)
    assert "for 5 rounds" in result.stdout
    metrics = pd.read_csv(home / "training" / "Experiment_0001" / "metrics.csv")
    assert sorted(metrics["round"].unique()) == [0, 1, 2, 3, 4] and set(metrics["pod"]) == set(PODS)
    assert (metrics["steps"] == 20).all()
    assert (home / "training" / "Experiment_0001" / "model.safetensors").exists()


def test_audit_log_verifies_and_detects_tampering(cli: Cli, federation: str, home: Path) -> None:
    cli("sql", "SELECT COUNT(*) AS n FROM `ehr-records-2025`", "--datasets", f"alice/{DATASET}",
        "--broker", federation)
    assert "intact" in cli("audit", "verify", "--config", "pods/alice/pod.yaml").stdout
    shown = " ".join(cli("audit", "show", "--config", "pods/alice/pod.yaml", "--modeller", "modeller",
                         "--since", "1h").stdout.split())
    assert "task-received" in shown and "task-completed" in shown and DATASET in shown
    cli("audit", "export", "--config", "pods/alice/pod.yaml", "--csv", "audit.csv", "--decision", "allow")
    exported = pd.read_csv(home / "audit.csv")
    assert len(exported) >= 1 and set(exported["decision"]) == {"allow"} and set(exported["requester"]) == {"modeller"}
    audit = home / "pods" / "alice" / "storage" / "audit.jsonl"
    lines = audit.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["decision"] = "allow-everything"
    lines[1] = json.dumps(entry, sort_keys=True)
    audit.write_text("\n".join(lines) + "\n")
    result = cli("audit", "verify", "--config", "pods/alice/pod.yaml", ok=False)
    assert result.returncode == 1 and "TAMPERED" in result.stderr


def test_errors_are_one_clear_line_without_a_traceback(cli: Cli, federation: str) -> None:
    result = cli("sql", "SELECT COUNT(DISTINCT age) FROM `ehr-records-2025`", "--datasets", f"alice/{DATASET}",
                 "--aggregate", "--broker", federation, ok=False)
    assert result.returncode == 1 and "cannot merge `COUNT(DISTINCT age)`" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("sql", "SELECT 1", "--datasets", "zed/ehr", "--broker", federation, "--timeout", "1", ok=False)
    assert result.returncode == 1 and "pod 'zed' did not answer" in result.stderr


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error as the user sees it: exit 1, no traceback, no terminal escapes, one logical line."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "\x1b[" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    return " ".join(result.stderr.split())


def test_every_kind_of_error_is_a_clean_line(cli: Cli, federation: str, home: Path) -> None:
    """Issue 7, item 4: YAML text eaten as markup, pydantic's links, sqlglot's ANSI codes, and
    a custom plan's KeyError as a traceback."""
    broken = home / "broken.yaml"
    broken.write_text("pods:\n  tags: [ehr\ntask: {}\n")
    said = one_error_line(cli("run", str(broken), "--broker", federation, ok=False))
    assert "broken.yaml at line 3, column 5: while parsing a flow sequence (begun at line 2, column 9): " \
           "expected ',' or ']', but got ':'" in said
    config = home / "pods" / "alice" / "pod.yaml"
    bad_config = home / "bad-pod.yaml"
    bad_config.write_text(config.read_text().replace("heartbeat_s: 2.0", "heartbeat_s: often"))
    said = one_error_line(cli("audit", "verify", "--config", str(bad_config), ok=False))
    assert f"field heartbeat_s in {bad_config}:" in said and "errors.pydantic" not in said
    said = one_error_line(cli("sql", "SELECT (((", "--datasets", f"alice/{DATASET}", "--broker", federation,
                              ok=False))
    assert "does not parse" in said
    plan = home / "needs_features.py"
    plan.write_text("from fedpod.training import TorchTrainingPlan\n\n\nclass NeedsFeatures(TorchTrainingPlan):\n"
                    "    def init_model(self, model_args):\n        return model_args['features']\n")
    task = home / "custom.yaml"
    task.write_text((EXAMPLES / "bitfount-training.yaml").read_text().replace(
        "model_ref: logistic_regression", f"model_ref: {plan}:NeedsFeatures"))
    said = one_error_line(cli("run", str(task), "--broker", federation, ok=False))
    assert "training plan NeedsFeatures failed while being set up at the modeller: KeyError: 'features'" in said
    said = one_error_line(cli("pod", "allow", "--config", "pods/alice/pod.yaml", "--name", "bob",
                              "--fingerprint", "ABCD-EFGH", ok=False))  # item 5: validated, not stored
    assert "'ABCD-EFGH' is not a fingerprint" in said
    debug = cli("--debug", "run", str(task), "--broker", federation, ok=False)
    assert "Traceback" in debug.stderr and "KeyError: 'features'" in debug.stderr


def test_demo_runs_and_agrees_with_pooled_data(cli: Cli, home: Path) -> None:
    result = cli("demo", "--out", "demo", "--patients", "1500", timeout=300)
    assert "federated result equals the pooled result" in result.stdout
    summary = json.loads((home / "demo" / "results" / "summary.json").read_text())
    assert summary["federated_equals_pooled"] is True
    training = summary["training"]
    assert training["federated"]["auc"] >= 0.95 * training["centralised"]["auc"]
    assert (home / "demo" / "experiments" / "Experiment_0001" / "metrics.csv").exists()
    for name in PODS:
        assert (home / "demo" / "results" / f"{name}__{DATASET}.csv").exists()


def test_the_governance_demo_shows_what_custodians_control(cli: Cli, home: Path) -> None:
    said = " ".join(cli("demo", "--governance", "--out", "governance", timeout=300).stdout.split())
    assert "unknown to pod charlie [rule: modeller]" in said and "access request 1 is pending at pod charlie" in said
    assert "fedpod access approve 1 --kinds sql_aggregate" in said
    assert "[rule: grants]" in said and "suppressed" in said and "audit log intact" in said
    facts = json.loads((home / "governance" / "governance.json").read_text())
    assert facts["refused_rule"] == "modeller" and facts["approved_then_answered"] is True
    assert facts["rows_refused_rule"] == "grants" and facts["audit_verified"] is True
    assert sum(facts["suppressed_groups"].values()) > 0
    assert facts["page"].startswith("http://127.0.0.1:") and f"open {facts['page']} and log in with the token" in said


def test_names_are_never_paths(cli: Cli, home: Path) -> None:
    """Finding 10 of the hardening issue: `identity create "../../escaped"` wrote a key outside
    the keystore, and `pod init --name ../../x` one outside the pod folder."""
    before = set(home.rglob("*"))
    attempts = (("identity", "create", "../../escaped"), ("pod", "init", "--name", "../../x", "--config", "p/pod.yaml"))
    for args in attempts:
        refused = cli(*args, ok=False)
        assert refused.returncode == 1 and "is not allowed" in " ".join(refused.stderr.split())
    assert set(home.rglob("*")) == before
    assert not list(home.parent.glob("**/escaped.key")) and not list(home.parent.glob("**/x.key"))


def test_the_cli_shows_at_most_50_rows_and_keeps_them_all_in_the_file(cli: Cli, federation: str, home: Path) -> None:
    """Finding 12: a row query drew every row in the terminal (10 minutes and 3.5 GB for 1M rows)."""
    shown = cli("sql", f"SELECT * FROM `{DATASET}` LIMIT 80", "--datasets", f"alice/{DATASET}", "--broker", federation,
                "--out", "rows").stdout
    assert "showing 50 of 80 rows" in shown
    assert len(pd.read_csv(home / "rows" / f"alice__{DATASET}.csv")) == 80


def test_a_cluster_and_a_site_behind_its_leaf_node_set_up_with_the_cli_alone(tmp_path: Path) -> None:
    """The README's deployment: `broker start --cluster 3 --leafnodes`, the site's pod let in as
    a site, `broker leaf` at the site, the pod pointed at it, and a query through the cluster."""
    import socket

    cli = Cli(tmp_path)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        cluster_log = tmp_path / "cluster.log"
        processes.append(cli.start("broker", "start", "--cluster", "3", "--leafnodes", "--folder", "cluster",
                                   log=cluster_log))
        wait_until(lambda: "export FEDPOD_BROKER" in cluster_log.read_text(), 60, "the cluster")
        words = cluster_log.read_text().split()
        url = next(w for w in words if w.startswith("nats://"))
        hub = next(w for w in words if w.startswith("nats-leaf://"))
        assert url.count(",") == 2 and hub.count(",") == 2  # every member's client and leaf-node URL
        cli("identity", "create", "modeller")
        cli("broker", "allow", "--folder", "cluster", "--role", "modeller", ".fedpod/keys/modeller.pub")
        cli("data", "synth", "--centres", "1", "--patients", "300", "--seed", "4", "--out", "data")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            leaf_port = probe.getsockname()[1]
        config = "site/pod.yaml"
        cli("pod", "init", "--name", "alice", "--config", config, "--broker", f"nats://127.0.0.1:{leaf_port}")
        cli("broker", "allow", "--folder", "cluster", "--role", "site", "site/keys/alice.pub")
        cli("dataset", "add", "--config", config, "--name", DATASET, "--type", "csv", "--path",
            "data/alice/patients.csv")
        cli("pod", "allow", "--config", config, "--name", "modeller",
            "--fingerprint", cli("identity", "show", "modeller").stdout.strip())
        leaf_log = tmp_path / "leaf.log"
        processes.append(cli.start("broker", "leaf", "--hub", hub, "--config", config, "--port", str(leaf_port),
                                   log=leaf_log))
        wait_until(lambda: f"nats://127.0.0.1:{leaf_port}" in leaf_log.read_text(), 30, "the site's leaf node")
        pod_log = tmp_path / "alice.log"
        processes.append(cli.start("pod", "start", "--config", config, log=pod_log))
        wait_until(lambda: "ready" in pod_log.read_text(), 60, "the site's pod")
        answer = cli("sql", f"SELECT COUNT(*) AS n FROM `{DATASET}`", "--datasets", f"alice/{DATASET}",
                     "--aggregate", "--broker", url, "--out", "site-result")
        assert "300" in answer.stdout
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGINT)
        for process in processes:
            process.wait(timeout=20)
