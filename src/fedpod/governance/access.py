"""The one place where a pod decides whether a task may run.

It is a pure function of the pod's access settings and the request, returning every reason
for a refusal (not just the first), so that fuller policies (task kinds, limits, budgets)
can grow here without the pod service changing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from fedpod.security.identity import FINGERPRINT_PATTERN


class TrustedModeller(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    fingerprint: str = Field(pattern=FINGERPRINT_PATTERN.pattern)


class AccessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modellers: list[TrustedModeller] = []


@dataclass(frozen=True)
class AccessRequest:
    requester_name: str
    requester_fingerprint: str
    dataset: str
    task_kind: str


@dataclass(frozen=True)
class AccessDecision:
    allowed: bool
    reasons: list[str] = field(default_factory=list)
    rule: str | None = None


def decide(settings: AccessSettings, request: AccessRequest, datasets: set[str]) -> AccessDecision:
    reasons: list[str] = []
    rule: str | None = None
    known = {m.fingerprint: m for m in settings.modellers}
    if request.requester_fingerprint not in known:
        rule = "modellers"
        reasons.append(f"modeller {request.requester_name!r} ({request.requester_fingerprint}) is not in this "
                       "pod's accepted modellers")
    if request.dataset not in datasets:
        rule = rule or "datasets"
        reasons.append(f"dataset {request.dataset!r} is not served by this pod")
    return AccessDecision(allowed=not reasons, reasons=reasons, rule=rule)
