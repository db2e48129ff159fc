"""Bytes in, bytes out over NATS — of any size. The only module that imports `nats`.

Messages larger than the server's `max_payload` travel as chunks with transfer headers and
are reassembled into one preallocated buffer at the receiver. Flow control has two levels:

- Admission, decided by the receiver. A chunked transfer opens with an empty "begin" request
  that the receiver answers only when fewer than `MAX_ACTIVE_TRANSFERS` transfers are in
  progress (or with a refusal, e.g. too large). The server buffers up to `max_pending`
  (64 MB by default) of what a client has not read yet and cuts it off as a slow consumer
  beyond that; a per-sender window alone cannot bound this once enough pods reply at once
  (twelve 4 MiB windows tripped it), so the receiver caps how many senders stream to it.
- A window per transfer: every `WINDOW`-th chunk (and the last) is a request that the
  receiver acknowledges once the chunk is stored, so one fast sender cannot overrun it.

A send to an inbox nobody listens on fails at once (`PodUnreachable`) instead of vanishing.
Integrity of the reassembled bytes is the envelope's job (GCM tag or signed digest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from fedpod.errors import BrokerUnavailable, PodUnreachable, TaskTimeout, TransportError
from fedpod.transport import subjects

log = logging.getLogger(__name__)

Payload = bytes | bytearray
Handler = Callable[[Payload], Awaitable[None]]

H_TRANSFER = "Fedpod-Transfer"
H_OFFSET = "Fedpod-Offset"
H_SIZE = "Fedpod-Size"
H_BEGIN = "Fedpod-Begin"
WINDOW = 4  # chunks in flight per transfer
MAX_ACTIVE_TRANSFERS = 6  # x WINDOW x 1 MiB stays well under the server's default max_pending (64 MB)
ADMISSION_TIMEOUT_S = 600.0  # a live receiver may keep a sender waiting this long behind others
HEADER_ALLOWANCE = 1024
DEFAULT_MAX_TRANSFER_BYTES = 4 * 1024**3
STALE_TRANSFER_S = 120.0


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to authenticate: a URL plus optional TLS and credentials."""

    url: str = "nats://127.0.0.1:4222"
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    creds: Path | None = None
    connect_timeout_s: float = 5.0

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert or self.url.startswith("tls://")):
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return context


class Login(Protocol):
    """What a party logs in to the broker with: its identity (see `security.identity`)."""

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def nats_seed(self) -> str: ...


@dataclass
class _Transfer:
    buffer: bytearray
    received: int = 0
    touched: float = field(default_factory=time.monotonic)


class Bus:
    """A connection to the broker. Create with `await Bus.connect(options)`."""

    def __init__(self, client: Client, *, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> None:
        self._client = client
        self.max_transfer_bytes = max_transfer_bytes
        self._transfers: dict[str, _Transfer] = {}
        self._admission = asyncio.Semaphore(MAX_ACTIVE_TRANSFERS)
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped_transfers = 0

    @classmethod
    async def connect(cls, options: BrokerOptions, *, name: str = "fedpod", reconnect_forever: bool = False,
                      login: Login | None = None) -> Bus:
        """Connect as `login` (its nkey, unless a credentials file is given; its replies under
        its own subject prefix, which is all a broker configured by fedpod lets it read)."""
        created: list[Bus] = []
        seen: list[Exception] = []  # nats-py reports an auth refusal to error_cb, then "no servers"
        extra: dict[str, str] = {}
        if login is not None:
            extra["inbox_prefix"] = subjects.replies(login.fingerprint)
            if options.creds is None:
                extra["nkeys_seed_str"] = login.nats_seed

        async def on_error(exc: Exception) -> None:
            await _log_error(exc, seen)

        async def on_reconnected() -> None:
            if created:
                created[0].abandon_transfers()

        try:
            client = await nats.connect(
                options.url,
                name=name,
                tls=options.ssl_context(),
                user_credentials=str(options.creds) if options.creds else None,
                connect_timeout=options.connect_timeout_s,
                allow_reconnect=True,
                max_reconnect_attempts=-1 if reconnect_forever else 10,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                reconnected_cb=on_reconnected,
                **extra,
            )
        except nats.errors.Error as exc:
            refusal = next((e for e in [exc, *seen] if "authorization" in str(e).lower()), None)
            if refusal is not None:
                who = f"{login.name} ({login.fingerprint})" if login else "an anonymous client"
                raise BrokerUnavailable(f"the broker at {options.url} refused {who}: {refusal}",
                                        hint="ask the broker's operator to let this party in "
                                             "(`fedpod broker allow --role pod|modeller NAME.pub`)") from exc
            raise BrokerUnavailable(f"cannot connect to NATS at {options.url}: {exc}",
                                    hint="start one with `fedpod broker start` or pass --broker") from exc
        except (OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot connect to NATS at {options.url}: {exc}",
                                    hint="start one with `fedpod broker start` or pass --broker") from exc
        created.append(cls(client))
        return created[0]

    def abandon_transfers(self) -> None:
        """After a reconnection no transfer in progress can go on (its sender's requests failed
        with the old connection, and it resends whole): free their slots now rather than
        after STALE_TRANSFER_S, so a restarted broker does not stall the next replies."""
        for transfer_id in list(self._transfers):
            self._finish(transfer_id)
            self.dropped_transfers += 1

    @property
    def chunk_size(self) -> int:
        return max(4096, self._client.max_payload - HEADER_ALLOWANCE)

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._client.drain()
        with contextlib.suppress(Exception):
            await self._client.close()

    async def subscribe(self, subject: str, handler: Handler) -> None:
        """Deliver each whole message (reassembled if chunked) to `handler` in its own task,
        so that a slow handler never stalls the subscription (or a pod's heartbeats). Returns
        once the server has registered the subscription."""

        async def on_message(msg: Msg) -> None:
            if msg.headers and H_BEGIN in msg.headers:
                self._spawn(self._admit(msg))  # waiting here would stall the chunks of admitted transfers
                return
            try:
                whole = self._absorb(msg)
            except TransportError as exc:
                log.warning("dropped transfer on %s: %s", subject, exc)
                self.dropped_transfers += 1
                whole = None
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(b"")
            if whole is not None:
                self._spawn(handler(whole))

        await self._client.subscribe(subject, cb=on_message, pending_bytes_limit=256 * 1024 * 1024)
        await self._client.flush()  # return only once the server knows: a send right after must find us

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _admit(self, msg: Msg) -> None:
        """Answer a transfer's begin request once a slot is free: empty means go ahead, text
        is a refusal the sender raises. The buffer is allocated only on admission."""
        headers = msg.headers or {}
        transfer_id = headers.get(H_TRANSFER, "")
        try:
            size = int(headers.get(H_SIZE, ""))
        except ValueError:
            size = -1
        if not transfer_id or not 0 < size <= self.max_transfer_bytes:
            await self._refuse(msg, f"refused: transfer of {size} bytes (limit {self.max_transfer_bytes})")
            return
        while True:
            self._forget_stale()  # a sender that vanished mid-transfer must not hold its slot forever
            try:
                await asyncio.wait_for(self._admission.acquire(), STALE_TRANSFER_S / 4)
                break
            except TimeoutError:
                continue
        if transfer_id in self._transfers:
            self._admission.release()
            await self._refuse(msg, f"refused: transfer id {transfer_id} is already in use")
            return
        self._transfers[transfer_id] = _Transfer(bytearray(size))
        try:
            await msg.respond(b"")
        except nats.errors.Error as exc:
            log.debug("could not admit transfer %s: %s", transfer_id, exc)
            self._finish(transfer_id)

    async def _refuse(self, msg: Msg, reason: str) -> None:
        self.dropped_transfers += 1
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(reason.encode())

    def _finish(self, transfer_id: str) -> None:
        if self._transfers.pop(transfer_id, None) is not None:
            self._admission.release()

    def _absorb(self, msg: Msg) -> Payload | None:
        headers = msg.headers or {}
        transfer_id = headers.get(H_TRANSFER)
        if transfer_id is None:
            return bytes(msg.data)
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            raise TransportError(f"chunk for transfer {transfer_id} that was never admitted (or has expired)")
        try:
            offset = int(headers[H_OFFSET])
        except (KeyError, ValueError) as exc:
            self._finish(transfer_id)
            raise TransportError(f"chunk of transfer {transfer_id} without a valid offset header") from exc
        data = msg.data
        size = len(transfer.buffer)
        if offset < 0 or offset + len(data) > size:
            self._finish(transfer_id)
            raise TransportError(f"chunk at offset {offset} does not fit transfer {transfer_id}")
        transfer.buffer[offset : offset + len(data)] = data
        transfer.received += len(data)
        transfer.touched = time.monotonic()
        if transfer.received < size:
            return None
        self._finish(transfer_id)
        return transfer.buffer

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for transfer_id, transfer in list(self._transfers.items()):
            if now - transfer.touched > STALE_TRANSFER_S:
                self._finish(transfer_id)
                self.dropped_transfers += 1

    async def send(self, subject: str, parts: bytes | Sequence[bytes | bytearray | memoryview], *,
                   timeout_s: float = 30.0,
                   recipient: str = "recipient") -> None:
        """Deliver bytes to one listening party; returns once it has received all of them."""
        chunks = list(_chunks([parts] if isinstance(parts, bytes | bytearray) else parts, self.chunk_size))
        total = sum(len(c) for c in chunks)
        try:
            if len(chunks) == 1:
                await self._client.request(subject, bytes(chunks[0]), timeout=timeout_s)
                return
            transfer_id = os.urandom(12).hex()
            answer = await self._client.request(subject, b"", timeout=max(timeout_s, ADMISSION_TIMEOUT_S),
                                                headers={H_TRANSFER: transfer_id, H_SIZE: str(total), H_BEGIN: "1"})
            if answer.data:
                raise TransportError(f"{recipient} {answer.data.decode(errors='replace')}", where=subject)
            offset = 0
            for index, chunk in enumerate(chunks):
                headers = {H_TRANSFER: transfer_id, H_OFFSET: str(offset)}
                offset += len(chunk)
                if (index + 1) % WINDOW == 0 or index == len(chunks) - 1:
                    await self._client.request(subject, bytes(chunk), timeout=timeout_s, headers=headers)
                else:
                    await self._client.publish(subject, bytes(chunk), headers=headers)
        except nats.errors.NoRespondersError as exc:
            raise PodUnreachable(f"nobody is listening for {recipient}", where=subject,
                                 hint="is the pod running and connected to this broker?") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise TaskTimeout(f"{recipient} did not acknowledge within {timeout_s}s", where=subject) from exc
        except nats.errors.Error as exc:
            raise TransportError(f"sending to {recipient} failed: {exc}", where=subject) from exc

    async def publish(self, subject: str, data: bytes) -> None:
        """Fire-and-forget broadcast of a small message (heartbeats, discovery)."""
        try:
            await self._client.publish(subject, data)
        except nats.errors.Error as exc:
            raise TransportError(f"publish failed: {exc}", where=subject) from exc

    async def flush(self, timeout_s: float = 5.0) -> None:
        await self._client.flush(timeout=round(timeout_s))


def _chunks(parts: Sequence[bytes | bytearray | memoryview], size: int) -> list[memoryview | bytes]:
    """Split a list of buffers into chunks of at most `size`, copying only at part borders."""
    out: list[memoryview | bytes] = []
    pending = b""
    for part in parts:
        view = memoryview(part)
        if pending:
            take = size - len(pending)
            pending += bytes(view[:take])
            view = view[take:]
            if len(pending) < size:
                continue
            out.append(pending)
            pending = b""
        while len(view) >= size:
            out.append(view[:size])
            view = view[size:]
        pending = bytes(view)
    if pending or not out:
        out.append(pending)
    return out


async def _log_error(exc: Exception, seen: list[Exception]) -> None:
    if len(seen) < 16:
        seen.append(exc)
    if "permissions violation" in str(exc):
        log.warning("broker: %s", exc)  # a misconfigured party, or one trying what it may not
        return
    log.debug("nats: %s", exc)
