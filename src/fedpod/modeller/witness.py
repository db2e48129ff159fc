"""The modeller as an outside witness of each pod's audit log.

A pod signs checkpoints of its audit chain's head and sends the latest with every result. The
custodian holds the pod's key, so it could rewrite its log and sign fresh checkpoints; what it
cannot do is change a checkpoint someone else already keeps. The modeller keeps them, one file
per pod (`<witness folder>/<pod>-<fingerprint>.jsonl`), and `fedpod audit verify --witness FILE`
checks a pod's log against them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from fedpod.governance.audit import checkpoint_signer
from fedpod.security.identity import PublicIdentity


class AuditWitness:
    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._last: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def keep(self, pod: PublicIdentity, checkpoint: dict[str, Any] | None) -> bool:
        """Store a checkpoint signed by `pod` (anything else is ignored); True if it was new."""
        if self.folder is None or not checkpoint:
            return False
        try:
            if checkpoint_signer(checkpoint).fingerprint != pod.fingerprint:
                return False
            head = (int(checkpoint["entries"]), str(checkpoint["head"]))
        except (ValueError, KeyError, TypeError):
            return False
        with self._lock:
            if self._last.get(pod.fingerprint) == head:
                return False
            if not self._last:  # the first checkpoint kept: the folder is made once, not per result
                self.folder.mkdir(parents=True, exist_ok=True)
            self._last[pod.fingerprint] = head
            with (self.folder / f"{pod.name}-{pod.fingerprint}.jsonl").open("a") as out:
                out.write(json.dumps(checkpoint, sort_keys=True) + "\n")
        return True
