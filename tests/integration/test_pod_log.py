"""Issue 7, item 7: a pod that talks. Its console and `<storage>/pod.log` show one line per task
received (modeller, dataset, kind, decision) and one when it ends (duration, what left the pod);
refusals stand out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.errors import AccessDenied
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, wait_until

pytestmark = pytest.mark.integration


def test_the_pod_says_what_it_received_decided_and_returned(pod_factory: PodFactory, broker: EmbeddedBroker,
                                                             modeller_identity: Identity, keystore: Path,
                                                             tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}).to_csv(csv, index=False)
    pod = pod_factory("alice", [DatasetSpec(name="t", type="csv", path=str(csv))], [modeller_identity],
                      discovery="open")  # the stranger sees the dataset, so its task reaches the pod and is refused
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=20) as modeller:
        modeller.sql("SELECT a, b FROM t", datasets=["alice/t"])
    stranger = Identity.generate("stranger")
    broker.allow("modeller", stranger.public)
    with Modeller(stranger, broker=broker.url, keystore=tmp_path / "s", timeout_s=20) as client, \
            pytest.raises(AccessDenied):
        client.sql("SELECT a FROM t", datasets=["alice/t"])
    log = pod.config_path.parent / "storage" / "pod.log"
    who = f"modeller ({modeller_identity.fingerprint})"
    wait_until(lambda: log.exists() and "left the pod" in log.read_text(), 10, "the task's last line")
    text = log.read_text()
    assert "sql_rows task" in text and f"from {who} on t: allowed" in text
    assert "done in" in text and "3 row(s) of a, b left the pod" in text
    wait_until(lambda: "REFUSED" in pod.output(), 10, "the refusal on the console")
    refused = next(line for line in pod.output().splitlines() if "REFUSED" in line)
    assert "WARNING" in refused and f"stranger ({stranger.fingerprint})" in refused and "[rule: modeller]" in refused
    assert f"from {who} on t: allowed" in pod.output()
