"""A broker that restarts: pods reconnect by themselves and serve again, losing no audit entry."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.governance.audit import AuditLog
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import start_pod_process, wait_until

pytestmark = pytest.mark.integration


def test_pod_serves_again_after_the_broker_restarts(tmp_path: Path, modeller_identity: Identity,
                                                    keystore: Path) -> None:
    from fedpod.data.catalog import inspect
    from fedpod.pod.local import write_pod

    csv = tmp_path / "t.csv"
    pd.DataFrame({"a": [1, 2, 3, 4]}).to_csv(csv, index=False)
    first = EmbeddedBroker(folder=tmp_path / "broker").start()  # the parties it lets in outlive a restart
    port = first.port
    folder = tmp_path / "pod"
    folder.mkdir()
    config = write_pod(folder, "alice", first, [inspect(DatasetSpec(name="t", kind="csv", path=str(csv)), folder)],
                       [modeller_identity], heartbeat_s=0.2)
    process, log = start_pod_process(config)
    second: EmbeddedBroker | None = None
    try:
        with Modeller(modeller_identity, broker=first.url, keystore=keystore, timeout_s=10) as modeller:
            assert modeller.sql("SELECT SUM(a) AS s FROM t", datasets=["alice/t"])
        first.stop()
        second = EmbeddedBroker(port=port, folder=tmp_path / "broker").start()
        assert process.poll() is None

        def answers() -> bool:
            try:
                with Modeller(modeller_identity, broker=second.url, keystore=keystore, timeout_s=2) as modeller:
                    result = modeller.sql("SELECT SUM(a) AS s FROM t", datasets=["alice/t"])
                    return isinstance(result, dict) and int(result["alice/t"]["s"][0]) == 10
            except Exception:
                return False

        wait_until(answers, 30, "the pod to serve through the restarted broker")
    finally:
        process.terminate()
        process.wait(15)
        if second is not None:
            second.stop()
        first.stop()
    audit = folder / "storage" / "audit.jsonl"
    assert AuditLog.verify(audit).ok
    completed = [e for e in AuditLog(audit).entries() if e["event"] == "task-completed"]
    assert len(completed) >= 2
    assert log.exists()
