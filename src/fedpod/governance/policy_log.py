"""Every policy change becomes one audit entry with old and new values, exactly once.

The pod's policy can change through `fedpod policy`/`access`, the web page, or an editor on
the YAML file, while the pod runs or while it is stopped. Whoever notices a change first — the
tool that made it, or the pod when it applies it (at its next task, heartbeat or start) —
records it, under a lock on `policy-applied.json`, which holds the policy last recorded; the
others then find nothing new.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from fedpod.governance.audit import AuditLog
from fedpod.governance.policy import Policy, policy_changes

APPLIED_POLICY = "policy-applied.json"


def record_policy(storage: Path, policy: Policy, audit: AuditLog, source: str) -> dict[str, Any] | None:
    """Audit the change from the last recorded policy to `policy` (None if there is none)."""
    path = storage / APPLIED_POLICY
    storage.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            applied: Policy | None = Policy.model_validate_json(path.read_text())
        except (OSError, ValueError):
            applied = None
        if applied == policy:
            return None
        entry = audit.append("policy-changed", changes=policy_changes(applied or Policy(), policy), source=source,
                             first_recorded=applied is None)
        partial = path.with_suffix(".partial")
        partial.write_text(policy.model_dump_json(indent=1))
        os.replace(partial, path)
        return entry
