"""Append-only, hash-chained audit log (JSON lines).

Each entry stores the hash of the previous one; an entry's own hash covers its canonical
JSON. Editing, deleting or reordering any entry breaks the chain at that point, which
`AuditLog.verify` reports with the line number. Appends are flushed and fsynced so that a
crash never loses an entry that a decision was based on.
"""

from __future__ import annotations

import fcntl
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


def _last_line(handle: Any) -> bytes:
    """The file's last non-empty line, read backwards from the end (appends stay O(1))."""
    handle.seek(0, os.SEEK_END)
    position = handle.tell()
    tail = b""
    while position > 0:
        step = min(4096, position)
        position -= step
        handle.seek(position)
        tail = handle.read(step) + tail
        lines = tail.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or position == 0:
            return bytes(lines[-1])
    return b""


class AuditLog:
    """Several processes may append (the pod, and `fedpod plan approve` beside it): each append
    takes an exclusive lock on the file and chains onto the entry actually last in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, event: str, **details: Any) -> dict[str, Any]:
        """Record one event (task request, decision, result, rejected envelope, ...)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self.path.open("a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                last = _last_line(handle)
                previous = json.loads(last) if last.strip() else None
                entry: dict[str, Any] = {"seq": previous["seq"] + 1 if previous else 1, "ts": time.time(),
                                         "event": event, "prev": previous["hash"] if previous else GENESIS, **details}
                entry["hash"] = _entry_hash(entry)
                handle.seek(0, os.SEEK_END)
                handle.write((json.dumps(entry, sort_keys=True) + "\n").encode())
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
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
