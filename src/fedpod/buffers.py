"""Large buffers (a reassembled transfer, a sealed envelope's body) reused from round to round.

A fresh anonymous map costs its pages on first touch: on the 2-core machines measured, filling a
new 40 MB buffer took 19 ms against 2 ms for one already resident, and a 10-pod round of a 40 MB
model fills more than 800 MB of new buffers — the modeller's share (its 400 MB of replies) on the
one thread that also reads them off the socket. The same sizes come back every round (the same
model, sealed the same way), so a buffer whose last user let go is handed out again.

A buffer is lent as a `memoryview` of an anonymous map. It is free again once nothing holds a
view of it: the map then accepts being resized (to its own size, which changes nothing), which
it refuses while any view, NumPy array or slice of it is alive. Free buffers are kept for
`KEEP_S`, at most `KEEP_FREE` of them and `KEEP_FREE_BYTES` in all, then unmapped, so an idle
pod returns a round's memory to the system within a minute. A buffer over `POOLED_BYTES` is
never kept: it is unmapped as soon as its last view goes, as a plain map is. Its pages cost
little beside a round that moves it (0.2 s of a 400 MB model's 8-20 s round), and keeping it
would hold hundreds of MB in every process between rounds: the large-model benchmark's three
pods and modeller peaked at 6.9 GiB together that way, 4.7 without. Whoever takes a buffer
overwrites what it reads: the bytes of an earlier use are never shown (`take` returns exactly
`size` bytes, all to be written by the caller).
"""

from __future__ import annotations

import mmap
import threading
import time
from dataclasses import dataclass

GRAIN = 2 * 1024 * 1024  # capacities in whole huge pages, so that sizes a few bytes apart share buffers
SLACK = 1 / 8  # a free buffer serves a request up to this fraction (plus a grain) smaller than itself
KEEP_S = 30.0
KEEP_FREE = 16
KEEP_FREE_BYTES = 512 * 1024 * 1024
POOLED_BYTES = 128 * 1024 * 1024


@dataclass
class _Held:
    buffer: mmap.mmap
    freed_at: float | None = None  # when it was last seen free; None while lent


class LargeBuffers:
    """A pool of anonymous maps; `take` is safe from any thread."""

    def __init__(self, keep_s: float = KEEP_S, keep_free: int = KEEP_FREE, keep_free_bytes: int = KEEP_FREE_BYTES,
                 pooled_bytes: int = POOLED_BYTES) -> None:
        self.keep_s, self.keep_free, self.keep_free_bytes, self.pooled_bytes = \
            keep_s, keep_free, keep_free_bytes, pooled_bytes
        self._held: list[_Held] = []
        self._lock = threading.Lock()
        self._trimmer: threading.Timer | None = None
        self.reused = self.mapped = 0

    def take(self, size: int, *, populate: bool = False) -> memoryview:
        """`size` writable bytes, of a resident buffer when one fits. `populate`: a new buffer's
        pages are faulted in at once (cheaper than one by one, for a caller about to write it
        all); otherwise they come as they are written (a transfer, whose bytes arrive over time)."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        if size > self.pooled_bytes:
            return memoryview(self._map(size, flags))
        with self._lock:
            now = time.monotonic()
            self._sweep(now)
            fits = [h for h in self._held
                    if h.freed_at is not None and size <= len(h.buffer) <= size * (1 + SLACK) + GRAIN]
            if fits:
                held = min(fits, key=lambda h: len(h.buffer))
                held.freed_at = None
                self.reused += 1
                return memoryview(held.buffer)[:size]
            buffer = self._map(-(-max(size, 1) // GRAIN) * GRAIN, flags)
            self._held.append(_Held(buffer))
            self.mapped += 1
            self._schedule_trim()
            return memoryview(buffer)[:size]

    @staticmethod
    def _map(size: int, flags: int) -> mmap.mmap:
        buffer = mmap.mmap(-1, size, flags=flags)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buffer.madvise(mmap.MADV_HUGEPAGE)  # a third fewer page faults filling 400 MB
        return buffer

    @property
    def resident_bytes(self) -> int:
        """Capacity of every buffer held, lent or free."""
        with self._lock:
            return sum(len(h.buffer) for h in self._held)

    def trim(self) -> None:
        """Unmap buffers free for longer than `keep_s` (and beyond the `keep_free` most recent)."""
        with self._lock:
            self._sweep(time.monotonic())
            self._trimmer = None
            self._schedule_trim()

    def _sweep(self, now: float) -> None:
        for held in self._held:
            if held.freed_at is None and not _lent(held.buffer):
                held.freed_at = now
        free = sorted((h for h in self._held if h.freed_at is not None), key=lambda h: h.freed_at or 0.0, reverse=True)
        kept = 0
        for rank, held in enumerate(free):
            if rank >= self.keep_free or kept + len(held.buffer) > self.keep_free_bytes \
                    or now - (held.freed_at or now) >= self.keep_s:
                self._held.remove(held)
                held.buffer.close()
            else:
                kept += len(held.buffer)

    def _schedule_trim(self) -> None:
        if self._trimmer is None and self._held:
            self._trimmer = threading.Timer(self.keep_s / 2, self.trim)
            self._trimmer.daemon = True
            self._trimmer.start()


def _lent(buffer: mmap.mmap) -> bool:
    try:
        buffer.resize(len(buffer))
    except BufferError:
        return True
    return False


LARGE_BUFFERS = LargeBuffers()
