"""The round models cast to a pod (`wire.messages.ModelCast`), kept until the TrainRequest that
names them arrives — right after, since a modeller sends its requests once the cast is acknowledged.

Only accepted modellers can cast to a pod (the transfer layer admits large messages from them
alone), and what each may leave here is bounded: its KEPT_PER_MODELLER latest casts, each for
at most KEPT_FOR_S.
"""

from __future__ import annotations

import threading
import time

from fedpod.wire.messages import BulkParts

KEPT_PER_MODELLER = 2
KEPT_FOR_S = 600.0


class ModelCasts:
    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], tuple[float, BulkParts]] = {}  # (modeller, cast id) -> (when, tensors)
        self._lock = threading.Lock()  # kept on the event loop, taken in a worker thread

    def keep(self, modeller: str, cast_id: str, tensors: BulkParts) -> None:
        now = time.monotonic()
        with self._lock:
            self._forget_old(now)
            own = [key for key in self._kept if key[0] == modeller]
            for key in own[: max(len(own) - KEPT_PER_MODELLER + 1, 0)]:  # insertion order: the oldest first
                del self._kept[key]
            self._kept[(modeller, cast_id)] = (now, tensors)

    def take(self, modeller: str, cast_id: str) -> BulkParts | None:
        """The tensors `modeller` cast as `cast_id`, handed over once; None if they never arrived,
        or are gone."""
        with self._lock:
            self._forget_old(time.monotonic())
            kept = self._kept.pop((modeller, cast_id), None)
        return None if kept is None else kept[1]

    def _forget_old(self, now: float) -> None:
        for key in [key for key, (when, _) in self._kept.items() if now - when > KEPT_FOR_S]:
            del self._kept[key]
