"""The custodian's policy, and the one pure function that decides every task against it.

The `policies:` section of a pod config names who the pod knows and what each may do:

    policies:
      modellers: {lab: 3FA2-...}          # the custodian's name for a key -> its fingerprint
      groups: {researchers: [lab]}        # named sets of modellers
      datasets:
        ehr:                              # a dataset of this pod, or "*" for every dataset without its own entry
          grants:
            - to: [researchers]           # modellers or groups
              kinds: [sql_aggregate, train]
              expires: 2027-06-30         # optional; the grant ends when this day is over (UTC)
          min_group_size: 3               # aggregate cells from fewer rows are suppressed; no model
                                          # update or test metric from fewer rows leaves either
          max_rows: 1000                  # row queries are capped here (and say so)
          max_groups: 40                  # an aggregate answer with more cells is refused; null: no cap
          columns: {allow: null, deny: [ssn]}
          models: null                    # built-in model names (or "custom" for approved plans); null: any
          require_secure_aggregation: false
          protect_differencing: true      # refuse aggregates differing from a released one by < min_group_size rows
          release_extremes: true          # false: MIN and MAX, each one member's value, need sql_rows
          epsilon_budget: null            # set: training must be DP, and DP tasks are charged to it
          epsilon_budget_scope: per_modeller  # or total: one budget shared by every modeller
          tasks_per_hour: null            # per modeller on this dataset

Everything not granted is denied. `decide` is pure: the pod supplies what it measured (the
columns a query reads, the tasks this modeller ran in the last hour, the time), so every
decision can be tested from a table of cases and replayed from the audit log. It collects
every violation, not just the first, so a refusal can list them all.

A config of an older fedpod (`access: {modellers: [{name, fingerprint}]}`) is migrated on load:
each accepted modeller is granted every task kind on every dataset, which is what it had.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from fedpod.errors import ConfigError
from fedpod.names import NAME_PATTERN
from fedpod.security.identity import FINGERPRINT_PATTERN

TaskKind = Literal["sql_aggregate", "sql_rows", "train", "evaluate"]
TASK_KINDS: tuple[TaskKind, ...] = ("sql_aggregate", "sql_rows", "train", "evaluate")
EVERY_DATASET = "*"
CUSTOM_PLAN = "custom"
DEFAULT_MIN_GROUP_SIZE = 3  # DataSHIELD's nfilter.tab
DEFAULT_MAX_GROUPS = 40  # DataSHIELD's nfilter.levels.max

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Fingerprint = Annotated[str, StringConstraints(pattern=FINGERPRINT_PATTERN.pattern)]


class Grant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: list[Name] = Field(min_length=1)
    kinds: list[TaskKind] = Field(min_length=1)
    expires: dt.date | None = None

    def active(self, today: dt.date) -> bool:
        return self.expires is None or today <= self.expires


class Columns(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow: list[str] | None = None  # None: every column the deny list leaves
    deny: list[str] = []

    def permits(self, column: str) -> bool:
        lowered = column.lower()
        if lowered in {c.lower() for c in self.deny}:
            return False
        return self.allow is None or lowered in {c.lower() for c in self.allow}


class DatasetPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grants: list[Grant] = []
    min_group_size: int = Field(default=DEFAULT_MIN_GROUP_SIZE, ge=1)
    max_rows: int | None = Field(default=None, ge=1)
    max_groups: int | None = Field(default=DEFAULT_MAX_GROUPS, ge=1)  # cells per aggregate answer; null: no cap
    columns: Columns = Columns()
    models: list[str] | None = None
    require_secure_aggregation: bool = False
    protect_differencing: bool = True  # refuse an aggregate whose cohort is within min_group_size of one released
    release_extremes: bool = True  # false: an aggregate with MIN or MAX (each one member's value) needs sql_rows
    epsilon_budget: float | None = Field(default=None, gt=0)  # set: training must be differentially private
    epsilon_budget_scope: Literal["per_modeller", "total"] = "per_modeller"
    tasks_per_hour: int | None = Field(default=None, ge=1)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modellers: dict[Name, Fingerprint] = {}
    groups: dict[Name, list[Name]] = {}
    datasets: dict[str, DatasetPolicy] = {}

    @model_validator(mode="after")
    def _names_resolve(self) -> Policy:
        """Every name a grant or group uses is a known modeller or group: a typo must not
        silently grant nothing (or, worse, something to a key added later under that name)."""
        for group, members in self.groups.items():
            if group in self.modellers:
                raise ValueError(f"groups.{group}: a modeller has that name too")
            unknown = [m for m in members if m not in self.modellers]
            if unknown:
                raise ValueError(f"groups.{group}: unknown modeller(s) {unknown}")
        fingerprints = list(self.modellers.values())
        repeated = sorted({fp for fp in fingerprints if fingerprints.count(fp) > 1})
        if repeated:
            raise ValueError(f"modellers: fingerprint(s) {repeated} appear under more than one name")
        for dataset, policy in self.datasets.items():
            for index, grant in enumerate(policy.grants):
                unknown = [n for n in grant.to if n not in self.modellers and n not in self.groups]
                if unknown:
                    raise ValueError(f"datasets.{dataset}.grants.{index}.to: unknown modeller or group {unknown}")
        return self

    def check_datasets(self, served: set[str]) -> None:
        """Raise naming a dataset the policy names but the pod does not serve."""
        unknown = sorted(set(self.datasets) - served - {EVERY_DATASET})
        if unknown:
            raise ValueError(f"policies.datasets names {unknown}, which this pod does not serve "
                             f"(it serves {sorted(served) or 'none'})")

    def name_of(self, fingerprint: str) -> str | None:
        return next((name for name, fp in self.modellers.items() if fp == fingerprint), None)

    def for_dataset(self, dataset: str) -> DatasetPolicy:
        """The dataset's own policy, else the `*` one, else the default (which grants nothing)."""
        return self.datasets.get(dataset) or self.datasets.get(EVERY_DATASET) or DatasetPolicy()

    def principals(self, name: str) -> set[str]:
        """The modeller's own name and every group it belongs to: what a grant's `to` may say."""
        return {name, *(group for group, members in self.groups.items() if name in members)}

    def kinds_for(self, fingerprint: str, dataset: str, today: dt.date) -> set[str]:
        name = self.name_of(fingerprint)
        if name is None:
            return set()
        principals = self.principals(name)
        return {kind for grant in self.for_dataset(dataset).grants if grant.active(today)
                and principals & set(grant.to) for kind in grant.kinds}

    def knows(self, fingerprint: str) -> bool:
        return self.name_of(fingerprint) is not None

    def grant(self, name: str, fingerprint: str, dataset: str, kinds: list[TaskKind],
              expires: dt.date | None = None) -> Policy:
        """A copy in which `name` (added with `fingerprint` if new) holds `kinds` on `dataset`.
        A name is never moved to another key, nor a key given a second name: either would hand
        one party's grants to another."""
        if self.modellers.get(name, fingerprint) != fingerprint:
            raise ConfigError(f"modeller {name!r} is another key ({self.modellers[name]}), not {fingerprint}",
                              hint="choose another name, or revoke the old key first")
        known_as = self.name_of(fingerprint)
        if known_as not in (None, name):
            raise ConfigError(f"key {fingerprint} is known as {known_as!r} already", hint=f"grant to {known_as}")
        data = self.model_dump(mode="json")
        data["modellers"][name] = fingerprint
        entry = own_entry(data, dataset)
        entry["grants"].append({"to": [name], "kinds": list(dict.fromkeys(kinds)),
                                "expires": expires.isoformat() if expires else None})
        return Policy.model_validate(data)

    def limit(self, dataset: str, **limits: Any) -> Policy:
        """A copy in which `dataset`'s own policy (from `*`'s, if it had none) sets `limits`."""
        data = self.model_dump(mode="json")
        own_entry(data, dataset).update(limits)
        return Policy.model_validate(data)

    def revoke(self, who: str) -> Policy:
        """A copy without the modeller (by name or fingerprint): out of every group and grant."""
        name = who if who in self.modellers else self.name_of(who)
        if name is None:
            raise KeyError(who)
        data = self.model_dump(mode="json")
        del data["modellers"][name]
        data["groups"] = {g: [m for m in members if m != name] for g, members in data["groups"].items()}
        for policy in data["datasets"].values():
            for grant in policy["grants"]:
                grant["to"] = [n for n in grant["to"] if n != name]
            policy["grants"] = [g for g in policy["grants"] if g["to"]]
        return Policy.model_validate(data)


def migrate_access(raw: dict[str, Any]) -> dict[str, Any]:
    """An older config's `access.modellers` becomes `policies`: each may do everything on every
    dataset, as before. Names clashing with ones already in `policies` keep the policy's."""
    access = raw.pop("access", None)
    if not isinstance(access, dict) or not access.get("modellers"):
        return raw
    policies = raw.setdefault("policies", {}) or {}
    raw["policies"] = policies
    modellers = policies.setdefault("modellers", {})
    names = []
    for entry in access["modellers"]:
        if isinstance(entry, dict) and "name" in entry and "fingerprint" in entry:
            modellers.setdefault(entry["name"], entry["fingerprint"])
            names.append(entry["name"])
    every = policies.setdefault("datasets", {}).setdefault(EVERY_DATASET, {})
    every.setdefault("grants", []).append({"to": names, "kinds": list(TASK_KINDS)})
    return raw


def own_entry(data: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The dataset's own entry in a dumped policy, made on first edit as a copy of the `*` entry
    it inherited until then: a grant or a limit set on one dataset must not drop the limits and
    grants that `*` gave it (a `columns.deny` among them)."""
    datasets = data["datasets"]
    if dataset not in datasets:
        datasets[dataset] = copy.deepcopy(datasets.get(EVERY_DATASET) or DatasetPolicy().model_dump(mode="json"))
    entry: dict[str, Any] = datasets[dataset]
    return entry


@dataclass(frozen=True)
class Request:
    """What the pod measured about a task before deciding on it. `columns`: the dataset columns
    the task reads (a query's references, `*` expanded); `extremes`: an aggregate releases a MIN
    or MAX; `model`: a training task's built-in model name, or "custom"; `recent_tasks`: this
    modeller's tasks on this dataset in the last hour."""

    pod: str
    requester: str
    fingerprint: str
    dataset: str
    kind: TaskKind
    at: dt.datetime
    served: bool = True
    columns: frozenset[str] = frozenset()
    extremes: bool = False
    model: str | None = None
    secure_aggregation: bool = False
    differentially_private: bool = False
    recent_tasks: int = 0

    @property
    def identifier(self) -> str:
        return f"{self.pod}/{self.dataset}"


@dataclass(frozen=True)
class Violation:
    rule: str
    reason: str
    remedy: str


@dataclass(frozen=True)
class Decision:
    """`limits`: the dataset policy whose disclosure limits apply to an allowed task."""

    violations: tuple[Violation, ...] = ()
    limits: DatasetPolicy = field(default_factory=DatasetPolicy)
    principal: str | None = None

    @property
    def allowed(self) -> bool:
        return not self.violations

    @property
    def rule(self) -> str | None:
        return self.violations[0].rule if self.violations else None

    @property
    def reason(self) -> str:
        return "; ".join(v.reason for v in self.violations)

    @property
    def remedy(self) -> str:
        return "; ".join(dict.fromkeys(v.remedy for v in self.violations))


def decide(policy: Policy, request: Request) -> Decision:
    """Every decision a pod makes about a task: deny unless a live grant covers the requester,
    the dataset and the task kind, and the dataset's limits hold."""
    where = request.identifier
    if not request.served:
        return Decision((Violation("dataset", f"pod {request.pod} serves no dataset {request.dataset!r}",
                                   f"ask for one of pod {request.pod}'s datasets"),))
    limits = policy.for_dataset(request.dataset)
    name = policy.name_of(request.fingerprint)
    if name is None:
        return Decision((Violation("modeller", f"modeller {request.requester!r} ({request.fingerprint}) is unknown "
                                   f"to pod {request.pod}",
                                   f"ask the custodian of pod {request.pod} to grant {request.kind} on {where} to "
                                   f"{request.requester} ({request.fingerprint})"),), limits)
    violations: list[Violation] = []
    today = request.at.astimezone(dt.UTC).date()
    principals = policy.principals(name)
    kind = request.kind
    if kind == "sql_aggregate" and request.extremes and not limits.release_extremes:
        kind = "sql_rows"  # a MIN or MAX is one member's value, as a row is
    covering = [g for g in limits.grants if principals & set(g.to) and kind in g.kinds]
    if not covering and kind != request.kind:
        violations.append(Violation("release_extremes", f"{where} releases MIN and MAX, each one member's value, only "
                                    f"to holders of sql_rows, which {name} is not",
                                    "ask for quantiles (withheld near the extremes), give a histogram its value_range, "
                                    "or ask the custodian to set release_extremes: true"))
    elif not covering:
        violations.append(Violation("grants", f"{name} holds no grant of {kind} on {where}",
                                    f"ask the custodian to grant {kind} on {where} to {name}"))
    elif not any(g.active(today) for g in covering):
        ended = max(g.expires for g in covering if g.expires is not None)
        violations.append(Violation("expires", f"{name}'s grant of {kind} on {where} expired on {ended}",
                                    f"ask the custodian to renew {kind} on {where} for {name}"))
    hidden = sorted(c for c in request.columns if not limits.columns.permits(c))
    if hidden:
        violations.append(Violation("columns", f"column(s) {hidden} of {where} are not released",
                                    f"leave out {', '.join(hidden)}, or ask the custodian to release them"))
    if request.kind in ("train", "evaluate") and limits.models is not None and request.model not in limits.models:
        violations.append(Violation("models", f"model {request.model!r} is not among {where}'s allowed models "
                                    f"{limits.models}", f"use one of {limits.models}, or ask the custodian to allow "
                                    f"{request.model}"))
    if request.kind == "train" and limits.require_secure_aggregation and not request.secure_aggregation:
        violations.append(Violation("require_secure_aggregation", f"{where} releases model updates only under "
                                    "secure aggregation", "run the experiment with secure aggregation"))
    if request.kind == "train" and limits.epsilon_budget is not None and not request.differentially_private:
        violations.append(Violation("epsilon_budget", f"{where} has an epsilon budget: it trains only with "
                                    "differential privacy", "set training_args dp_args (local or central)"))
    if limits.tasks_per_hour is not None and request.recent_tasks >= limits.tasks_per_hour:
        violations.append(Violation("tasks_per_hour", f"{name} ran {request.recent_tasks} task(s) on {where} in the "
                                    f"last hour; the limit is {limits.tasks_per_hour}",
                                    "wait, or ask the custodian to raise tasks_per_hour"))
    return Decision(tuple(violations), limits, name)


def policy_changes(old: Policy, new: Policy) -> dict[str, list[Any]]:
    """What an edit changed, as dotted field paths -> [old value, new value] (None where a field
    appears or disappears): what the audit log records for a reviewer."""

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):  # an empty mapping has no fields to name
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    before, after = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    return {path: [before.get(path), after.get(path)] for path in sorted(before.keys() | after.keys())
            if before.get(path) != after.get(path)}
