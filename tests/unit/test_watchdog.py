"""The engine's query deadlines: an overrun is interrupted, a finished query never is, one thread serves all."""

from __future__ import annotations

import threading
import time

from fedpod.algorithms.sql.watchdog import Watchdog


def test_a_block_past_its_deadline_is_interrupted_once() -> None:
    watchdog, interrupted = Watchdog(), threading.Event()
    calls: list[float] = []
    started = time.monotonic()
    with watchdog.deadline(0.05, lambda: (calls.append(time.monotonic() - started), interrupted.set())):
        assert interrupted.wait(5)
    time.sleep(0.05)
    assert len(calls) == 1 and calls[0] >= 0.05


def test_a_block_that_ends_in_time_is_never_interrupted_and_one_thread_serves_every_deadline() -> None:
    watchdog, calls = Watchdog(), []
    before = threading.active_count()
    for _ in range(500):
        with watchdog.deadline(0.02, lambda: calls.append(1)):
            pass
    assert threading.active_count() <= before + 1
    with watchdog.deadline(0.01, lambda: calls.append(2)):
        time.sleep(0.1)  # a later, overrunning block is still caught among 500 finished ones
    time.sleep(0.05)
    assert calls == [2]
    watchdog.stop()


def test_deadlines_fire_in_order_whatever_order_they_were_set() -> None:
    watchdog, fired = Watchdog(), []
    done = threading.Event()

    def hold(seconds: float, name: str) -> None:
        with watchdog.deadline(seconds, lambda: fired.append(name)):
            done.wait(5)

    threads = [threading.Thread(target=hold, args=(s, n)) for s, n in ((0.3, "late"), (0.05, "early"))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    done.set()
    for thread in threads:
        thread.join()
    assert fired == ["early", "late"]
