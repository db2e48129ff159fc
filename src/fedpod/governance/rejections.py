"""Counting what a pod refuses, instead of writing it down message by message.

Anyone who can reach the broker can send a pod garbage, forged or replayed envelopes, or
signed tasks from keys nobody accepted. Writing one audit entry each would let a stranger fill
the disk and stall the pod with fsyncs. So refusals are counted by reason and summarised: one
`rejections` entry per window (`WINDOW_S`) with the counts and the first detail seen for each
reason. A denied task is audited in full (query hash and its first `QUERY_CHARS` characters)
once per sender and rule per window; repeats only count. Since anyone can make fresh keys,
"once per sender" alone bounds nothing: at most `AUDITED_PER_WINDOW` denials are written and
`REPLIES_PER_WINDOW` refusals answered per window over all senders, and at most
`TRACKED_SENDERS` senders are remembered (beyond that they are treated as repeats). Pure
bookkeeping: the caller supplies the clock and writes what `summary` returns.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

WINDOW_S = 60.0
QUERY_CHARS = 200
DETAIL_CHARS = 200
AUDITED_PER_WINDOW = 20
REPLIES_PER_SENDER = 20
REPLIES_PER_WINDOW = 200
TRACKED_SENDERS = 10_000


class RejectionTally:
    def __init__(self, started: float, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._window_start = started
        self._counts: Counter[str] = Counter()
        self._first_detail: dict[str, str] = {}
        self._denied: Counter[tuple[str, str]] = Counter()
        self._audited = 0
        self._replied = 0
        self.total: Counter[str] = Counter()

    def note(self, reason: str, detail: str = "") -> bool:
        """Count one refusal; True when it is the first of its reason in this window (worth a log line)."""
        first = reason not in self._counts
        self._counts[reason] += 1
        self.total[reason] += 1
        if first:
            self._first_detail[reason] = detail[:DETAIL_CHARS]
        return first

    def denial(self, sender: str, rule: str, *, auditable: bool = True) -> tuple[bool, bool]:
        """Count a denied request; returns whether to audit it in full and whether to answer it.
        A request that is never audited in full (`auditable=False`: discovery) spends none of
        the window's audit budget, which stays for denied tasks."""
        key = (sender, rule)
        if key not in self._denied and len(self._denied) >= TRACKED_SENDERS:
            self.note("denied-untracked", f"{sender} [{rule}]")
            return False, False
        self._denied[key] += 1
        seen = self._denied[key]
        audit = auditable and seen == 1 and self._audited < AUDITED_PER_WINDOW
        if audit:
            self._audited += 1
        else:
            self.note("denied-repeat" if seen > 1 else "denied-unaudited", f"{sender} [{rule}]")
        reply = seen <= REPLIES_PER_SENDER and self._replied < REPLIES_PER_WINDOW
        if reply:
            self._replied += 1
        return audit, reply

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
        self._audited = self._replied = 0
        if not counts:
            return None
        return {"window_s": seconds, "counts": counts, "first_detail": details}


def truncated(text: str) -> str:
    return text if len(text) <= QUERY_CHARS else text[:QUERY_CHARS] + "…"
