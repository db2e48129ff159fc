"""Access requests: a refused task from a modeller becomes a request the custodian can grant.

Kept in `storage/access-requests.json`, which the pod and the custodian's tools (`fedpod
access`, the web page) all update under one file lock, so an id is never given twice and a
decision is never lost to a concurrent write. One request per (modeller key, dataset) while it
is pending; further refused tasks only raise its count and the kinds asked for, in memory,
written at most once per `flush` (the pod flushes on its heartbeat): a flood of tasks from
one key costs no disk writes. Fresh keys cost one write each until `MAX_PENDING` requests are
pending; beyond that (or `MAX_PENDING_PER_KEY` per key) new ones are only counted, so a
stranger minting keys can neither fill the disk nor bury the page. A denied request stays
denied: that key's later tasks on that dataset add nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fedpod.errors import ConfigError

Status = Literal["pending", "approved", "denied"]
MAX_PENDING = 200
MAX_PENDING_PER_KEY = 20
MAX_KEPT = 1000  # decided requests beyond this are dropped, oldest first
NAME_CHARS = 64


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class AccessRequests:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_suffix(".lock")
        self._unflushed: dict[int, dict[str, Any]] = {}  # id -> counts and kinds seen since the last flush
        self._seen_mtime: int | None = None
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}  # (key, dataset) -> its latest request
        self._pending = 0

    def _refresh(self) -> None:
        """Re-read the file only when it changed: repeated refusals cost a stat, not a parse."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = 0
        if mtime == self._seen_mtime:
            return
        entries = self._read()
        self._latest = {(e["fingerprint"], e["dataset"]): e for e in entries}
        self._pending = sum(e["status"] == "pending" for e in entries)
        self._seen_mtime = mtime

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[dict[str, Any]]]:
        """The requests, read under the lock; what the block leaves in the list is written back."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            before = json.dumps(entries)
            yield entries
            if json.dumps(entries) != before:
                partial = self.path.with_suffix(".partial")
                partial.write_text(json.dumps(entries, indent=1))
                os.replace(partial, self.path)

    def _read(self) -> list[dict[str, Any]]:
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"access requests file {self.path} is unreadable: {exc}",
                              hint="restore it from a backup, or move it aside to start an empty queue") from exc
        return entries if isinstance(entries, list) else []

    def entries(self) -> list[dict[str, Any]]:
        return self._read()

    def note(self, name: str, fingerprint: str, dataset: str, kind: str) -> dict[str, Any] | None:
        """Record a refused task; returns its request (None when the queue is full for it)."""
        self._refresh()
        latest: dict[str, Any] | None = self._latest.get((fingerprint, dataset))
        if latest is None or latest["status"] == "approved":
            if self._pending >= MAX_PENDING:
                return None
        elif latest["status"] == "pending":
            seen = self._unflushed.setdefault(latest["id"], {"count": 0, "kinds": set()})
            seen["count"] += 1
            seen["kinds"].add(kind)
            return latest
        else:
            return latest
        with self._locked() as entries:
            mine = [e for e in entries if e["fingerprint"] == fingerprint]
            latest = next((e for e in reversed(mine) if e["dataset"] == dataset), None)
            if latest is not None and latest["status"] in ("pending", "denied"):
                return dict(latest)  # written by another process since the last refresh
            pending = [e for e in entries if e["status"] == "pending"]
            if len(pending) >= MAX_PENDING or sum(e["status"] == "pending" for e in mine) >= MAX_PENDING_PER_KEY:
                return None
            entry = {"id": max((e["id"] for e in entries), default=0) + 1, "name": name[:NAME_CHARS],
                     "fingerprint": fingerprint, "dataset": dataset, "kinds": [kind], "first_seen": _now(),
                     "last_seen": _now(), "count": 1, "status": "pending", "decided": None}
            entries.append(entry)
            decided = [e for e in entries if e["status"] != "pending"]
            for stale in decided[:max(0, len(entries) - MAX_KEPT)]:
                entries.remove(stale)
        self._seen_mtime = None  # re-read at the next note
        return entry

    @property
    def unflushed(self) -> bool:
        """Whether `flush` has anything to write (read on the event loop, which skips the worker
        thread a flush needs when there is nothing)."""
        return bool(self._unflushed)

    def flush(self) -> None:
        """Write the counts and kinds gathered since the last flush (one write, whatever their number)."""
        if not self._unflushed:
            return
        seen, self._unflushed = self._unflushed, {}
        with self._locked() as entries:
            for entry in entries:
                extra = seen.get(entry["id"])
                if extra is not None and entry["status"] == "pending":
                    entry["count"] += extra["count"]
                    entry["kinds"] = sorted({*entry["kinds"], *extra["kinds"]})
                    entry["last_seen"] = _now()

    def decide(self, request_id: int, status: Status, **details: Any) -> dict[str, Any]:
        """Mark a pending request approved or denied (the caller changes the policy)."""
        with self._locked() as entries:
            entry = next((e for e in entries if e["id"] == request_id), None)
            if entry is None:
                known = ", ".join(str(e["id"]) for e in entries if e["status"] == "pending") or "none pending"
                raise ConfigError(f"no access request {request_id} (pending: {known})",
                                  hint="`fedpod access list` shows the requests")
            if entry["status"] != "pending":
                raise ConfigError(f"access request {request_id} was {entry['status']} already ({entry['decided']})")
            entry.update(status=status, decided=_now(), **details)
            return dict(entry)

    def of(self, fingerprint: str) -> list[dict[str, Any]]:
        """A requester's own requests (what `fedpod access status` answers it)."""
        return [e for e in self._read() if e["fingerprint"] == fingerprint]
