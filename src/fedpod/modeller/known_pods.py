"""Trust on first use for pods, like SSH's known_hosts: the first fingerprint seen for a pod
name is pinned; a different one later is refused until the user removes the old pin."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from fedpod.errors import TrustError


class KnownPods:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pins: dict[str, str] = json.loads(path.read_text()) if path and path.exists() else {}

    def check(self, pod: str, fingerprint: str) -> None:
        with self._lock:
            pinned = self._pins.get(pod)
            if pinned is None:
                self._pins[pod] = fingerprint
                if self.path is not None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self.path.write_text(json.dumps(self._pins, indent=2, sort_keys=True))
            elif pinned != fingerprint:
                raise TrustError(f"pod {pod!r} presented fingerprint {fingerprint}, but {pinned} is pinned",
                                 where=str(self.path), hint="if the pod's keys really changed, remove its line")
