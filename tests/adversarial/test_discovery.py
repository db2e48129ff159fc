"""Findings 6 and 7 of the hardening issue: pins as a weapon, and discovery telling strangers
everything. The attackers are parties on the broker: an impostor pod answering discovery under
another pod's name, and a modeller no pod accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.errors import TrustError
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from fedpod.wire.messages import DatasetAdvert, PodAdvert
from tests.adversarial.conftest import rogue_party, rogue_pod
from tests.conftest import PodFactory, RunningPod

pytestmark = pytest.mark.integration


@pytest.fixture
def two_pods(pod_factory: PodFactory, open_broker: EmbeddedBroker, modeller_identity: Identity,
             table_csv: Path) -> list[RunningPod]:
    spec = DatasetSpec(name="t", type="csv", path=str(table_csv), tags=["ehr"])
    return [pod_factory(name, [spec], [modeller_identity], on=open_broker) for name in ("alice", "bob")]


@pytest.fixture
def impostor(open_broker: EmbeddedBroker) -> Iterator[Identity]:
    """A fresh key calling itself "alice", answering every discovery request with an advert."""
    identity = Identity.generate("alice")

    advert = PodAdvert(pod="alice", fingerprint=identity.fingerprint, version="x", datasets=[
        DatasetAdvert(identifier="alice/t", name="t", tags=["ehr"], kind="csv", columns={"a": "BIGINT"})])
    with rogue_party(open_broker.url, identity, rogue_pod(identity, advert)):
        yield identity


def test_an_impostor_of_a_pinned_pod_is_ignored_and_reported_not_fatal(
        two_pods: list[RunningPod], exposed_modeller: Modeller, impostor: Identity) -> None:
    alice, _ = two_pods
    exposed_modeller._core.known_pods.pin("alice", alice.identity.fingerprint)
    bob_only = exposed_modeller.sql("SELECT COUNT(*) AS n FROM t", datasets=["bob/t"])  # unrelated to alice
    assert isinstance(bob_only, dict) and int(bob_only["bob/t"]["n"][0]) == 200_000
    both = exposed_modeller.sql("SELECT COUNT(*) AS n FROM t", tags=["ehr"])  # alice's genuine advert is used
    assert isinstance(both, dict) and set(both) == {"alice/t", "bob/t"}
    assert impostor.fingerprint in exposed_modeller.ignored_adverts["alice"]


def test_on_first_contact_a_contested_name_is_pinned_to_no_one(
        two_pods: list[RunningPod], exposed_modeller: Modeller, impostor: Identity) -> None:
    with pytest.raises(TrustError, match="claimed by 2 keys on first contact"):
        exposed_modeller.sql("SELECT COUNT(*) AS n FROM t", datasets=["alice/t"])
    assert exposed_modeller._core.known_pods.pinned("alice") is None
    assert exposed_modeller.sql("SELECT COUNT(*) AS n FROM t", datasets=["bob/t"])


def test_require_pinned_uses_only_pods_pinned_beforehand(
        two_pods: list[RunningPod], open_broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path,
        impostor: Identity) -> None:
    alice, _ = two_pods
    with Modeller(modeller_identity, broker=open_broker.url, keystore=keystore, timeout_s=20,
                  require_pinned=True) as careful:
        careful._core.known_pods.pin("alice", alice.identity.fingerprint)
        result = careful.sql("SELECT COUNT(*) AS n FROM t", tags=["ehr"])
        assert isinstance(result, dict) and set(result) == {"alice/t"}
        assert "not pinned" in careful.ignored_adverts["bob"]


@pytest.mark.parametrize("setting", ["accepted", "names"])
def test_discovery_tells_a_modeller_no_pod_accepts_nothing_it_may_not_know(
        pod_factory: PodFactory, broker: EmbeddedBroker, modeller_identity: Identity, table_csv: Path,
        tmp_path: Path, setting: str) -> None:
    pod_factory("alice", [DatasetSpec(name="t", type="csv", path=str(table_csv), tags=["ehr"])],
                [modeller_identity], discovery=setting)
    stranger = Identity.generate("stranger")
    broker.allow("modeller", stranger.public)
    with Modeller(stranger, broker=broker.url, keystore=tmp_path / "s" / "keys", timeout_s=10) as client:
        client.datasets(window_s=1.0)
        _, advert = client._core._adverts["alice"]
    assert advert.notice and "not in pod alice's accepted modellers" in advert.notice
    if setting == "accepted":
        assert advert.datasets == []
    else:
        assert [(d.identifier, d.tags, d.columns, d.rows_rounded) for d in advert.datasets] == [("alice/t", [], {}, 0)]
