from __future__ import annotations

import pytest

from fedpod.errors import AmbiguousDatasets, DatasetNotFound
from fedpod.modeller.discovery import select_by_identifiers, select_by_tags
from fedpod.security.identity import Identity
from fedpod.wire.messages import DatasetAdvert, PodAdvert


def advert(pod: str, *datasets: tuple[str, list[str]]) -> tuple[str, tuple]:  # type: ignore[type-arg]
    identity = Identity.generate(pod).public
    return pod, (identity, PodAdvert(pod=pod, fingerprint=identity.fingerprint, version="0", datasets=[
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


def test_unknown_pod_and_unknown_dataset_are_named() -> None:
    with pytest.raises(DatasetNotFound, match="pod 'dave' did not answer"):
        select_by_identifiers(ADVERTS, ["dave/ehr"])
    with pytest.raises(DatasetNotFound, match=r"no dataset 'x'.*offers: ehr"):
        select_by_identifiers(ADVERTS, ["bob/x"])
