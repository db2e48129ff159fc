"""Finding 5 of the hardening issue: deleting the newest audit entries, emptying the file or
deleting it all verified as "intact", and so did an edited log whose chain was recomputed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedpod.governance.audit import _entry_hash, checkpoints_path
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, three_rows

pytestmark = pytest.mark.integration


def verify(config: Path, *witness: Path) -> subprocess.CompletedProcess[str]:
    options = [arg for file in witness for arg in ("--witness", str(file))]
    return subprocess.run([sys.executable, "-m", "fedpod.cli", "audit", "verify", "--config", str(config),
                           *options], capture_output=True, text=True, env={"COLUMNS": "300", "PATH": ""}, timeout=60)


def said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def test_truncation_emptying_deletion_and_a_recomputed_chain_are_all_detected(
        pod_factory: PodFactory, broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path,
        tmp_path: Path) -> None:
    pod = pod_factory("alice", [three_rows(tmp_path)], [modeller_identity])
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=20) as modeller:
        for _ in range(3):
            modeller.sql("SELECT SUM(a) AS s FROM t", datasets=["alice/t"])
    pod.stop()
    witness = next((keystore.parent / "witness").glob("alice-*.jsonl"))  # what the modeller kept
    log, saved = pod.audit_path, tmp_path / "audit.saved"
    shutil.copy(log, saved)
    assert "intact" in said(verify(pod.config_path, witness))

    lines = saved.read_text().splitlines()
    log.write_text("\n".join(lines[:-2]) + "\n")
    truncated = verify(pod.config_path)
    assert truncated.returncode == 1 and f"truncated to {len(lines) - 2} entries" in said(truncated)
    log.write_text("")
    assert "log empty" in said(verify(pod.config_path))
    log.unlink()
    assert "log missing" in said(verify(pod.config_path))

    # root on the pod: edit an entry, recompute every hash, remove the pod's own checkpoints
    entries = [json.loads(line) for line in lines]
    completed = next(e for e in entries if e["event"] == "task-completed")
    completed["returned_rows"] = 0
    previous = "0" * 64
    for entry in entries:
        entry["prev"] = previous
        entry["hash"] = previous = _entry_hash(entry)
    log.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    checkpoints_path(log).unlink()
    unanchored = verify(pod.config_path)
    assert unanchored.returncode == 0 and "no checkpoint" in said(unanchored)  # the chain alone is fooled
    caught = verify(pod.config_path, witness)
    assert caught.returncode == 1 and "rewritten" in said(caught)
