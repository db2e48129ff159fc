"""Append-only, hash-chained audit log (JSON lines).

Each entry stores the hash of the previous one; an entry's own hash covers its canonical
JSON. Editing, deleting or reordering any entry breaks the chain at that point, which
`AuditLog.verify` reports with the line number.

`AuditLog.append` writes and fsyncs at once (the CLI's approvals). A running pod writes
through an `AuditWriter` instead: a thread that takes whatever entries are queued, chains and
writes them together and fsyncs once per batch, so no append ever blocks the pod's event loop
and a burst of events costs one fsync, not one each. What a crash can lose is bounded: entries
queued in the last `AuditWriter.BATCH_S` (50 ms) before it, never one that `record_durably`
returned for — the pod writes `task-received` that way before it answers a task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import hashlib
import json
import os
import queue
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
        """Record one event (task request, decision, result, rejected envelope, ...), durably."""
        return self.append_many([(event, details)])[0]

    def append_many(self, records: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Chain and write several events with one lock and one fsync."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        written: list[dict[str, Any]] = []
        with self._lock, self.path.open("a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                last = _last_line(handle)
                previous = json.loads(last) if last.strip() else None
                lines = []
                for event, details in records:
                    entry: dict[str, Any] = {"seq": previous["seq"] + 1 if previous else 1, "ts": time.time(),
                                             "event": event, "prev": previous["hash"] if previous else GENESIS,
                                             **details}
                    entry["hash"] = _entry_hash(entry)
                    lines.append(json.dumps(entry, sort_keys=True) + "\n")
                    written.append(entry)
                    previous = entry
                handle.seek(0, os.SEEK_END)
                handle.write("".join(lines).encode())
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return written

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


_Pending = tuple[str, dict[str, Any], "concurrent.futures.Future[dict[str, Any]] | None"]


class AuditWriter:
    """Appends to an `AuditLog` from a thread, in batches (see the module docstring).

    `record` never blocks; `record_durably` waits (without blocking the event loop) until the
    entry is on disk. The queue is bounded (`MAX_QUEUED`): if a flood ever fills it, further
    records are counted in `dropped` instead of growing memory, and the count is itself
    written once there is room again.
    """

    BATCH_S = 0.05
    MAX_QUEUED = 10_000

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.dropped = 0
        self._reported_dropped = 0
        self._queue: queue.Queue[_Pending | None] = queue.Queue(self.MAX_QUEUED)
        self._thread = threading.Thread(target=self._run, name="fedpod-audit", daemon=True)
        self._thread.start()

    def record(self, event: str, **details: Any) -> None:
        self._put((event, details, None))

    async def record_durably(self, event: str, **details: Any) -> dict[str, Any]:
        done: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._put((event, details, done))
        return await asyncio.wrap_future(done)

    def _put(self, item: _Pending) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if item[2] is not None:
                item[2].set_exception(OSError("audit queue full"))

    def close(self) -> None:
        """Write everything queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch: list[_Pending] = []
            if first is None:
                stopping = True
            else:
                batch.append(first)
                deadline = time.monotonic() + self.BATCH_S
                while len(batch) < 1000:
                    try:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
            if self.dropped != self._reported_dropped:
                batch.append(("audit-entries-dropped", {"count": self.dropped - self._reported_dropped}, None))
                self._reported_dropped = self.dropped
            if batch:
                self._write(batch)

    def _write(self, batch: list[_Pending]) -> None:
        try:
            entries = self.log.append_many([(event, details) for event, details, _ in batch])
        except Exception as exc:  # a full disk must not kill the writer: callers waiting hear of it
            for _, _, done in batch:
                if done is not None and not done.done():
                    done.set_exception(exc)
            return
        for (_, _, done), entry in zip(batch, entries, strict=True):
            if done is not None and not done.done():
                done.set_result(entry)
