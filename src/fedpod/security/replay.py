"""Replay protection that survives a restart.

An envelope is valid for `max_age_s` (5 minutes) after it was sealed. An in-memory guard
forgets every nonce when the process restarts, so an envelope captured off the wire and
replayed after a pod restart, within that window, would run again. `DurableReplayGuard` keeps
the nonces of *trusted* senders (the modellers a pod accepts: the only ones whose envelopes
have effects) in a file beside the pod's storage, reloads them at start and forgets them once
they are older than the window. Their entries are never evicted to make room, so a stranger's
flood of signed envelopes (kept in the base class's bounded, in-memory set) cannot push a
modeller's nonce out and make its envelope replayable.

Each remembered nonce is written (56 bytes) and flushed at once; the file is fsynced at most
once a second. A process crash loses nothing (the bytes are in the OS); a power cut can lose
the last second's nonces. The file is compacted at start and whenever it holds more than
twice the live entries.
"""

from __future__ import annotations

import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from fedpod.security.envelope import DEFAULT_MAX_AGE_S, DEFAULT_MAX_SKEW_S, ReplayGuard
from fedpod.security.identity import PublicIdentity

_RECORD = struct.Struct(">32s16sd")
FSYNC_EVERY_S = 1.0


class DurableReplayGuard(ReplayGuard):
    def __init__(self, path: Path, trusted: Callable[[str], bool], max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        super().__init__(max_age_s)
        self.path = path
        self.trusted = trusted
        self._durable: OrderedDict[tuple[bytes, bytes], float] = OrderedDict()
        self._written = 0
        self._synced = time.monotonic()
        self._load()

    def _load(self) -> None:
        now = time.time()
        data = self.path.read_bytes() if self.path.exists() else b""
        usable = len(data) - len(data) % _RECORD.size  # a torn last record (crash mid-write) is dropped
        for sender, nonce, ts in _RECORD.iter_unpack(data[:usable]):
            if now - ts <= self.max_age_s + DEFAULT_MAX_SKEW_S:
                self._durable[(sender, nonce)] = ts
        self._compact()

    def _compact(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_bytes(b"".join(_RECORD.pack(s, n, ts) for (s, n), ts in self._durable.items()))
        os.replace(partial, self.path)
        self._written = len(self._durable)
        self._file = self.path.open("ab", buffering=0)

    def seen(self, sender: PublicIdentity, nonce: bytes) -> bool:
        with self._lock:
            if (sender.sign_public, nonce) in self._durable:
                return True
        return super().seen(sender, nonce)

    def check_and_remember(self, sender: PublicIdentity, nonce: bytes, ts: float, now: float) -> bool:
        if not self.trusted(sender.fingerprint):
            return super().check_and_remember(sender, nonce, ts, now)
        key = (sender.sign_public, nonce)
        with self._lock:
            if not self._remember(self._durable, key, ts, now, None):
                return False
            if self._written > 2 * len(self._durable) + 1000:
                self._file.close()
                self._compact()
            else:
                self._file.write(_RECORD.pack(*key, ts))
                self._written += 1
            if time.monotonic() - self._synced >= FSYNC_EVERY_S:
                os.fsync(self._file.fileno())
                self._synced = time.monotonic()
            return True

    def close(self) -> None:
        with self._lock:
            os.fsync(self._file.fileno())
            self._file.close()
