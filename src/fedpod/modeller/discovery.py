"""Choosing datasets from pods' adverts, the two ways the peers do it.

- By identifier (`owner/name`, Bitfount's `pods.identifiers`): each must be advertised.
- By tags (Fed-BioMed): a dataset matches when it carries *every* requested tag; one pod
  offering two matching datasets is an error, because a task takes one dataset per pod.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpod.errors import AccessDenied, AmbiguousDatasets, DatasetNotFound
from fedpod.security.identity import PublicIdentity
from fedpod.wire.messages import DatasetAdvert, PodAdvert


@dataclass(frozen=True)
class Target:
    """One dataset on one pod, with the pod's verified public identity."""

    pod: PublicIdentity
    dataset: DatasetAdvert

    @property
    def identifier(self) -> str:
        return self.dataset.identifier


def select_by_identifiers(adverts: dict[str, tuple[PublicIdentity, PodAdvert]], identifiers: list[str]) -> list[Target]:
    targets = []
    for identifier in identifiers:
        owner, _, name = identifier.partition("/")
        if not owner or not name:
            raise DatasetNotFound(f"{identifier!r} is not an identifier of the form owner/name")
        if owner not in adverts:
            answered = ", ".join(sorted(adverts)) or "none"
            raise DatasetNotFound(f"pod {owner!r} did not answer discovery (pods that answered: {answered})",
                                  where=identifier, hint=f"is pod {owner} running on this broker?")
        pod, advert = adverts[owner]
        if advert.notice:
            raise AccessDenied(advert.notice, where=f"pod {owner}", rule="modellers",
                               hint=f"send the custodian of pod {owner} your fingerprint, compared out of band")
        dataset = next((d for d in advert.datasets if d.name == name), None)
        if dataset is None:
            offered = ", ".join(d.name for d in advert.datasets) or "none"
            raise DatasetNotFound(f"pod {owner!r} has no dataset {name!r} (it offers: {offered})", where=identifier)
        targets.append(Target(pod, dataset))
    return targets


def select_by_tags(adverts: dict[str, tuple[PublicIdentity, PodAdvert]], tags: list[str]) -> list[Target]:
    wanted = set(tags)
    targets: list[Target] = []
    refusing = sorted(owner for owner, (_, advert) in adverts.items() if advert.notice)
    for owner in sorted(adverts):
        pod, advert = adverts[owner]
        if advert.notice:
            continue
        matching = [d for d in advert.datasets if wanted <= set(d.tags)]
        if len(matching) > 1:
            names = ", ".join(d.identifier for d in matching)
            raise AmbiguousDatasets(f"tags {sorted(wanted)} match {len(matching)} datasets on pod {owner}: {names}",
                                    where=f"pod {owner}", hint="add a tag that tells them apart")
        targets.extend(Target(pod, d) for d in matching)
    if not targets:
        refused = f" ({len(refusing)} pod(s) do not accept this modeller: {', '.join(refusing)})" if refusing else ""
        raise DatasetNotFound(f"no dataset carries all of the tags {sorted(wanted)}{refused}",
                              hint="`fedpod datasets list` shows what pods advertise")
    return targets
