"""Large buffers are lent again only once nothing holds them, and given back to the system."""

from __future__ import annotations

import time

import numpy as np

from fedpod.buffers import GRAIN, LargeBuffers

MB = 1024 * 1024


def test_a_buffer_is_lent_again_once_its_views_are_gone() -> None:
    pool = LargeBuffers()
    first = pool.take(5 * MB)
    first[:3] = b"abc"
    address = np.frombuffer(first, dtype=np.uint8).ctypes.data
    del first
    second = pool.take(5 * MB - 100)  # a few bytes apart: the same buffer serves
    assert (pool.mapped, pool.reused) == (1, 1)
    assert len(second) == 5 * MB - 100
    assert np.frombuffer(second, dtype=np.uint8).ctypes.data == address


def test_a_buffer_still_viewed_by_an_array_or_slice_is_never_lent_twice() -> None:
    pool = LargeBuffers()
    taken = pool.take(4 * MB)
    array = np.frombuffer(taken[MB:], dtype=np.float32)  # what a decoded update holds
    del taken
    other = pool.take(4 * MB)
    assert pool.mapped == 2
    other[:] = b"\xff" * len(other)
    assert not array.any(), "writing the second buffer must not touch the first"
    chunk = other[:16]
    del other
    pool.take(4 * MB)
    assert pool.mapped == 3, "a slice alone keeps its buffer lent"
    del chunk


def test_a_much_smaller_request_gets_its_own_buffer() -> None:
    pool = LargeBuffers()
    pool.take(64 * MB)
    pool.take(MB)
    assert (pool.mapped, pool.reused) == (2, 0)


def test_free_buffers_are_unmapped_after_keep_s_and_beyond_keep_free() -> None:
    pool = LargeBuffers(keep_s=0.2, keep_free=2)
    views = [pool.take(GRAIN) for _ in range(4)]
    del views
    pool.trim()
    assert pool.resident_bytes == 2 * GRAIN, "only keep_free free buffers are kept"
    time.sleep(0.25)
    pool.trim()
    assert pool.resident_bytes == 0
    lent = pool.take(GRAIN)
    time.sleep(0.25)
    pool.trim()
    assert pool.resident_bytes == GRAIN, "a lent buffer is never unmapped"
    del lent


def test_a_buffer_over_pooled_bytes_is_never_kept_and_free_ones_stay_within_keep_free_bytes() -> None:
    pool = LargeBuffers(keep_free_bytes=3 * GRAIN, pooled_bytes=4 * GRAIN)
    big = pool.take(5 * GRAIN)
    assert len(big) == 5 * GRAIN and pool.resident_bytes == 0, "a large map is the caller's alone"
    del big
    views = [pool.take(GRAIN), pool.take(GRAIN), pool.take(2 * GRAIN)]
    del views
    pool.trim()
    assert pool.resident_bytes <= 3 * GRAIN
