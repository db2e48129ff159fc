"""What a custodian does to a pod, whichever tool it uses (`fedpod access|policy|plan`, the web
page): each operation checks its input, changes the pod's files, and writes the audit entry.

A running pod picks every change up from its files before its next task (policy) or when the
task arrives (plans); nothing here talks to the pod process.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedpod.errors import ConfigError, invalid_fields, yaml_syntax
from fedpod.governance.audit import AuditLog, VerifyResult, checkpoints_path, read_checkpoints
from fedpod.governance.plans import PlanRegistry
from fedpod.governance.policy import TASK_KINDS, Policy, TaskKind, own_entry
from fedpod.governance.policy_log import record_policy
from fedpod.governance.requests import AccessRequests
from fedpod.pod.config import PodConfig, edit_policies
from fedpod.security.identity import Identity

LIMIT_FIELDS = ("min_group_size", "max_rows", "max_groups", "columns.allow", "columns.deny", "models",
                "require_secure_aggregation", "protect_differencing", "release_extremes", "epsilon_budget",
                "epsilon_budget_scope", "tasks_per_hour")


def parse_kinds(text: str) -> list[TaskKind]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"unknown task kind(s) {unknown or [text]}", hint=f"choose from {', '.join(TASK_KINDS)}")
    return kinds  # type: ignore[return-value]


@dataclass(frozen=True)
class PodFolder:
    """A pod's config and the files beside it that its custodian's tools change."""

    config_path: Path

    @property
    def config(self) -> PodConfig:
        return PodConfig.load(self.config_path)

    def resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.config_path.parent / path

    @property
    def storage(self) -> Path:
        return self.resolve(self.config.storage)

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.storage / "audit.jsonl")

    @property
    def requests(self) -> AccessRequests:
        return AccessRequests(self.storage / "access-requests.json")

    @property
    def plans(self) -> PlanRegistry:
        return PlanRegistry(self.storage / "plans")

    def change_policy(self, change: Callable[[Policy], Policy], source: str) -> tuple[Policy, Policy]:
        """Apply a change (refused whole, naming the field, if the result is invalid) and audit it."""
        old, new = edit_policies(self.config_path, change)
        record_policy(self.storage, new, self.audit, source)
        return old, new

    def approve(self, request_id: int, kinds: list[TaskKind] | None = None, expires: dt.date | None = None,
                name: str | None = None, source: str = "fedpod access approve") -> dict[str, Any]:
        """Grant a pending request's kinds (or `kinds`) on its dataset. The modeller is added
        under its own name (or `name`); a name already used by another key is refused."""
        entry = next((e for e in self.requests.entries() if e["id"] == request_id), None)
        if entry is None or entry["status"] != "pending":
            # decide() gives the precise error (unknown id, or decided already)
            self.requests.decide(request_id, "approved")
        assert entry is not None
        granted = kinds or list(entry["kinds"])
        policy = self.config.policies
        known_as = policy.name_of(entry["fingerprint"])
        label = known_as or name or entry["name"]
        if known_as is None and label in {**policy.modellers, **policy.groups}:
            raise ConfigError(f"the name {label!r} is taken by another key or group on this pod",
                              hint=f"approve under another name: --as NAME (request {request_id})")
        self.change_policy(lambda p: p.grant(label, entry["fingerprint"], entry["dataset"], granted, expires),
                           f"{source} {request_id}")
        decided = self.requests.decide(request_id, "approved", granted=granted,
                                       expires=expires.isoformat() if expires else None)
        self.audit.append("access-approved", request=request_id, modeller=label, fingerprint=entry["fingerprint"],
                          dataset=entry["dataset"], kinds=granted, expires=decided["expires"], source=source)
        return decided

    def deny(self, request_id: int, source: str = "fedpod access deny") -> dict[str, Any]:
        decided = self.requests.decide(request_id, "denied")
        self.audit.append("access-denied", request=request_id, modeller=decided["name"],
                          fingerprint=decided["fingerprint"], dataset=decided["dataset"], source=source)
        return decided

    def revoke(self, who: str, source: str = "fedpod access revoke") -> None:
        def without(policy: Policy) -> Policy:
            try:
                return policy.revoke(who)
            except KeyError:
                raise ConfigError(f"pod {self.config.name} knows no modeller {who!r}", where=str(self.config_path),
                                  hint=f"known: {', '.join(policy.modellers) or 'none'}") from None

        self.change_policy(without, source)

    def privacy_spend(self) -> list[dict[str, Any]]:
        """Per dataset and modeller: the epsilon spent (from the pod's ledger), its budget and scope
        as the policy now states them, and what remains (a total budget counts every modeller)."""
        from fedpod.governance.privacy_budget import PrivacyLedger

        policies = self.config.policies
        totals = PrivacyLedger(self.storage / "privacy-budget.jsonl", lambda *_, **__: None).totals()
        rows = []
        for (dataset, fingerprint), spent in sorted(totals.items()):
            limits = policies.for_dataset(dataset)
            used = sum(v for (d, _), v in totals.items() if d == dataset) if limits.epsilon_budget_scope == "total" \
                else spent
            rows.append({"dataset": dataset, "modeller": policies.name_of(fingerprint) or fingerprint,
                         "spent": spent, "budget": limits.epsilon_budget, "scope": limits.epsilon_budget_scope,
                         "remaining": None if limits.epsilon_budget is None else limits.epsilon_budget - used})
        return rows

    def set_limit(self, dataset: str, field: str, value: str, source: str = "fedpod policy set") -> tuple[Any, Any]:
        """Set one limit of a dataset's policy from its text (YAML: `5`, `null`, `[a, b]`, `true`)."""
        if field not in LIMIT_FIELDS:
            raise ConfigError(f"no policy field {field!r}", hint=f"set one of {', '.join(LIMIT_FIELDS)}; grants "
                              "change with `fedpod access` or `fedpod policy edit`")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise yaml_syntax(exc, f"the value of {field}") from exc
        if field.startswith("columns.") and isinstance(parsed, str):
            parsed = [c.strip() for c in parsed.split(",") if c.strip()]
        before: list[Any] = [None]

        def change(policy: Policy) -> Policy:
            data = policy.model_dump(mode="json")
            entry = own_entry(data, dataset)
            target, _, leaf = field.rpartition(".")
            holder = entry[target] if target else entry
            before[0] = holder.get(leaf)
            holder[leaf] = parsed
            return Policy.model_validate(data)

        self.change_policy(change, source)
        return before[0], parsed

    def replace_policy(self, text: str, source: str) -> tuple[Policy, Policy]:
        """Replace the whole `policies` section from YAML text (`fedpod policy edit`, the web page)."""
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise yaml_syntax(exc, "the policy") from exc
        try:
            replacement = Policy.model_validate(raw)
        except ValidationError as exc:
            raise invalid_fields(exc, "policy", "policies") from exc
        return self.change_policy(lambda _: replacement, source)

    def verify_audit(self, witness: list[Path] | None = None) -> VerifyResult:
        """The hash chain, against the pod's own signed checkpoints and any a modeller kept."""
        path = self.storage / "audit.jsonl"
        signer = Identity.load(self.resolve(self.config.identity)).public
        anchors = read_checkpoints(checkpoints_path(path)) + [c for f in witness or [] for c in read_checkpoints(f)]
        return AuditLog.verify(path, anchors, signer)

    def decide_plan(self, sha: str, approved: bool) -> dict[str, Any]:
        meta = self.plans.decide(sha, "approved" if approved else "rejected")
        self.audit.append("plan-approved" if approved else "plan-rejected", sha256=meta["sha256"], plan=meta["class"])
        return meta


def policy_yaml(policy: Policy) -> str:
    return yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)
