"""Pinned pod fingerprints, like SSH's known_hosts.

A pod a task targets is pinned on first contact (trust on first use), unless the modeller asks
for `require_pinned`, in which case only pods pinned beforehand (`fedpod known-pods add NAME
FINGERPRINT`, the fingerprint compared out of band) are used. Pins are only ever consulted for
the pods a task targets: an impostor answering discovery under a pinned name is ignored and
reported, never fatal to a task that does not involve that pod.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from fedpod.errors import ConfigError
from fedpod.names import check_name


class KnownPods:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pins: dict[str, str] = json.loads(path.read_text()) if path and path.exists() else {}

    def pinned(self, pod: str) -> str | None:
        with self._lock:
            return self._pins.get(pod)

    def all(self) -> dict[str, str]:
        with self._lock:
            return dict(self._pins)

    def pin(self, pod: str, fingerprint: str, *, replace: bool = False) -> None:
        """Pin explicitly (before first contact, or after a pod's keys really changed)."""
        check_name(pod, "pod")
        with self._lock:
            current = self._pins.get(pod)
            if current is not None and current != fingerprint and not replace:
                raise ConfigError(f"pod {pod!r} is pinned to {current}", where=str(self.path),
                                  hint="pass --replace if its keys really changed")
            self._pins[pod] = fingerprint
            self._save()

    def remove(self, pod: str) -> bool:
        with self._lock:
            found = self._pins.pop(pod, None) is not None
            self._save()
            return found

    def pin_on_first_use(self, pod: str, fingerprint: str) -> None:
        with self._lock:
            if pod not in self._pins:
                self._pins[pod] = fingerprint
                self._save()

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self._pins, indent=2, sort_keys=True))
