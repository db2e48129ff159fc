"""Approval of custom training-plan code, as in Fed-BioMed: a pod runs a modeller's plan only
once its custodian approved that exact source, identified by its SHA-256.

Each submitted source is kept under `storage/plans/<sha256>.py` with its status
(`pending`, `approved`, `rejected`) in `<sha256>.json`. The hash is always recomputed from the
source here; a hash claimed by the sender is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fedpod.errors import ConfigError

Status = Literal["pending", "approved", "rejected"]


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


class PlanRegistry:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()

    def _meta_path(self, sha: str) -> Path:
        return self.folder / f"{sha}.json"

    def _read(self, sha: str) -> dict[str, Any] | None:
        path = self._meta_path(sha)
        return json.loads(path.read_text()) if path.exists() else None

    def status(self, sha: str) -> Status | None:
        meta = self._read(sha)
        return None if meta is None else meta["status"]

    def submit(self, source: str, class_name: str, requester: str) -> tuple[str, Status]:
        """Record a plan seen in a task (pending if new); return its hash and status."""
        sha = source_hash(source)
        with self._lock:
            meta = self._read(sha)
            if meta is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                (self.folder / f"{sha}.py").write_text(source)
                meta = {"sha256": sha, "class": class_name, "requester": requester, "status": "pending",
                        "submitted": time.time()}
                self._meta_path(sha).write_text(json.dumps(meta, indent=2))
            return sha, meta["status"]

    def decide(self, sha_prefix: str, status: Status) -> dict[str, Any]:
        sha = self.resolve(sha_prefix)
        with self._lock:
            meta = self._read(sha) or {}
            meta.update(status=status, decided=time.time())
            self._meta_path(sha).write_text(json.dumps(meta, indent=2))
        return meta

    def resolve(self, sha_prefix: str) -> str:
        matches = [p.stem for p in self.folder.glob(f"{sha_prefix}*.json")] if len(sha_prefix) >= 6 else []
        if len(matches) != 1:
            raise ConfigError(f"{len(matches)} plans match {sha_prefix!r}",
                              hint="give at least 6 hex digits of the hash")
        return matches[0]

    def source(self, sha_prefix: str) -> str:
        return (self.folder / f"{self.resolve(sha_prefix)}.py").read_text()

    def entries(self) -> list[dict[str, Any]]:
        if not self.folder.exists():
            return []
        return sorted((json.loads(p.read_text()) for p in self.folder.glob("*.json")), key=lambda m: m["submitted"])
