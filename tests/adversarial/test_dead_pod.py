"""Finding 8 of the hardening issue: the modeller ignored heartbeats, so a pod killed mid-task
cost the whole timeout (61 s for SQL, 600 s for a training round), and a pod killed after
acknowledging a task left no `task-received` entry in its audit log."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.errors import PodLost
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory

pytestmark = pytest.mark.integration
SLOW = ("SELECT COUNT(*) AS n FROM t x, t y WHERE x.a < 3000 "
        "AND md5(CAST(x.a * y.a AS VARCHAR)) LIKE 'abc%'")  # about a minute of work for the pod


def test_a_pod_killed_mid_task_is_declared_lost_within_seconds_and_its_log_kept_the_task(
        pod_factory: PodFactory, broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path,
        table_csv: Path) -> None:
    pod = pod_factory("alice", [DatasetSpec(name="t", type="csv", path=str(table_csv))], [modeller_identity],
                      sql_timeout_s=300)
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=120) as modeller:
        modeller.sql("SELECT COUNT(*) AS n FROM t", datasets=["alice/t"])
        killer = threading.Timer(1.5, pod.process.send_signal, args=(signal.SIGKILL,))
        killer.start()
        started = time.monotonic()
        with pytest.raises(PodLost, match="pod alice stopped sending heartbeats"):
            modeller.sql(SLOW, datasets=["alice/t"])
        elapsed = time.monotonic() - started
        killer.join()
    assert elapsed < 15, f"declared lost after {elapsed:.1f}s"
    entries = [json.loads(line) for line in pod.audit_path.read_text().splitlines()]
    assert any(e["event"] == "task-received" and e.get("query") == SLOW for e in entries)
