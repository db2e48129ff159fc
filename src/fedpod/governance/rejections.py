"""Counting what a pod refuses, instead of writing it down message by message.

Anyone who can reach the broker can send a pod garbage, forged or replayed envelopes, or
signed tasks from keys nobody accepted. Writing one audit entry each would let a stranger fill
the disk and stall the pod with fsyncs. So refusals are counted by reason and summarised: one
`rejections` entry per window (`WINDOW_S`) with the counts and the first detail seen for each
reason. A denied task is audited in full (query hash and its first `QUERY_CHARS` characters)
once per sender and rule per window; repeats only count. Pure bookkeeping: the caller
supplies the clock and writes what `summary` returns.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

WINDOW_S = 60.0
QUERY_CHARS = 200
DETAIL_CHARS = 200


class RejectionTally:
    def __init__(self, started: float, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._window_start = started
        self._counts: Counter[str] = Counter()
        self._first_detail: dict[str, str] = {}
        self._denied: Counter[tuple[str, str]] = Counter()
        self.total: Counter[str] = Counter()

    def note(self, reason: str, detail: str = "") -> bool:
        """Count one refusal; True when it is the first of its reason in this window (worth a log line)."""
        first = reason not in self._counts
        self._counts[reason] += 1
        self.total[reason] += 1
        if first:
            self._first_detail[reason] = detail[:DETAIL_CHARS]
        return first

    def denial(self, sender: str, rule: str) -> int:
        """Count a denied task; returns how many `sender` had under `rule` in this window. The
        first is audited in full; later ones are counted as `denied-repeat`."""
        key = (sender, rule)
        self._denied[key] += 1
        if self._denied[key] > 1:
            self.note("denied-repeat", f"{sender} [{rule}]")
        return self._denied[key]

    def summary(self, now: float, *, force: bool = False) -> dict[str, Any] | None:
        """The entry to write when the window is over (or `force`), then a fresh window."""
        if not force and now - self._window_start < self.window_s:
            return None
        counts, details = dict(self._counts), dict(self._first_detail)
        seconds = round(now - self._window_start, 1)
        self._window_start = now
        self._counts.clear()
        self._first_detail.clear()
        self._denied.clear()
        if not counts:
            return None
        return {"window_s": seconds, "counts": counts, "first_detail": details}


def truncated(text: str) -> str:
    return text if len(text) <= QUERY_CHARS else text[:QUERY_CHARS] + "…"
