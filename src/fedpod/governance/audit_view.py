"""Reading the audit log as a reviewer does: which entries (since when, for which dataset or
modeller, with which decision), each as one flat row for a table or a CSV.

Entries about a task after its receipt (completed, failed) do not repeat who asked: they are
joined to their `task-received` entry by task id, so filtering by modeller finds the whole story
of each of its tasks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from fedpod.errors import ConfigError

COLUMNS = ("seq", "time", "event", "task", "requester", "requester_fingerprint", "dataset", "kind", "decision",
           "details")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SHOWN_ELSEWHERE = {"seq", "ts", "event", "task", "requester", "requester_fingerprint", "dataset", "kind", "decision",
                    "hash", "prev"}


def parse_since(text: str, now: float | None = None) -> float:
    """`2h`, `30m`, `7d` (ago), or an ISO date/time (local time unless it says otherwise)."""
    current = time.time() if now is None else now
    relative = _RELATIVE.match(text.strip())
    if relative:
        return current - float(relative.group(1)) * _SECONDS[relative.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError as exc:
        raise ConfigError(f"--since {text!r} is neither a duration (30m, 2h, 7d) nor a date/time (2026-11-24T09:00)") \
            from exc


def rows(entries: Iterable[dict[str, Any]], *, since: float | None = None, dataset: str | None = None,
         modeller: str | None = None, decision: str | None = None) -> list[dict[str, Any]]:
    """The entries that pass every filter given, flattened (`details` holds the rest as JSON)."""
    asked: dict[str, dict[str, Any]] = {}
    selected = []
    for entry in entries:
        task = entry.get("task")
        if entry.get("event") == "task-received" and isinstance(task, str):
            asked[task] = entry
        origin = asked.get(task, {}) if isinstance(task, str) else {}
        row = {
            "seq": entry.get("seq"),
            "time": datetime.fromtimestamp(float(entry.get("ts", 0))).isoformat(timespec="seconds"),
            "event": entry.get("event"),
            "task": task or "",
            "requester": entry.get("requester", origin.get("requester", "")),
            "requester_fingerprint": entry.get("requester_fingerprint", origin.get("requester_fingerprint", "")),
            "dataset": entry.get("dataset", origin.get("dataset", "")),
            "kind": entry.get("kind", origin.get("kind", "")),
            "decision": entry.get("decision", ""),
            "details": json.dumps({k: v for k, v in entry.items() if k not in _SHOWN_ELSEWHERE}, sort_keys=True,
                                  default=str),
        }
        if since is not None and float(entry.get("ts", 0)) < since:
            continue
        if dataset is not None and row["dataset"] != dataset and not str(row["dataset"]).endswith(f"/{dataset}"):
            continue
        if modeller is not None and modeller not in (row["requester"], row["requester_fingerprint"]):
            continue
        if decision is not None and row["decision"] != decision:
            continue
        selected.append(row)
    return selected
