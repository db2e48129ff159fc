"""The floor under a round of many pods on this machine: bare nats-py processes that only pass
messages, with fedpod's round's sizes and shape but none of its work.

    python -m benchmarks.rounds.bare 100      # prints the medians; benchmarks.rounds.run tables them

Each "pod" is a Python process that connects to the same embedded NATS server (open: no
authentication) and answers on its own subject. Two kinds of round, timed from the first send
to the last answer, the modeller's side one asyncio process as fedpod's is:
- one exchange: the modeller sends every pod a request of a task's size, each answers with an
  update's bytes — the least any request/reply round can do, and fedpod's shape for a task done
  within 0.25 s, whose reply rides on the task's acknowledgement (`fedpod.channel`);
- two acknowledged deliveries: the modeller's request is acknowledged at once, then the pod sends
  its update as a request of its own, which the modeller acknowledges — fedpod's shape for a
  longer task (`Bus.send` twice).
Neither seals, audits, judges or trains: what fedpod spends beyond them is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import nats
from nats.aio.msg import Msg

TASK_BYTES = 6_500  # a small-model round's TrainRequest as fedpod sends it (benchmarks/rounds: 0.65 MB / 100 pods)
UPDATE_BYTES = 4_200  # its reply: 1,000 float32 and the result's fields
ONE, SHAPED = b"1", b"2"
MODELLER_SUBJECT = "bare.modeller"


def pod_subject(index: int) -> str:
    return f"bare.pod.{index}"


async def serve(url: str, index: int) -> None:
    """A bare pod: answers each request, in the round's kind."""
    connection = await nats.connect(url)
    update = b"u" * UPDATE_BYTES

    async def on_task(msg: Msg) -> None:
        if msg.data[:1] == ONE:
            await msg.respond(update)
            return
        await msg.respond(b"")
        await connection.request(MODELLER_SUBJECT, msg.data[1:17] + update, timeout=60)

    await connection.subscribe(pod_subject(index), cb=on_task)
    await connection.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def rounds(url: str, pods: int, count: int) -> tuple[list[float], list[float]]:
    """Seconds per round of each kind, `count` of each, alternating (this machine's noise hits both)."""
    connection = await nats.connect(url)
    waiting: dict[bytes, asyncio.Future[None]] = {}

    async def on_update(msg: Msg) -> None:
        await msg.respond(b"")
        future = waiting.pop(msg.data[:16], None)
        if future is not None:
            future.set_result(None)

    await connection.subscribe(MODELLER_SUBJECT, cb=on_update)
    task = b"t" * TASK_BYTES

    async def one_round() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(connection.request(pod_subject(i), ONE + task, timeout=60) for i in range(pods)))
        return time.perf_counter() - started

    async def shaped_round(number: int) -> float:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        keys = [f"{number:08d}{i:08d}".encode() for i in range(pods)]
        for key in keys:
            waiting[key] = loop.create_future()
        updates = [waiting[key] for key in keys]
        await asyncio.gather(*(connection.request(pod_subject(i), SHAPED + keys[i] + task, timeout=60)
                               for i in range(pods)))
        await asyncio.gather(*updates)
        return time.perf_counter() - started

    one, shaped = [], []
    for number in range(count + 1):  # the first of each warms the connections
        one.append(await one_round())
        shaped.append(await shaped_round(number))
    await connection.close()
    return one[1:], shaped[1:]


def measure(pods: int, count: int = 20) -> tuple[float, float]:
    """Median seconds per round, one exchange and two acknowledged deliveries, with `pods` bare pod processes."""
    from fedpod.transport.broker import EmbeddedBroker

    with EmbeddedBroker(open=True) as broker:
        processes = [subprocess.Popen([sys.executable, "-m", "benchmarks.rounds.bare", "--serve", broker.url, str(i)],
                                      stdout=subprocess.PIPE, text=True) for i in range(pods)]
        try:
            for process in processes:
                assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            time.sleep(1.0)
            one, shaped = asyncio.run(rounds(broker.url, pods, count))
        finally:
            for process in processes:
                process.kill()
                process.wait()
    return statistics.median(one), statistics.median(shaped)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pods", type=int, nargs="?", default=100)
    parser.add_argument("--serve", nargs=2, metavar=("URL", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve[0], int(args.serve[1])))
        return
    one, shaped = measure(args.pods)
    print(f"{args.pods} bare pods: one exchange {one:.4f} s/round, two acknowledged {shaped:.4f} s/round")


if __name__ == "__main__":
    main()
