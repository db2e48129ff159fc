from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpod.errors import AccessDenied, AmbiguousDatasets, DatasetNotFound, MissingDatasets
from fedpod.modeller.discovery import Targets, require, select_by_identifiers, select_by_tags
from fedpod.modeller.known_pods import KnownPods
from fedpod.security.identity import Identity
from fedpod.wire.messages import DatasetAdvert, PodAdvert


def advert(pod: str, *datasets: tuple[str, list[str]], notice: str | None = None) -> tuple[str, tuple]:  # type: ignore[type-arg]
    identity = Identity.generate(pod).public
    return pod, (identity, PodAdvert(pod=pod, fingerprint=identity.fingerprint, version="0", notice=notice, datasets=[
        DatasetAdvert(identifier=f"{pod}/{name}", name=name, tags=tags, kind="csv", columns={"a": "INTEGER"},
                      rows_rounded=100) for name, tags in datasets]))


ADVERTS = dict([advert("alice", ("ehr", ["ehr", "covid"]), ("labs", ["labs"])),
                advert("bob", ("ehr", ["ehr"])),
                advert("carol", ("ehr", ["ehr", "covid"]), ("ehr-2", ["ehr", "covid", "2024"]))])


def test_every_tag_must_match() -> None:
    found = select_by_tags({k: ADVERTS[k] for k in ("alice", "bob")}, ["ehr", "covid"])
    assert [t.identifier for t in found] == ["alice/ehr"]


def test_two_matching_datasets_on_one_pod_is_an_error_naming_them() -> None:
    with pytest.raises(AmbiguousDatasets, match="carol/ehr, carol/ehr-2"):
        select_by_tags(ADVERTS, ["ehr", "covid"])


def test_no_match_is_a_clear_error() -> None:
    with pytest.raises(DatasetNotFound, match="oncology"):
        select_by_tags(ADVERTS, ["oncology"])


def test_identifiers_select_exact_datasets() -> None:
    found = select_by_identifiers(ADVERTS, ["bob/ehr", "carol/ehr-2"])
    assert [t.identifier for t in found] == ["bob/ehr", "carol/ehr-2"]


def test_every_missing_identifier_is_named_with_its_reason() -> None:
    found = select_by_identifiers(ADVERTS, ["bob/ehr", "dave/ehr", "bob/x"])
    assert [t.identifier for t in found] == ["bob/ehr"]
    assert set(found.missing) == {"dave/ehr", "bob/x"}
    reasons = found.reasons()
    assert "pod 'dave' did not answer discovery" in reasons["dave/ehr"]
    assert "no dataset 'x'" in reasons["bob/x"] and "offers: ehr" in reasons["bob/x"]
    with pytest.raises(MissingDatasets) as info:
        require(found, None)
    said = str(info.value)
    assert all(name in said for name in ("dave/ehr", "bob/x")) and "--min-datasets" in said


def test_a_pod_that_does_not_know_the_modeller_still_gets_the_task_so_that_it_can_open_a_request() -> None:
    refusing = advert("erin", notice="modeller 'm' (FP) is not in pod erin's accepted modellers")
    found = select_by_identifiers({**ADVERTS, "erin": refusing[1]}, ["bob/ehr", "erin/ehr"])
    assert [t.identifier for t in found] == ["bob/ehr", "erin/ehr"] and not found.missing
    assert found[1].dataset.columns == {}  # no schema for a modeller the pod does not know


def test_a_quorum_lets_a_task_go_on_with_the_missing_datasets_named() -> None:
    found = select_by_identifiers(ADVERTS, ["bob/ehr", "dave/ehr"])
    assert require(found, 1) is found  # a quorum of one: the missing ones travel with the targets
    with pytest.raises(MissingDatasets, match="at least 2 needed"):
        require(found, 2)
    with pytest.raises(DatasetNotFound, match="pod 'dave' did not answer"):  # one missing: its own error
        require(select_by_identifiers(ADVERTS, ["bob/ehr", "dave/ehr"]), None)
    both_refuse = Targets(missing={"erin/ehr": AccessDenied("unknown to pod erin"),
                                   "fay/ehr": AccessDenied("unknown to pod fay")})
    with pytest.raises(AccessDenied, match=r"2 datasets refused this modeller.*erin/ehr.*fay/ehr"):
        require(both_refuse, None)


def test_a_remembered_dataset_whose_pod_is_silent_is_missing_from_a_tag_selection() -> None:
    found = select_by_tags({k: ADVERTS[k] for k in ("alice", "bob")}, ["ehr"], expected=["bob/ehr", "zed/ehr"])
    assert [t.identifier for t in found] == ["alice/ehr", "bob/ehr"]
    assert list(found.missing) == ["zed/ehr"] and "did not answer" in found.reasons()["zed/ehr"]
    silent = select_by_tags({}, ["ehr"], expected=["zed/ehr"])
    assert not silent and list(silent.missing) == ["zed/ehr"]


def test_known_pods_remember_what_a_pinned_pod_offered(tmp_path: Path) -> None:
    path = tmp_path / "known_pods.json"
    path.write_text(json.dumps({"alice": "AAAA-AAAA-AAAA-AAAA"}))  # the older format: pins only
    pods = KnownPods(path)
    assert pods.pinned("alice") == "AAAA-AAAA-AAAA-AAAA" and pods.expected(["ehr"]) == []
    pods.remember("alice", "AAAA-AAAA-AAAA-AAAA", {"ehr": ["ehr", "covid"], "labs": ["labs"]})
    pods.remember("alice", "EVIL-EVIL-EVIL-EVIL", {"fake": ["ehr"]})  # not the pinned key: ignored
    pods.remember("bob", "BBBB-BBBB-BBBB-BBBB", {"ehr": ["ehr"]})  # not pinned: nothing to remember
    again = KnownPods(path)
    assert again.expected(["ehr"]) == ["alice/ehr"] and again.expected(["labs"]) == ["alice/labs"]
    assert again.all() == {"alice": "AAAA-AAAA-AAAA-AAAA"}
