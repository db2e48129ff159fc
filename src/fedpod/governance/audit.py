"""Append-only, hash-chained audit log (JSON lines).

Each entry stores the hash of the previous one; an entry's own hash covers its canonical
JSON. Editing, deleting or reordering any entry breaks the chain at that point, which
`AuditLog.verify` reports with the line number.

`AuditLog.append` writes and fsyncs at once (the CLI's approvals). A running pod writes
through an `AuditWriter` instead: a thread that takes whatever entries are queued, chains and
writes them together (group commit: entries queued while one batch is being written go into
the next), so no append ever blocks the pod's event loop and a burst of events costs one
write. A batch holding an entry that `record_durably` waits for is fsynced before it returns
— the pod writes `task-received` that way before it runs a task — and so is everything written
before it; other batches and checkpoints are fsynced at most once every `SYNC_EVERY_S`, as the
replay guard's nonces are. An fsync took 0.2 ms on an idle disk here and 6 ms while another
job wrote to it, and three per task put them on every query's path. A process crash loses
nothing written (the bytes are in the OS); a power cut can lose the last second's entries that
nothing waited for, never a `task-received`.

A hash chain alone cannot show that its newest entries were deleted, that the file was emptied
or removed, or that someone rewrote it and recomputed every hash. So the pod anchors it: it
signs checkpoints of the chain's head (entry count, head hash, time) with its identity key,
periodically and when it stops, appends them to `audit.checkpoints.jsonl`, and hands the latest
to modellers with each result, who keep it (`$FEDPOD_HOME/witness/`). `verify` checks the
chain against every checkpoint it is given. What the custodian, holding the pod's key, can
still do is said in the README's threat model: rewrite entries newer than the newest
checkpoint someone outside holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from fedpod.security.identity import Identity, PublicIdentity

GENESIS = "0" * 64


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    problem: str | None = None
    checkpoints: int = 0
    note: str | None = None


def checkpoints_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.stem + ".checkpoints.jsonl")


def _checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    body = {k: v for k, v in checkpoint.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_checkpoint(identity: Identity, entries: int, head: str, *, now: float | None = None) -> dict[str, Any]:
    public = identity.public
    checkpoint: dict[str, Any] = {"pod": public.name, "sign_public": public.sign_public.hex(),
                                  "box_public": public.box_public.hex(), "entries": entries, "head": head,
                                  "ts": time.time() if now is None else now}
    checkpoint["signature"] = identity.sign(_checkpoint_bytes(checkpoint)).hex()
    return checkpoint


def checkpoint_signer(checkpoint: dict[str, Any]) -> PublicIdentity:
    """Who signed a checkpoint; raises ValueError if the signature does not verify."""
    try:
        signer = PublicIdentity(str(checkpoint["pod"]), bytes.fromhex(checkpoint["sign_public"]),
                                bytes.fromhex(checkpoint["box_public"]))
        signer.verify(bytes.fromhex(checkpoint["signature"]), _checkpoint_bytes(checkpoint))
    except (KeyError, TypeError, ValueError, InvalidSignature) as exc:
        raise ValueError(f"checkpoint of {checkpoint.get('ts')} does not verify") from exc
    return signer


def read_checkpoints(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(line)
            if isinstance(value, dict):
                found.append(value)
    return found


def _last_line(fd: int, size: int) -> bytes:
    """The file's last non-empty line, read backwards from its end (appends stay O(1))."""
    position, tail = size, b""
    while position > 0:
        step = min(4096, position)
        position -= step
        tail = os.pread(fd, step, position) + tail
        lines = tail.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or position == 0:
            return bytes(lines[-1])
    return b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Appender:
    """A file held open for appending, so that a write costs one system call rather than the
    open, seeks and close that cost a pod's audit thread some twenty per task (strace): each one
    let the event loop take the GIL and the thread wait to get it back. Reopened when the path
    names another file (moved aside or deleted), which a stat of the path tells."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) of the open file
        self._closer: weakref.finalize[[int], _Appender] | None = None

    def fd(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            status = os.stat(self.path)
            if self._fd is not None and self._file == (status.st_dev, status.st_ino):
                return self._fd
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        opened = os.fstat(fd)
        self._fd, self._file = fd, (opened.st_dev, opened.st_ino)
        self._closer = weakref.finalize(self, os.close, fd)
        return fd

    def sync(self) -> None:
        """fsync what was written through this file (nothing, if it was never opened)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
        self._fd = self._file = self._closer = None


class AuditLog:
    """Several processes may append (the pod, and `fedpod plan approve` beside it): each append
    takes an exclusive lock on the file and chains onto the entry actually last in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._log = _Appender(path)
        self._checkpoints = _Appender(checkpoints_path(path))
        # the last entry this object wrote, and the file (device, inode, size) just after: while
        # the file is still exactly that, the entry is its last line and need not be read back
        self._head: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    @contextlib.contextmanager
    def _locked_log(self) -> Iterator[int]:
        """The log's descriptor, held by this thread and, against other processes, by `flock`."""
        with self._lock:
            fd = self._log.fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield fd
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _last_entry(self, fd: int) -> tuple[dict[str, Any] | None, tuple[int, int, int]]:
        """The chain's last entry and the file it is in; call holding the file lock. Another
        process (`fedpod plan approve`) may have appended since this object last wrote: then the
        entry is read from the file."""
        status = os.fstat(fd)
        file = (status.st_dev, status.st_ino, status.st_size)
        if self._head is not None and self._head[0] == file:
            return self._head[1], file
        last = _last_line(fd, status.st_size)
        return (json.loads(last) if last.strip() else None), file

    def append(self, event: str, **details: Any) -> dict[str, Any]:
        """Record one event (task request, decision, result, rejected envelope, ...), durably."""
        return self.append_many([(event, details)])[0]

    def append_many(self, records: list[tuple[str, dict[str, Any]]], *, sync: bool = True) -> list[dict[str, Any]]:
        """Chain and write several events with one lock and (`sync`) one fsync."""
        written: list[dict[str, Any]] = []
        with self._locked_log() as fd:
            previous, (device, inode, size) = self._last_entry(fd)
            lines = []
            for event, details in records:
                entry: dict[str, Any] = {"seq": previous["seq"] + 1 if previous else 1, "ts": time.time(),
                                         "event": event, "prev": previous["hash"] if previous else GENESIS,
                                         **details}
                entry["hash"] = _entry_hash(entry)
                lines.append(json.dumps(entry, sort_keys=True) + "\n")
                written.append(entry)
                previous = entry
            data = "".join(lines).encode()
            _write_all(fd, data)
            if written:  # every writer appends under the lock: the file is now exactly this much longer
                self._head = ((device, inode, size + len(data)), written[-1])
            if sync:
                os.fsync(fd)
        return written

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def sync(self) -> None:
        """fsync the log and its checkpoints file: what was written without waiting for it."""
        with self._lock:  # another thread's append may reopen a file moved aside
            self._log.sync()
            self._checkpoints.sync()

    def sync_log(self) -> None:
        with self._lock:
            self._log.sync()

    def close(self) -> None:
        with self._lock:
            self._log.close()
            self._checkpoints.close()

    def checkpoint(self, identity: Identity, *, sync: bool = True) -> dict[str, Any]:
        """Sign the chain's current head and append it (`sync`: and fsync it) to the checkpoints file."""
        with self._locked_log() as fd:
            head = self._last_entry(fd)[0] or {"seq": 0, "hash": GENESIS}
            checkpoint = sign_checkpoint(identity, int(head["seq"]), str(head["hash"]))
            out = self._checkpoints.fd()
            _write_all(out, (json.dumps(checkpoint, sort_keys=True) + "\n").encode())
            if sync:
                os.fsync(out)
        return checkpoint

    @staticmethod
    def verify(path: Path, checkpoints: list[dict[str, Any]] | None = None,
               signer: PublicIdentity | None = None) -> VerifyResult:
        """Check the hash chain, then that it still holds what every checkpoint vouches for
        (default: the checkpoints file beside the log). With `signer`, a checkpoint signed by
        any other key is itself a problem."""
        anchors = read_checkpoints(checkpoints_path(path)) if checkpoints is None else checkpoints
        chain = _walk_chain(path, {int(c["entries"]) for c in anchors if isinstance(c.get("entries"), int)})
        if isinstance(chain, VerifyResult):
            return chain
        count, heads = chain
        for anchor in sorted(anchors, key=lambda c: float(c.get("ts", 0))):
            try:
                who = checkpoint_signer(anchor)
            except ValueError as exc:
                return VerifyResult(False, count, f"{exc}: the checkpoint or its signature was altered", len(anchors))
            if signer is not None and who.fingerprint != signer.fingerprint:
                return VerifyResult(False, count, f"checkpoint of {anchor['ts']} was signed by {who.fingerprint}, "
                                    f"not by the pod ({signer.fingerprint})", len(anchors))
            vouched, when = int(anchor["entries"]), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(anchor["ts"]))
            if vouched > count:
                state = "missing" if not path.exists() else "empty" if count == 0 else f"truncated to {count} entries"
                return VerifyResult(False, count, f"log {state}: the checkpoint signed at {when} UTC vouches for "
                                    f"{vouched} entries", len(anchors))
            if vouched and heads.get(vouched) != anchor["head"]:
                return VerifyResult(False, count, f"entry {vouched} differs from the checkpoint signed at {when} UTC: "
                                    "the chain was rewritten and its hashes recomputed", len(anchors))
        note = None if anchors else "no checkpoint: deleted newest entries or a rewritten chain cannot be detected"
        return VerifyResult(True, count, None, len(anchors), note)


def _walk_chain(path: Path, wanted: set[int]) -> tuple[int, dict[int, str]] | VerifyResult:
    """The number of entries and the hashes at the `wanted` positions, or what is wrong."""
    heads: dict[int, str] = {}
    if not path.exists():
        return 0, heads
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
        if count in wanted:
            heads[count] = previous
    return count, heads


@dataclass
class Commit:
    """An entry on its way into the log: `written` once the OS has it (a crash of the pod can no
    longer lose it), `durable` once it is fsynced; each resolves to the entry as chained."""

    written: concurrent.futures.Future[dict[str, Any]]
    durable: concurrent.futures.Future[dict[str, Any]]

    @classmethod
    def new(cls) -> Commit:
        return cls(concurrent.futures.Future(), concurrent.futures.Future())

    def fail(self, exc: BaseException) -> None:
        for future in (self.written, self.durable):
            if not future.done():
                future.set_exception(exc)


_Pending = tuple[str, dict[str, Any], Commit | None]
CHECKPOINT = "\0checkpoint"  # a queued request to sign the head once everything before it is written


class AuditWriter:
    """Appends to an `AuditLog` from a thread, in batches (see the module docstring).

    `record` never blocks; `record_durably` waits (without blocking the event loop) until the
    entry is on disk. The queue is bounded (`MAX_QUEUED`): if a flood ever fills it, further
    records are counted in `dropped` instead of growing memory, and the count is itself
    written once there is room again. `checkpoint` signs the head (as `identity`) once every
    entry queued before it is written; the newest is kept in `latest_checkpoint`.
    """

    MAX_BATCH = 1000
    MAX_QUEUED = 10_000
    SYNC_EVERY_S = 1.0

    def __init__(self, log: AuditLog, identity: Identity | None = None) -> None:
        self.log = log
        self.identity = identity
        self.latest_checkpoint: dict[str, Any] | None = None
        self.dropped = 0
        self._reported_dropped = 0
        self._queue: queue.Queue[_Pending | None] = queue.Queue(self.MAX_QUEUED)
        self._synced = time.monotonic()
        self._unsynced = False
        self._thread = threading.Thread(target=self._run, name="fedpod-audit", daemon=True)
        self._thread.start()

    def record(self, event: str, **details: Any) -> None:
        self._put((event, details, None))

    def checkpoint(self) -> None:
        self._put((CHECKPOINT, {}, None))

    async def record_durably(self, event: str, **details: Any) -> dict[str, Any]:
        return await asyncio.wrap_future(self.commit(event, **details).durable)

    def commit(self, event: str, **details: Any) -> Commit:
        """Queue an entry that someone waits for: written, then fsynced (see `Commit`)."""
        commit = Commit.new()
        self._put((event, details, commit))
        return commit

    def _put(self, item: _Pending) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if item[2] is not None:
                item[2].fail(OSError("audit queue full"))

    def close(self) -> None:
        """Write everything queued, then stop the thread and close the files."""
        self._queue.put(None)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.log.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:  # wake up now and then to fsync what nothing waited for
                first = self._queue.get(timeout=self.SYNC_EVERY_S if self._unsynced else None)
            except queue.Empty:
                self._sync()
                continue
            batch: list[_Pending] = []
            if first is None:
                stopping = True
            else:
                batch.append(first)
                while len(batch) < self.MAX_BATCH:  # group commit: whatever queued up meanwhile
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
            if self.dropped != self._reported_dropped:
                batch.append(("audit-entries-dropped", {"count": self.dropped - self._reported_dropped}, None))
                self._reported_dropped = self.dropped
            entries = [item for item in batch if item[0] != CHECKPOINT]
            due = stopping or time.monotonic() - self._synced >= self.SYNC_EVERY_S
            if entries:
                self._write(entries, sync=due or any(commit is not None for _, _, commit in entries))
            if len(entries) != len(batch) and self.identity is not None:
                with contextlib.suppress(OSError):
                    self.latest_checkpoint = self.log.checkpoint(self.identity, sync=due)
                    self._unsynced = self._unsynced or not due
            if due and self._unsynced:
                self._sync()

    def _sync(self) -> None:
        with contextlib.suppress(OSError):
            self.log.sync()
        self._synced, self._unsynced = time.monotonic(), False

    def _write(self, batch: list[_Pending], *, sync: bool) -> None:
        """Chain and write `batch`; with `sync`, fsync it after telling those waiting that it is
        written (a pod starts the task then, and releases nothing before it is durable)."""
        commits = [commit for _, _, commit in batch]
        try:
            entries = self.log.append_many([(event, details) for event, details, _ in batch], sync=False)
            for commit, entry in zip(commits, entries, strict=True):
                if commit is not None:
                    commit.written.set_result(entry)
            if sync:
                self.log.sync_log()
        except Exception as exc:  # a full disk must not kill the writer: callers waiting hear of it
            for commit in commits:
                if commit is not None:
                    commit.fail(exc)
            return
        self._unsynced = self._unsynced or not sync  # `_sync` covers both files; a durable write, the log
        if sync and not self._unsynced:  # all that was written is on disk: the next timed sync is a second away
            self._synced = time.monotonic()  # (left stale, every later batch was fsynced: two fsyncs a task)
        for commit, entry in zip(commits, entries, strict=True):
            if commit is not None:
                commit.durable.set_result(entry)
