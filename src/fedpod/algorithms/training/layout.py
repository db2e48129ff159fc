"""Which input features a pod's training data holds, and in what order, so that the modeller
can refuse to average models whose input j means different things at different pods.

`fedpod.journeys.to_tensor` reports its feature names here while a pod builds a plan's
training data; a plan may also report its own with `report_features`. Only a digest of the
names leaves the pod: the modeller learns whether two pods agree, not their codes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

_reported: ContextVar[list[tuple[str, ...]] | None] = ContextVar("fedpod_feature_layout", default=None)


def report_features(names: Sequence[str]) -> None:
    """Record the feature names, in order, of data being built for training (a no-op elsewhere)."""
    reported = _reported.get()
    if reported is not None:
        reported.append(tuple(map(str, names)))


@contextmanager
def recording() -> Iterator[list[tuple[str, ...]]]:
    """Collect what `report_features` is told within the block (every call, in order)."""
    reported: list[tuple[str, ...]] = []
    token = _reported.set(reported)
    try:
        yield reported
    finally:
        _reported.reset(token)


def layout_digest(reported: list[tuple[str, ...]]) -> str | None:
    """A short digest of everything reported, None if nothing was."""
    if not reported:
        return None
    text = "\x1e".join("\x1f".join(names) for names in reported)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def disagreement(layouts: dict[str, str | None]) -> str | None:
    """None if every pod that reported a layout reported the same one; otherwise a sentence
    naming which pods agree with which (the largest group first)."""
    groups: dict[str, list[str]] = {}
    for pod, digest in layouts.items():
        if digest is not None:
            groups.setdefault(digest, []).append(pod)
    if len(groups) <= 1:
        return None
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1]))
    return "; ".join(f"{', '.join(sorted(pods))} built features {digest}" for digest, pods in ordered)
