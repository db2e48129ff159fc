"""Benchmark: large payloads through fedpod's envelope path vs raw nats-py, same broker.

    python -m benchmarks.transport.run      # rewrites benchmarks/transport/results.md

Both paths move the payload to a receiver in another process over the embedded NATS server
(stock 1 MiB max_payload) and count as done when the receiver holds the whole payload and
has verified it:
- raw: nats-py publishes 1 MiB chunks, every 16th as a request the receiver acknowledges (plain
  publishes with no flow control overran the receiver and lost chunks at 400 MB); the receiver
  reassembles them and checks the digest fedpod uses (`security.digest`, BLAKE3) of the whole;
- fedpod: `SecureChannel.send` — msgpack message, AES-GCM encryption, Ed25519-signed envelope,
  chunked after the receiver admits the transfer, every 4th chunk acknowledged (a smaller
  window than raw's 16, to serve many senders at once); the receiver verifies, decrypts and decodes.
The receiver answers on a `done` subject; the sender times from start to that answer.
Target: fedpod >= 50% of raw throughput. A second table (`envelope_cost`) states what sealing the
metadata costs per message against the previous, plaintext-header envelope.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

from benchmarks.report import machine, publish
from benchmarks.transport import envelope_cost
from fedpod.channel import SecureChannel
from fedpod.security.digest import bulk_digest
from fedpod.security.envelope import Opened
from fedpod.security.identity import Identity, PublicIdentity
from fedpod.transport.broker import EmbeddedBroker
from fedpod.transport.bus import BrokerOptions, Bus
from fedpod.wire.codec import unpack
from fedpod.wire.messages import TaskResult

HERE = Path(__file__).parent
RAW_SUBJECT, DONE_SUBJECT = "bench.raw", "bench.done"
CHUNK = 1024 * 1024 - 1024
WINDOW = 16  # an acknowledged request every 16 chunks: without flow control the receiver is overrun


async def receiver(url: str, keystore: Path) -> None:
    identity = Identity.load("receiver", keystore)
    raw = await nats.connect(url)
    transfers: dict[str, bytearray] = {}
    received: dict[str, int] = {}

    async def on_raw(msg: nats.aio.msg.Msg) -> None:
        headers = msg.headers or {}
        key, size, offset = headers["id"], int(headers["size"]), int(headers["offset"])
        if key not in transfers:
            transfers[key] = bytearray(size)
        buffer = transfers[key]
        buffer[offset : offset + len(msg.data)] = msg.data
        received[key] = received.get(key, 0) + len(msg.data)
        if msg.reply:
            await msg.respond(b"")
        if received[key] == size:
            digest = bulk_digest(transfers.pop(key)).hex()
            await raw.publish(DONE_SUBJECT, json.dumps({"id": key, "digest": digest}).encode())

    await raw.subscribe(RAW_SUBJECT, cb=on_raw, pending_bytes_limit=2 * 1024**3, pending_msgs_limit=-1)
    channel = SecureChannel(await Bus.connect(BrokerOptions(url)), identity)

    async def on_opened(opened: Opened) -> None:
        result = unpack(opened.payload, TaskResult)
        await raw.publish(DONE_SUBJECT, json.dumps({"id": result.task_id, "bytes": len(result.table)}).encode())

    async def on_rejected(exc: Exception) -> None:
        print("rejected", exc, file=sys.stderr)

    await channel.listen_inbox(on_opened, on_rejected)
    await raw.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def measure(url: str, receiver_public: PublicIdentity, sizes: list[int], runs: dict[int, int]) -> dict:  # type: ignore[type-arg]
    raw = await nats.connect(url)
    done: asyncio.Queue[dict] = asyncio.Queue()  # type: ignore[type-arg]

    async def on_done(msg: nats.aio.msg.Msg) -> None:
        await done.put(json.loads(msg.data))

    await raw.subscribe(DONE_SUBJECT, cb=on_done)
    channel = SecureChannel(await Bus.connect(BrokerOptions(url)), Identity.generate("sender"))
    results: dict[int, dict[str, list[float]]] = {}
    for size in sizes:
        blob = os.urandom(size)
        view = memoryview(blob)
        timings: dict[str, list[float]] = {"raw": [], "fedpod": []}
        for run in range(runs[size] + 1):
            key = f"raw-{size}-{run}"
            started = time.perf_counter()
            offsets = range(0, size, CHUNK)
            for index, offset in enumerate(offsets):
                headers = {"id": key, "size": str(size), "offset": str(offset)}
                chunk = bytes(view[offset : offset + CHUNK])
                if (index + 1) % WINDOW == 0 or index == len(offsets) - 1:
                    await raw.request(RAW_SUBJECT, chunk, headers=headers, timeout=60)
                else:
                    await raw.publish(RAW_SUBJECT, chunk, headers=headers)
            answer = await asyncio.wait_for(done.get(), 60)
            raw_s = time.perf_counter() - started
            assert answer["digest"] == bulk_digest(blob).hex(), "raw payload corrupted"
            started = time.perf_counter()
            await channel.send(receiver_public, TaskResult(task_id=f"fp-{run}", dataset="bench", table=blob,
                                                           seconds=0), timeout_s=600)
            answer = await asyncio.wait_for(done.get(), 60)
            fedpod_s = time.perf_counter() - started
            assert answer["bytes"] == size
            if run:  # the first run of each size warms up both paths
                timings["raw"].append(raw_s)
                timings["fedpod"].append(fedpod_s)
        results[size] = timings
        del blob, view
    await raw.close()
    await channel.bus.close()
    return results


def throughput(sizes: list[int], runs: dict[int, int]) -> dict[int, tuple[float, float, int]]:
    """Median MB/s of raw nats-py and of fedpod's envelope path per payload size, and the number
    of measured runs; the receiver is a separate process on a fresh embedded broker."""
    keystore = Path(tempfile.mkdtemp(prefix="fedpod-bench-transport-"))
    receiver_identity = Identity.generate("receiver")
    receiver_identity.save(keystore)
    # Open (no authentication): the raw nats-py baseline uses subjects that a broker configured by
    # fedpod grants to nobody. Authentication costs a signature at connect, not per message.
    with EmbeddedBroker(open=True) as broker:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.transport.run", "--receiver", broker.url,
                                    str(keystore)], cwd=HERE.parents[1],
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            results = asyncio.run(measure(broker.url, receiver_identity.public, sizes, runs))
        finally:
            process.terminate()
            process.wait()
    return {size: (size / 1e6 / statistics.median(timings["raw"]), size / 1e6 / statistics.median(timings["fedpod"]),
                   len(timings["raw"])) for size, timings in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", default="40,400")
    parser.add_argument("--runs", default="5,3", help="measured runs per size")
    args = parser.parse_args()
    sizes = [int(s) * 1_000_000 for s in args.sizes_mb.split(",")]
    rates = throughput(sizes, dict(zip(sizes, [int(r) for r in args.runs.split(",")], strict=True)))
    lines = [
        "# Large payloads: fedpod envelopes vs raw nats-py",
        "",
        f"`python -m benchmarks.transport.run` — sender and receiver in separate processes, embedded NATS "
        f"server with the stock 1 MiB max_payload, payload verified at the receiver (raw: its BLAKE3 "
        f"digest; fedpod: chunk digests, signature, AES-GCM). One warm-up run per size, then medians. "
        f"Machine: {machine()}.",
        "",
        "| payload | runs | raw nats-py (MB/s) | fedpod envelope path (MB/s) | fedpod / raw |",
        "|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for size, (raw_rate, fedpod_rate, count) in rates.items():
        ratio = fedpod_rate / raw_rate
        verdicts.append(ratio >= 0.5)
        lines.append(f"| {size // 1_000_000} MB | {count} | {raw_rate:.0f} | {fedpod_rate:.0f} | {ratio:.0%} |")
    lines += ["", f"Target (fedpod >= 50% of raw throughput): **{'met' if all(verdicts) else 'NOT met'}**.", ""]
    lines += [*envelope_cost.table(), ""]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--receiver":
        asyncio.run(receiver(sys.argv[2], Path(sys.argv[3])))
    else:
        main()
