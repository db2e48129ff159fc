"""Finding 9 of the hardening issue: a pod's update scaled by 1e30 was averaged in silently by
FedAvg (global max |w| 6e28, saved as a round). Here the poisoning pod is a process of the
attacker's own, a party the broker lets in, answering training tasks with the global model x 1e30."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedpod.channel import SecureChannel
from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment
from fedpod.security.envelope import Opened
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from fedpod.wire.codec import unpack
from fedpod.wire.messages import DatasetAdvert, PodAdvert, TrainRequest, TrainResult
from fedpod.wire.tensors import decode_groups, encode_parts
from tests.adversarial.conftest import rogue_party, rogue_pod
from tests.conftest import PodFactory, RunningPod

pytestmark = pytest.mark.integration
FEATURES = ["age", "bmi", "smoker"]


@pytest.fixture
def honest_pods(pod_factory: PodFactory, modeller_identity: Identity, tmp_path: Path) -> list[RunningPod]:
    files = [f / "patients.csv" for f in write(generate(2, 1200, seed=3), tmp_path / "data")]
    return [pod_factory(name, [DatasetSpec(name="ehr", kind="csv", path=str(csv), tags=["ehr"])], [modeller_identity])
            for name, csv in zip(["alice", "bob"], files, strict=True)]


@pytest.fixture
def poisoner(broker: EmbeddedBroker, honest_pods: list[RunningPod]) -> Iterator[Identity]:
    identity = Identity.generate("mallory")
    broker.allow("pod", identity.public)
    columns = {"age": "DOUBLE", "bmi": "DOUBLE", "smoker": "BIGINT", "outcome": "BIGINT"}

    advert = PodAdvert(pod="mallory", fingerprint=identity.fingerprint, version="evil", datasets=[
        DatasetAdvert(identifier="mallory/ehr", name="ehr", tags=["ehr"], kind="csv", columns=columns,
                      rows_rounded=1000)])

    async def on_task(channel: SecureChannel, opened: Opened) -> None:
        request = unpack(opened.payload, TrainRequest)
        poisoned = {k: v * np.float32(1e30) for k, v in decode_groups(request.tensors)["params"].items()}
        await channel.send(opened.sender, TrainResult(
            task_id=request.task_id, round=request.round, dataset="ehr", num_samples=1000, metrics={},
            seconds=0.1, device="cpu", tensors=encode_parts({"params": poisoned})), task_id=request.task_id)

    with rogue_party(broker.url, identity, rogue_pod(identity, advert, on_task), login=True):
        yield identity


def test_an_update_scaled_by_1e30_is_set_aside_and_named(
        honest_pods: list[RunningPod], poisoner: Identity, broker: EmbeddedBroker, modeller_identity: Identity,
        keystore: Path, tmp_path: Path) -> None:
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=60) as modeller:
        exp = Experiment(tags=["ehr"], training_plan_class="logistic_regression", min_pods=2, standardize=False,
                         model_args={"target": "outcome", "features": FEATURES},
                         training_args={"num_updates": 5, "random_seed": 1}, round_limit=2, modeller=modeller,
                         experiments_root=tmp_path / "experiments", console=Console(quiet=True))
        exp.run()
    replies = exp.training_replies()
    assert set(replies[0]) == {"alice", "bob", "mallory"}
    reason = replies[0]["mallory"]["error"]
    assert "update set aside" in reason and "x the round's median" in reason
    largest = max(float(np.max(np.abs(v))) for v in exp.aggregated_params()[1]["params"].values())
    assert largest < 100, f"the global model was poisoned: max |w| = {largest:.3g}"
