"""Append-only, hash-chained audit log (JSON lines).

Each entry stores the hash of the previous one; an entry's own hash covers its canonical
JSON. Editing, deleting or reordering any entry breaks the chain at that point, which
`AuditLog.verify` reports with the line number. Appends are flushed and fsynced so that a
crash never loses an entry that a decision was based on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    problem: str | None = None


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._last_hash, self._count = self._tail()

    def _tail(self) -> tuple[str, int]:
        if not self.path.exists():
            return GENESIS, 0
        last, count = GENESIS, 0
        with self.path.open() as handle:
            for line in handle:
                if line.strip():
                    last = json.loads(line)["hash"]
                    count += 1
        return last, count

    def append(self, event: str, **details: Any) -> dict[str, Any]:
        """Record one event (task request, decision, result, rejected envelope, ...)."""
        with self._lock:
            entry: dict[str, Any] = {"seq": self._count + 1, "ts": time.time(), "event": event,
                                     "prev": self._last_hash, **details}
            entry["hash"] = _entry_hash(entry)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self._last_hash = entry["hash"]
            self._count += 1
            return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    @staticmethod
    def verify(path: Path) -> VerifyResult:
        if not path.exists():
            return VerifyResult(True, 0)
        previous = GENESIS
        count = 0
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                return VerifyResult(False, count, f"line {number}: not JSON")
            if entry.get("prev") != previous:
                return VerifyResult(False, count, f"line {number}: chain broken (entry removed or reordered before it)")
            if entry.get("hash") != _entry_hash(entry):
                return VerifyResult(False, count, f"line {number}: entry was modified")
            if entry.get("seq") != count + 1:
                return VerifyResult(False, count, f"line {number}: sequence number {entry.get('seq')} out of order")
            previous = entry["hash"]
            count += 1
        return VerifyResult(True, count)
