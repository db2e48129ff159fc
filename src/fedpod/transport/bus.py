"""Bytes in, bytes out over NATS — of any size. The only module that imports `nats`, with
`nats_copies`, which it installs to take fewer copies of what nats-py sends and receives.

Messages larger than the server's `max_payload` travel as chunks with transfer headers.
Anyone who can reach the broker can publish to an inbox, so a chunked transfer costs the
receiver nothing until its sender is authenticated:

- A transfer opens with a "begin" request carrying a signed ticket (`TransferAuthority`,
  implemented with the parties' identity keys by `fedpod.channel`): who sends, to whom, how
  many bytes, until when, and the digest of every chunk (`security.digest`). The receiver
  checks it and asks whether it takes large messages from that sender at all (a pod: from
  accepted modellers; a modeller: from pods it awaits a reply from) before it queues or
  allocates anything.
  Strangers are refused at once with the reason.
- Admission, decided by the receiver: at most `MAX_ACTIVE_TRANSFERS` stream to it at once and
  at most `MAX_PER_SENDER` from one sender, so no one party can hold every slot. The server
  buffers up to `max_pending` (64 MB by default) of what a client has not read yet and cuts
  it off as a slow consumer beyond that; a per-sender window alone cannot bound this once
  enough pods reply at once (twelve 4 MiB windows tripped it).
- Chunks are taken in order, each only if its digest is the ticket's: a chunk injected by
  someone else (with a transfer id seen on the wire) is counted and ignored; it neither
  corrupts nor cuts the genuine transfer. Nothing is allocated before the first verified chunk:
  the buffer is then an anonymous memory map of the announced size (`fedpod.buffers`: last
  round's if one is free, else a new one whose pages the kernel provides only as they are
  written), which, unlike a growing bytearray, is never copied to grow.
- A window per transfer: every `WINDOW`-th chunk (and the last) is a request that the
  receiver acknowledges once the chunk is stored, so one fast sender cannot overrun it.

A cast (`multicast`) sends the same bytes to several parties with one copy over the sender's
link, and NATS fans them out: each recipient is sent its own signed ticket (begin request, to
its inbox, admitted as above), then subscribes to the transfer's cast subject
(`subjects.cast(sender, transfer)`, checked against the ticket's sender) for that transfer
only. The chunks are published once; each window is acknowledged by every recipient, naming
itself, and one that falls behind or loses the transfer is left out of the rest, so a slow pod
never stalls the others: the cast returns who received everything and the caller sends to the
others one by one.

A send to an inbox nobody listens on fails within RECONNECT_GRACE_S (`PodUnreachable`) instead
of vanishing.

A receiver may answer on its acknowledgement (`Ack`): `send` returns what it answered, so that
a reply ready when its request is acknowledged costs neither side a message of its own.

Integrity and origin of the reassembled bytes is still the envelope's job (GCM tag, signature);
the handler hears whose ticket vouched for every chunk, so that a body the envelope would hash
to check its signer's digest (a cast's) is not hashed a second time.

Losing a broker (a cluster member that dies, a restart) loses what was in flight through it,
and a request whose answer was lost would otherwise wait out its whole timeout. So a send is
sent again, whole, when the sender's own connection is restored under it, when the receiver
says it lost the transfer (it reconnected: `RESEND`), or when a small message or a window goes
unacknowledged for `ACK_PATIENCE_S` (the receiver's own link was lost, which the sender cannot
see). A copy that did arrive twice is the same envelope: the receiver's replay guard refuses it.
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
from typing import Any, Protocol

import nats
import nats.aio.client
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fedpod.buffers import LARGE_BUFFERS
from fedpod.errors import BrokerUnavailable, PodUnreachable, TaskTimeout, TransportError
from fedpod.security.digest import bulk_digest
from fedpod.transport import nats_copies, subjects
from fedpod.transport.broker import split_urls

log = logging.getLogger(__name__)

Payload = bytes | bytearray | memoryview


class Ack(Protocol):
    """Tells the sender that its whole message arrived, at most once. `answer` (bytes that fit
    in one message) rides on that acknowledgement back to the sender, whose `send` returns it:
    a reply ready by then costs no message of its own. True if this call sent `answer`; False
    if the acknowledgement was sent before (the answer must then travel on its own) or cannot
    carry it (too large, or a cast's, whose answer is its recipients' bookkeeping)."""

    def __call__(self, answer: bytes = b"") -> Awaitable[bool]: ...


# A whole message, its acknowledgement, and who vouched for every byte of it: for a chunked
# transfer, the sender whose signed ticket listed each chunk's digest (each one checked here);
# None for a single message.
Handler = Callable[[Payload, Ack, str | None], Awaitable[None]]
TicketIssuer = Callable[[str, int, list[bytes]], bytes]  # (transfer id, size, chunk digests) -> ticket

H_TRANSFER = "Fedpod-Transfer"
H_INDEX = "Fedpod-Chunk"
H_BEGIN = "Fedpod-Begin"
H_CAST = "Fedpod-Cast"  # on a begin request: the subject the transfer's chunks are published on
WINDOW = 4  # chunks in flight per transfer
MAX_ACTIVE_TRANSFERS = 6  # x WINDOW x 1 MiB stays well under the server's default max_pending (64 MB)
MAX_PER_SENDER = 2
HASH_IN_THREAD_BYTES = 8 * 1024 * 1024
ADMISSION_TIMEOUT_S = 600.0  # a live receiver may keep a sender waiting this long behind others
HEADER_ALLOWANCE = 1024
MIN_CHUNK = 4096
DEFAULT_MAX_TRANSFER_BYTES = 4 * 1024**3
STALE_TRANSFER_S = 120.0
ACK_PATIENCE_S = 5.0  # a small message or a window is acknowledged in milliseconds; beyond this, send again
MAX_SENDS = 4
RECONNECT_GRACE_S = 2.0  # how long an inbox nobody listens on is retried: its owner may be reconnecting
RESEND = b"resend: transfer unknown here (lost in a reconnection)"
CAST_OK, CAST_DONE, CAST_LOST = "ok", "done", "lost"  # a recipient's answer to a window of a cast


nats_copies.install()

DEFAULT_BROKER_URL = "nats://127.0.0.1:4222"
CONNECT_HINT = ("start one with `fedpod broker start`, then pass its URL: --broker URL on the command line, "
                "broker=URL in Python, or FEDPOD_BROKER=URL for both")


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to authenticate: a URL plus optional TLS and credentials."""

    url: str = DEFAULT_BROKER_URL
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    creds: Path | None = None
    connect_timeout_s: float = 5.0

    @classmethod
    def from_environment(cls) -> BrokerOptions:
        """What the CLI uses when no --broker/--creds is given: FEDPOD_BROKER (else the default
        URL) and FEDPOD_CREDS. The Python API starts from the same."""
        creds = os.environ.get("FEDPOD_CREDS")
        return cls(os.environ.get("FEDPOD_BROKER") or DEFAULT_BROKER_URL, creds=Path(creds) if creds else None)

    @property
    def servers(self) -> list[str]:
        """The URLs in `url`: one server, or a cluster's members comma-separated (a client
        learns the others by gossip too, but needs a second to reach when its first is down)."""
        return split_urls(self.url)

    def as_dict(self) -> dict[str, str | None]:
        """URL and absolute file paths, for a breakpoint to reconnect the same way."""
        def absolute(path: Path | None) -> str | None:
            return str(path.resolve()) if path else None

        return {"url": self.url, "tls_ca": absolute(self.tls_ca), "tls_cert": absolute(self.tls_cert),
                "tls_key": absolute(self.tls_key), "creds": absolute(self.creds)}

    @classmethod
    def from_dict(cls, fields: dict[str, str | None]) -> BrokerOptions:
        def path(key: str) -> Path | None:
            value = fields.get(key)
            return Path(value) if value else None

        return cls(str(fields.get("url") or DEFAULT_BROKER_URL), path("tls_ca"), path("tls_cert"), path("tls_key"),
                   path("creds"))

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


class Vetted(Protocol):
    """An authenticated begin request (see `fedpod.security.tickets.Ticket`)."""

    @property
    def transfer(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def digests(self) -> list[bytes]: ...


class TransferAuthority(Protocol):
    """Vets others' begin requests: `vet` returns the sender's key (its fingerprint) and the
    ticket, or raises ValueError with the reason for refusing."""

    def vet(self, ticket: bytes, max_size: int, min_chunk: int) -> tuple[str, Vetted]: ...


@dataclass(frozen=True)
class CastRecipient:
    """One party a cast goes to: its inbox (for the begin request) and its ticket."""

    key: str  # how the recipient names itself in its acknowledgements: its fingerprint
    inbox: str
    ticket: TicketIssuer


@dataclass
class _Transfer:
    sender: str
    size: int
    digests: list[bytes]
    subscription: Subscription | None = None  # a cast's: this party listens on its subject until it ends
    buffer: memoryview | None = None
    received: int = 0
    next_index: int = 0
    touched: float = field(default_factory=time.monotonic)


class _Admission:
    """Slots for chunked transfers: `total` at once, `per_sender` from any one sender."""

    def __init__(self, total: int, per_sender: int) -> None:
        self.total, self.per_sender = total, per_sender
        self.active: dict[str, int] = {}
        self._changed = asyncio.Event()

    def _free_for(self, sender: str) -> bool:
        return sum(self.active.values()) < self.total and self.active.get(sender, 0) < self.per_sender

    async def acquire(self, sender: str, timeout_s: float) -> bool:
        """Take a slot for `sender`; False if none freed up within `timeout_s`."""
        while not self._free_for(sender):
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                return False
        self.active[sender] = self.active.get(sender, 0) + 1
        return True

    def release(self, sender: str) -> None:
        left = self.active.get(sender, 0) - 1
        if left > 0:
            self.active[sender] = left
        else:
            self.active.pop(sender, None)
        self._changed.set()


class Bus:
    """A connection to the broker. Create with `await Bus.connect(options)`."""

    def __init__(self, client: Client, *, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES,
                 me: str = "") -> None:
        self._client = client
        self.me = me  # this party's fingerprint: how it names itself acknowledging a cast
        self.max_transfer_bytes = max_transfer_bytes
        self._transfers: dict[str, _Transfer] = {}
        self._admission = _Admission(MAX_ACTIVE_TRANSFERS, MAX_PER_SENDER)
        self._tasks: set[asyncio.Task[None]] = set()
        self.tickets: TransferAuthority | None = None
        self.dropped_transfers = 0
        self.ignored_chunks = 0
        self.resends = 0
        self._reconnection: asyncio.Future[None] | None = None  # resolved when the connection is restored

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
            if options.creds is None or not _holds_seed(options.creds):
                extra["nkeys_seed_str"] = login.nats_seed

        async def on_error(exc: Exception) -> None:
            await _log_error(exc, seen)

        async def on_reconnected() -> None:
            if created:
                created[0]._reconnected()

        try:
            client = await nats.connect(
                options.servers,
                name=name,
                tls=options.ssl_context(),
                **_credentials(options.creds, signs=login is not None),
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
            raise BrokerUnavailable(f"cannot connect to NATS at {options.url}: {exc}", hint=CONNECT_HINT) from exc
        except (OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot connect to NATS at {options.url}: {exc}", hint=CONNECT_HINT) from exc
        created.append(cls(client, me=login.fingerprint if login is not None else ""))
        return created[0]

    def _reconnected(self) -> None:
        self.abandon_transfers()
        if self._reconnection is not None and not self._reconnection.done():
            self._reconnection.set_result(None)  # requests waiting on the old connection are sent again
        self._reconnection = None

    def abandon_transfers(self) -> None:
        """After a reconnection no transfer in progress can go on (its sender's requests failed
        with the old connection, and it resends whole): free their slots now rather than
        after STALE_TRANSFER_S, so a restarted broker does not stall the next replies."""
        for transfer_id in list(self._transfers):
            self._finish(transfer_id)
            self.dropped_transfers += 1

    @property
    def chunk_size(self) -> int:
        return max(MIN_CHUNK, self._client.max_payload - HEADER_ALLOWANCE)

    @property
    def traffic(self) -> tuple[int, int]:
        """Bytes sent and received over this connection so far (headers and protocol included)."""
        return int(self._client.stats["out_bytes"]), int(self._client.stats["in_bytes"])

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
        once the server has registered the subscription.

        The sender's `send` returns when the receiver acknowledges the whole message, which is
        when the handler calls its `ack` (at the latest when it returns): a pod acknowledges a
        task only once it has written it to its audit log, so a task a sender saw accepted is
        never missing from the log, even if the pod dies right after."""

        async def on_message(msg: Msg) -> None:
            if msg.headers and H_BEGIN in msg.headers:
                self._spawn(self._admit(msg, handler))  # waiting here would stall the chunks of admitted transfers
                return
            try:
                absorbed = self._absorb(msg)
            except _UnknownChunk:
                self.ignored_chunks += 1  # not a chunk an admitted sender signed for: someone else's, ignored
                if msg.reply:  # a window of a transfer this party lost: its sender starts it again
                    with contextlib.suppress(Exception):
                        await msg.respond(RESEND)
                return
            except TransportError as exc:
                log.debug("dropped transfer on %s: %s", subject, exc)
                self.dropped_transfers += 1
                absorbed = None
            if absorbed is None:
                if msg.reply:  # flow control of a transfer under way, or a message dropped
                    with contextlib.suppress(Exception):
                        await msg.respond(b"")
                return
            self._spawn(_acknowledging(handler, *absorbed, msg, self.chunk_size))

        await self._client.subscribe(subject, cb=on_message, pending_bytes_limit=256 * 1024 * 1024)
        await self._client.flush()  # return only once the server knows: a send right after must find us

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _admit(self, msg: Msg, handler: Handler) -> None:
        """Answer a transfer's begin request once a slot is free: empty means go ahead, text
        is a refusal the sender raises. Nothing is queued or allocated for a sender whose
        ticket does not verify, or whom this party takes no large messages from. A cast's
        recipient subscribes to the transfer's subject (the sender's own, for this transfer id)
        before it answers."""
        headers = msg.headers or {}
        transfer_id = headers.get(H_TRANSFER, "")
        if self.tickets is None:
            await self._refuse(msg, "refused: this party takes no chunked transfers")
            return
        try:
            sender, ticket = self.tickets.vet(bytes(msg.data), self.max_transfer_bytes, MIN_CHUNK)
        except ValueError as exc:
            await self._refuse(msg, f"refused: {exc}")
            return
        if ticket.transfer != transfer_id:
            await self._refuse(msg, "refused: transfer id differs from the ticket's")
            return
        cast = headers.get(H_CAST)
        if cast is not None and cast != subjects.cast(sender, transfer_id):
            await self._refuse(msg, "refused: a cast is published on its sender's own subject for its transfer")
            return
        while not await self._admission.acquire(sender, STALE_TRANSFER_S / 4):
            self._forget_stale()  # a sender that vanished mid-transfer must not hold its slot forever
        if transfer_id in self._transfers:
            self._admission.release(sender)
            await self._refuse(msg, f"refused: transfer id {transfer_id} is already in use")
            return
        transfer = self._transfers[transfer_id] = _Transfer(sender, ticket.size, ticket.digests)
        try:
            if cast is not None:
                async def on_chunk(chunk: Msg) -> None:
                    await self._on_cast_chunk(chunk, handler)

                transfer.subscription = await self._client.subscribe(cast, cb=on_chunk,
                                                                     pending_bytes_limit=256 * 1024 * 1024)
                await self._client.flush()
            await msg.respond(b"")
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("could not admit transfer %s: %s", transfer_id, exc)
            self._finish(transfer_id)

    async def _on_cast_chunk(self, msg: Msg, handler: Handler) -> None:
        """A chunk of a cast this party was admitted to: stored like an inbox chunk; a window is
        answered naming this party (`CAST_LOST` if it no longer has the transfer), and the last
        one once the handler acknowledges the whole."""
        headers = msg.headers or {}
        if H_TRANSFER not in headers:  # a whole message belongs in an inbox, never on a cast subject
            self.ignored_chunks += 1
            return
        index = headers.get(H_INDEX, "?")[:16]
        try:
            absorbed = self._absorb(msg)
        except _UnknownChunk:
            self.ignored_chunks += 1
            absorbed, status = None, CAST_LOST
        except TransportError as exc:
            log.debug("dropped cast chunk: %s", exc)
            self.dropped_transfers += 1
            absorbed, status = None, CAST_LOST
        else:
            status = CAST_OK
        if absorbed is not None:
            self._spawn(_acknowledging(handler, *absorbed, msg, 0, f"{CAST_DONE} {index} {self.me}".encode()))
        elif msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(f"{status} {index} {self.me}".encode())

    async def _refuse(self, msg: Msg, reason: str) -> None:
        self.dropped_transfers += 1
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(reason.encode())

    def _finish(self, transfer_id: str) -> None:
        transfer = self._transfers.pop(transfer_id, None)
        if transfer is not None:
            self._admission.release(transfer.sender)
            if transfer.subscription is not None:
                self._spawn(_unsubscribe(transfer.subscription))

    def _absorb(self, msg: Msg) -> tuple[Payload, str | None] | None:
        """The whole message and who vouched for it (see `Handler`), once it is whole."""
        headers = msg.headers or {}
        transfer_id = headers.get(H_TRANSFER)
        if transfer_id is None:
            return bytes(msg.data), None
        transfer = self._transfers.get(transfer_id)
        data = msg.data
        if transfer is None or headers.get(H_INDEX) != str(transfer.next_index) \
                or transfer.next_index >= len(transfer.digests) \
                or bulk_digest(data) != transfer.digests[transfer.next_index]:
            raise _UnknownChunk
        if transfer.received + len(data) > transfer.size:
            self._finish(transfer_id)
            raise TransportError(f"transfer {transfer_id} carries more than the {transfer.size} bytes announced")
        if transfer.buffer is None:  # address space now; a new buffer's memory comes page by page as written
            transfer.buffer = LARGE_BUFFERS.take(transfer.size)
        transfer.buffer[transfer.received : transfer.received + len(data)] = data
        transfer.received += len(data)
        transfer.next_index += 1
        transfer.touched = time.monotonic()
        if transfer.next_index < len(transfer.digests):
            return None
        self._finish(transfer_id)
        if transfer.received != transfer.size:
            raise TransportError(f"transfer {transfer_id} ended at {transfer.received} of {transfer.size} bytes")
        return transfer.buffer, transfer.sender

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for transfer_id, transfer in list(self._transfers.items()):
            if now - transfer.touched > STALE_TRANSFER_S:
                self._finish(transfer_id)
                self.dropped_transfers += 1

    async def send(self, subject: str, parts: bytes | Sequence[bytes | bytearray | memoryview], *,
                   timeout_s: float = 30.0, recipient: str = "recipient", ticket: TicketIssuer | None = None) -> bytes:
        """Deliver bytes to one listening party; returns once it has received all of them, with
        what it answered on its acknowledgement (empty for a plain one; see `Ack`). A chunked
        transfer opens with the ticket `ticket` issues for it (signed for the recipient). Sent
        again whole, up to MAX_SENDS times within `timeout_s`, when a broker lost it."""
        chunks = list(_chunks([parts] if isinstance(parts, bytes | bytearray) else parts, self.chunk_size))
        digests: list[bytes] = []
        if len(chunks) > 1 and ticket is not None:
            total = sum(len(c) for c in chunks)
            digests = (await asyncio.to_thread(_digests, chunks)) if total > HASH_IN_THREAD_BYTES else _digests(chunks)
        clock = asyncio.get_running_loop().time
        deadline = clock() + timeout_s
        sends, unanswered_since = 0, None
        while True:
            left = max(deadline - clock(), 0.001)
            try:
                return await self._send_once(subject, chunks, digests, min(left, ACK_PATIENCE_S), left, recipient,
                                             ticket)
            except _Interrupted as why:
                sends += 1
                if sends == MAX_SENDS or clock() >= deadline:
                    raise TaskTimeout(f"{recipient} did not acknowledge within {timeout_s}s "
                                      f"({sends} sends; the last: {why})", where=subject) from None
                self.resends += 1
                log.info("sending to %s again: %s", recipient, why)
            except nats.errors.NoRespondersError as exc:
                unanswered_since = unanswered_since or clock()  # it may be reconnecting to another member
                if clock() - unanswered_since >= RECONNECT_GRACE_S or clock() >= deadline:
                    raise PodUnreachable(f"nobody is listening for {recipient}", where=subject,
                                         hint="is the pod running and connected to this broker?") from exc
                await asyncio.sleep(0.1)
            except (nats.errors.TimeoutError, TimeoutError) as exc:
                raise TaskTimeout(f"{recipient} did not acknowledge within {timeout_s}s", where=subject) from exc
            except nats.errors.Error as exc:
                raise TransportError(f"sending to {recipient} failed: {exc}", where=subject) from exc

    async def _send_once(self, subject: str, chunks: list[memoryview | bytes], digests: list[bytes],
                         patience_s: float, timeout_s: float, recipient: str, ticket: TicketIssuer | None) -> bytes:
        if len(chunks) == 1:
            return bytes((await self._request(subject, bytes(chunks[0]), patience_s)).data)
        transfer_id = os.urandom(12).hex()
        begin = ticket(transfer_id, sum(len(c) for c in chunks), digests) if ticket is not None else b""
        # admission may keep a sender waiting behind others for long; only a reconnection cuts it short
        answer = await self._request(subject, begin, max(timeout_s, ADMISSION_TIMEOUT_S),
                                     {H_TRANSFER: transfer_id, H_BEGIN: "1"}, patient=True)
        if answer.data:
            raise TransportError(f"{recipient} {answer.data.decode(errors='replace')}", where=subject)
        for index, chunk in enumerate(chunks):
            headers = {H_TRANSFER: transfer_id, H_INDEX: str(index)}
            if (index + 1) % WINDOW == 0 or index == len(chunks) - 1:
                answer = await self._request(subject, bytes(chunk), patience_s, headers)
                if answer.data == RESEND:
                    raise _Interrupted(f"{recipient} lost the transfer in a reconnection")
            else:
                await self._client.publish(subject, bytes(chunk), headers=headers)
        return bytes(answer.data)  # the last chunk's acknowledgement is the whole message's

    async def _request(self, subject: str, data: bytes, timeout_s: float, headers: dict[str, str] | None = None,
                       *, patient: bool = False) -> Msg:
        """One request, cut short (`_Interrupted`) if this party's connection is restored while
        it waits — its answer would come to the old connection — or, unless `patient`, when
        it runs out of time: the receiver's link may have dropped it."""
        if self._reconnection is None:
            self._reconnection = asyncio.get_running_loop().create_future()
        reconnection = self._reconnection
        request = asyncio.ensure_future(self._client.request(subject, data, timeout=timeout_s, headers=headers))
        waiting: set[asyncio.Future[Any]] = {request, reconnection}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not request.done():
            request.cancel()
            raise _Interrupted("this party's connection to the broker was restored while it waited")
        try:
            return request.result()
        except nats.errors.TimeoutError:
            if patient:
                raise
            raise _Interrupted(f"no acknowledgement within {timeout_s:g}s") from None

    async def multicast(self, recipients: Sequence[CastRecipient], parts: Sequence[bytes | bytearray | memoryview],
                        *, timeout_s: float = 30.0) -> set[str]:
        """Deliver the same bytes to every recipient, sending them once (see the module's
        docstring); returns the keys of the recipients that acknowledged the whole. The others
        (refused, unreachable, fallen behind, lost in a reconnection) are the caller's to send
        to one by one."""
        chunks = list(_chunks(parts, self.chunk_size))
        size = sum(len(c) for c in chunks)
        digests = (await asyncio.to_thread(_digests, chunks)) if size > HASH_IN_THREAD_BYTES else _digests(chunks)
        transfer_id = os.urandom(12).hex()
        subject = subjects.cast(self.me, transfer_id)
        answers: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4 * len(recipients) + 16)

        async def on_answer(msg: Msg) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # more than the recipients can owe: not theirs
                answers.put_nowait(bytes(msg.data[:256]))

        inbox = self._client.new_inbox()
        listening = await self._client.subscribe(inbox, cb=on_answer)
        try:
            async def begin(recipient: CastRecipient) -> str | None:
                headers = {H_TRANSFER: transfer_id, H_BEGIN: "1", H_CAST: subject}
                try:
                    answer = await self._client.request(recipient.inbox, recipient.ticket(transfer_id, size, digests),
                                                        timeout=min(timeout_s, ACK_PATIENCE_S), headers=headers)
                except (nats.errors.Error, TimeoutError) as exc:
                    log.info("cast %s: %s not admitted: %s", transfer_id, recipient.key, exc or type(exc).__name__)
                    return None
                return None if answer.data else recipient.key

            live = {key for key in await asyncio.gather(*(begin(r) for r in recipients)) if key}
            for index, chunk in enumerate(chunks):
                headers = {H_TRANSFER: transfer_id, H_INDEX: str(index)}
                last = index == len(chunks) - 1
                if not live:
                    break
                if (index + 1) % WINDOW == 0 or last:
                    await self._client.publish(subject, bytes(chunk), reply=inbox, headers=headers)
                    live = await _answered(answers, live, CAST_DONE if last else CAST_OK, index,
                                           timeout_s if last else ACK_PATIENCE_S)
                else:
                    await self._client.publish(subject, bytes(chunk), headers=headers)
            return live
        except nats.errors.Error as exc:
            log.info("cast %s cut short: %s", transfer_id, exc)
            return set()
        finally:
            await _unsubscribe(listening)

    async def publish(self, subject: str, data: bytes) -> None:
        """Fire-and-forget broadcast of a small message (heartbeats, discovery)."""
        try:
            await self._client.publish(subject, data)
        except nats.errors.Error as exc:
            raise TransportError(f"publish failed: {exc}", where=subject) from exc

    async def flush(self, timeout_s: float = 5.0) -> None:
        await self._client.flush(timeout=round(timeout_s))


class _UnknownChunk(TransportError):
    """A chunk of no transfer under way here, out of order, or not the one its ticket signed for."""

    def __init__(self) -> None:
        super().__init__("a chunk of no transfer under way here")


class _Interrupted(Exception):
    """An attempt to send that a lost connection (this party's or the receiver's) cut short."""


async def _answered(answers: asyncio.Queue[bytes], live: set[str], status: str, index: int,
                    patience_s: float) -> set[str]:
    """Those of `live` that answered `status` for chunk `index` of a cast within `patience_s`;
    one that answers `CAST_LOST` is left out at once. Answers for earlier windows (late), of
    another kind, or naming parties not in `live` are passed over.

    Anyone who sees the cast's subject can forge answers: a forged `CAST_LOST` or a missing one
    only makes the sender send to that recipient directly, and a forged success only makes the
    recipient ask for the model again (`CastMissing`) — a forger costs bandwidth, never data."""
    waiting = set(live)
    clock = asyncio.get_running_loop().time
    deadline = clock() + patience_s
    while waiting:
        try:
            answer = await asyncio.wait_for(answers.get(), max(deadline - clock(), 0.001))
        except TimeoutError:
            break
        said, _, rest = answer.decode(errors="replace").partition(" ")
        number, _, key = rest.partition(" ")
        if key in waiting and number == str(index) and said in (status, CAST_LOST):
            waiting.discard(key)
            if said == CAST_LOST:
                live = live - {key}
    if waiting:
        log.info("cast: %d recipient(s) did not acknowledge chunk %d within %gs and are left out", len(waiting),
                 index, patience_s)
    return live - waiting


async def _unsubscribe(subscription: Subscription) -> None:
    with contextlib.suppress(Exception):
        await subscription.unsubscribe()


async def _acknowledging(handler: Handler, whole: Payload, vouched_by: str | None, msg: Msg, max_answer: int,
                         fixed: bytes = b"") -> None:
    """Run `handler` with an `Ack` for `msg`: answers of at most `max_answer` bytes ride on it;
    a cast's acknowledgement says `fixed` and carries nothing else (`max_answer` 0)."""
    acked = False

    async def ack(answer: bytes = b"") -> bool:
        nonlocal acked
        if acked:
            return False
        acked = True
        carried = bool(answer) and len(answer) <= max_answer and bool(msg.reply)
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(answer if carried else fixed)
        return carried

    running = handler(whole, ack, vouched_by)
    del whole  # the handler lets go of the bytes once it has read them (a pod then trains for minutes)
    try:
        await running
    finally:
        await ack()


def _digests(chunks: list[memoryview | bytes]) -> list[bytes]:
    return [bulk_digest(chunk) for chunk in chunks]


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


def _holds_seed(creds: Path) -> bool:
    try:
        return b"BEGIN USER NKEY SEED" in creds.read_bytes()
    except OSError as exc:
        raise BrokerUnavailable(f"cannot read the credentials file {creds}: {exc}") from exc


def _credentials(creds: Path | None, *, signs: bool) -> dict[str, Any]:
    """How to present `creds`: a NATS credentials file (JWT and seed, as `nsc` writes them), or
    a bare user JWT issued for the party's own key (`fedpod broker accounts issue`), which the
    party's identity then signs for."""
    if creds is None:
        return {}
    if _holds_seed(creds):
        return {"user_credentials": str(creds)}
    if not signs:
        raise BrokerUnavailable(f"{creds} holds a user JWT but no key to sign with",
                                hint="connect as a fedpod identity, or give a full NATS credentials file")
    token = creds.read_bytes().strip()
    return {"user_jwt_cb": lambda: bytearray(token)}


async def _log_error(exc: Exception, seen: list[Exception]) -> None:
    if len(seen) < 16:
        seen.append(exc)
    if "permissions violation" in str(exc):
        log.warning("broker: %s", exc)  # a misconfigured party, or one trying what it may not
        return
    log.debug("nats: %s", exc)
