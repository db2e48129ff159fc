"""Pinned pods, like SSH's known_hosts — and the datasets each offered when it last answered.

A pod a task targets is pinned on first contact (trust on first use), unless the modeller asks
for `require_pinned`, in which case only pods pinned beforehand (`fedpod known-pods add NAME
FINGERPRINT`, the fingerprint compared out of band) are used. Pins are only ever consulted for
the pods a task targets: an impostor answering discovery under a pinned name is ignored and
reported, never fatal to a task that does not involve that pod.

The datasets (and their tags) a pinned pod advertised at the last discovery it answered are
remembered too, so that a task by tags knows what it should cover: a remembered dataset whose
pod does not answer is named as missing instead of silently left out of an aggregate.

File format (`known_pods.json`): `{pod: {"fingerprint": FP, "datasets": {name: [tags]}}}`; the
older `{pod: FP}` is read as pins without datasets.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from fedpod.errors import ConfigError
from fedpod.names import check_name


class KnownPods:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pods: dict[str, dict[str, Any]] = {}
        if path and path.exists():
            try:
                stored = json.loads(path.read_text())
                self._pods = {pod: entry if isinstance(entry, dict) else {"fingerprint": entry, "datasets": {}}
                              for pod, entry in stored.items()}
            except (ValueError, AttributeError) as exc:
                raise ConfigError(f"known pods file {path} is corrupt: {exc}",
                                  hint="fix it, or remove it to pin pods afresh") from exc

    def pinned(self, pod: str) -> str | None:
        with self._lock:
            entry = self._pods.get(pod)
            return str(entry["fingerprint"]) if entry else None

    def all(self) -> dict[str, str]:
        with self._lock:
            return {pod: str(entry["fingerprint"]) for pod, entry in self._pods.items()}

    def datasets(self, pod: str) -> dict[str, list[str]]:
        """The datasets (name -> tags) `pod` offered when it last answered discovery."""
        with self._lock:
            entry = self._pods.get(pod)
            return dict(entry.get("datasets", {})) if entry else {}

    def expected(self, tags: list[str]) -> list[str]:
        """Identifiers of remembered datasets that carry every tag in `tags`."""
        wanted = set(tags)
        with self._lock:
            return sorted(f"{pod}/{name}" for pod, entry in self._pods.items()
                          for name, carried in entry.get("datasets", {}).items() if wanted <= set(carried))

    def pin(self, pod: str, fingerprint: str, *, replace: bool = False) -> None:
        """Pin explicitly (before first contact, or after a pod's keys really changed)."""
        check_name(pod, "pod")
        with self._lock:
            current = self._pods.get(pod)
            if current is not None and current["fingerprint"] != fingerprint and not replace:
                raise ConfigError(f"pod {pod!r} is pinned to {current['fingerprint']}", where=str(self.path),
                                  hint="pass --replace if its keys really changed")
            if current is None or current["fingerprint"] != fingerprint:
                self._pods[pod] = {"fingerprint": fingerprint, "datasets": {}}
                self._save()

    def remove(self, pod: str) -> bool:
        with self._lock:
            found = self._pods.pop(pod, None) is not None
            self._save()
            return found

    def pin_on_first_use(self, pod: str, fingerprint: str) -> None:
        with self._lock:
            if pod not in self._pods:
                self._pods[pod] = {"fingerprint": fingerprint, "datasets": {}}
                self._save()

    def remember(self, pod: str, fingerprint: str, datasets: dict[str, list[str]]) -> None:
        """What a pinned pod offers now (only from the pinned key; a dataset it no longer offers
        was removed by its custodian and is no longer expected)."""
        with self._lock:
            entry = self._pods.get(pod)
            if entry is None or entry["fingerprint"] != fingerprint or entry.get("datasets") == datasets:
                return
            entry["datasets"] = datasets
            self._save()

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self._pods, indent=2, sort_keys=True))
