"""Choosing datasets from pods' adverts, the two ways the peers do it.

- By identifier (`owner/name`, Bitfount's `pods.identifiers`): each must be advertised.
- By tags (Fed-BioMed): a dataset matches when it carries *every* requested tag; one pod
  offering two matching datasets is an error, because a task takes one dataset per pod.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpod.errors import AccessDenied, AmbiguousDatasets, DatasetNotFound, FedpodError, MissingDatasets
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


class Targets(list[Target]):
    """The datasets a task goes to, and `missing`: those it asked for that will not take part,
    each with the error saying why. A task fails naming every missing dataset unless its caller
    accepted a quorum (`require`); with one, the result carries the list."""

    def __init__(self, targets: list[Target] | None = None, missing: dict[str, FedpodError] | None = None) -> None:
        super().__init__(targets or [])
        self.missing: dict[str, FedpodError] = dict(missing or {})

    def reasons(self) -> dict[str, str]:
        return {identifier: str(error) for identifier, error in sorted(self.missing.items())}


def _refused(owner: str, notice: str) -> AccessDenied:
    return AccessDenied(notice, where=f"pod {owner}", rule="modellers",
                        hint=f"send the custodian of pod {owner} your fingerprint, compared out of band")


def select_by_identifiers(adverts: dict[str, tuple[PublicIdentity, PodAdvert]], identifiers: list[str]) -> Targets:
    selected = Targets()
    answered = ", ".join(sorted(adverts)) or "none"
    for identifier in identifiers:
        owner, _, name = identifier.partition("/")
        if not owner or not name:
            raise DatasetNotFound(f"{identifier!r} is not an identifier of the form owner/name")
        if owner not in adverts:
            selected.missing[identifier] = DatasetNotFound(
                f"pod {owner!r} did not answer discovery (pods that answered: {answered})", where=identifier,
                hint=f"is pod {owner} running on this broker?")
            continue
        pod, advert = adverts[owner]
        if advert.notice:
            # The pod does not know this modeller: the task still goes (without a schema), so
            # that the pod opens an access request and its refusal names it.
            selected.append(Target(pod, DatasetAdvert(identifier=identifier, name=name)))
            continue
        dataset = next((d for d in advert.datasets if d.name == name), None)
        if dataset is None:
            offered = ", ".join(d.name for d in advert.datasets) or "none"
            selected.missing[identifier] = DatasetNotFound(f"pod {owner!r} has no dataset {name!r} (it offers: "
                                                           f"{offered})", where=identifier)
            continue
        selected.append(Target(pod, dataset))
    return selected


def select_by_tags(adverts: dict[str, tuple[PublicIdentity, PodAdvert]], tags: list[str],
                   expected: list[str] | None = None) -> Targets:
    """Datasets carrying every tag. `expected`: identifiers known to carry them (remembered from
    earlier discoveries); one whose pod did not answer, or now refuses, is missing."""
    wanted = set(tags)
    selected = Targets()
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
        selected.extend(Target(pod, d) for d in matching)
    for identifier in expected or []:
        owner = identifier.partition("/")[0]
        if owner not in adverts:
            selected.missing[identifier] = DatasetNotFound(
                f"pod {owner!r} did not answer discovery (it offered this dataset before)", where=identifier,
                hint=f"is pod {owner} running on this broker?")
        elif adverts[owner][1].notice:
            selected.missing[identifier] = _refused(owner, adverts[owner][1].notice or "")
    if not selected and not selected.missing:
        refused = f" ({len(refusing)} pod(s) do not accept this modeller: {', '.join(refusing)})" if refusing else ""
        raise DatasetNotFound(f"no dataset carries all of the tags {sorted(wanted)}{refused}",
                              hint="`fedpod datasets list` shows what pods advertise")
    return selected


def require(targets: Targets, min_datasets: int | None) -> Targets:
    """Go on only if nothing asked for is missing — or, with a quorum, if at least `min_datasets`
    datasets take part. Otherwise raise: the one error if a single dataset is missing, an
    AccessDenied naming every pod if all of them refused, else MissingDatasets naming each one."""
    enough = not targets.missing if min_datasets is None else len(targets) >= min_datasets
    if enough and targets:
        return targets
    errors = list(targets.missing.values())
    if min_datasets is None and len(errors) == 1:
        raise errors[0]
    reasons = targets.reasons()
    if min_datasets is None and all(isinstance(e, AccessDenied) for e in errors):
        rules = {e.rule for e in errors if isinstance(e, AccessDenied)}
        rule = rules.pop() if len(rules) == 1 else None  # one rule refused them all: name it, and its remedy
        hint = "send each custodian your fingerprint, compared out of band" if rule == "modellers" else \
            errors[0].hint if rule is not None else "each refusal above names its rule"
        raise AccessDenied(f"{len(errors)} datasets refused this modeller — " + "; ".join(
            f"{identifier}: {why}" for identifier, why in reasons.items()), rule=rule, hint=hint)
    needed = "all of them" if min_datasets is None else f"at least {min_datasets}"
    raise MissingDatasets(reasons, len(targets), needed)
