"""Envelopes over the bus: what pods and modellers share to talk to each other securely.

A `SecureChannel` seals typed messages for a recipient and sends them to its inbox, and
opens what arrives in its own inbox, counting every rejected envelope by reason. Large
frames are sealed and opened in a worker thread so the event loop (heartbeats, other
tasks) keeps running. Memory is spent on one copy of a large message at a time where it can
be: at most `LARGE_SENDS` large messages are sealed and in flight at once (a modeller sending
a 40 MB model to ten pods holds two ciphertexts, not ten; the single connection is the
bottleneck anyway), and a received frame is let go as soon as it is decrypted. What several
parties need alike (a round's global model) is `cast`: sealed once and sent once.

A reply ready while its request is not yet acknowledged rides on the acknowledgement (`answer`):
a quick task then costs two messages instead of four, on both sides. The sender's channel opens
such an answer like anything arriving in its inbox. Should the answer be lost (a broker restarts
under it), the sender sends its request again; the receiver refuses the copy as a replay, but
answers it with what it answered the original (`_AnswersGiven`) — waiting for that answer if
the original is still being handled — so nothing is computed twice and nobody waits out a
timeout for a reply that left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from fedpod.errors import EnvelopeRejected
from fedpod.security.envelope import Opened, ReplayGuard, no_acknowledgement, open_envelope, seal
from fedpod.security.identity import Identity, PublicIdentity
from fedpod.security.tickets import TICKET_TTL_S, Ticket, TicketRefused, check_ticket, issue_ticket
from fedpod.transport import subjects
from fedpod.transport.bus import ACK_PATIENCE_S, MAX_SENDS, Ack, Bus, CastRecipient, Payload, TicketIssuer
from fedpod.wire.codec import Buffer, pack
from fedpod.wire.messages import WireMessage

OFFLOAD_BYTES = 1024 * 1024
LARGE_SENDS = 2
OpenedHandler = Callable[[Opened], Awaitable[None]]
RejectedHandler = Callable[[EnvelopeRejected], Awaitable[None]]
SenderFilter = Callable[[str], bool]
REMEMBERED_TICKETS = 10_000
ANSWER_KEPT_S = 60.0  # longer than a sender goes on resending (`transport.bus`: MAX_SENDS within its timeout)
ANSWERS_KEPT_BYTES = 16 * 1024 * 1024
EnvelopeKey = tuple[bytes, bytes]  # the signer's key and the envelope's nonce
# how long a copy waits for its original's answer: longer than its sender waits for it, so that a
# copy acknowledged empty (the original took too long) never reaches a sender still waiting
COPY_PATIENCE_S = ACK_PATIENCE_S + 1.0


class _AnswersGiven:
    """The answers carried on acknowledgements in the last ANSWER_KEPT_S, by the envelope each
    answered, at most ANSWERS_KEPT_BYTES in all (the oldest go first); and, for a request still
    being handled, the answer to come. Anyone may replay an envelope they saw and be answered:
    what they get is sealed for its sender."""

    def __init__(self) -> None:
        self._kept: OrderedDict[EnvelopeKey, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._coming: dict[EnvelopeKey, asyncio.Future[bytes]] = {}
        self._waiting: Counter[EnvelopeKey] = Counter()

    def begin(self, envelope: EnvelopeKey) -> None:
        """`envelope` was opened: a copy arriving before it is acknowledged waits for its answer."""
        self._coming[envelope] = asyncio.get_running_loop().create_future()

    def settle(self, envelope: EnvelopeKey, answer: bytes = b"") -> None:
        """`envelope` was acknowledged, carrying `answer` (empty: a plain acknowledgement, the
        reply, if any, travels on its own), or its handling ended."""
        coming = self._coming.pop(envelope, None)
        if coming is not None and not coming.done():
            coming.set_result(answer)
        if answer:
            self.keep(envelope, answer)

    def keep(self, envelope: EnvelopeKey, answer: bytes) -> None:
        now = time.monotonic()
        self._kept[envelope] = (now, answer)
        self._bytes += len(answer)
        while self._kept and (self._bytes > ANSWERS_KEPT_BYTES or now - next(iter(self._kept.values()))[0]
                              > ANSWER_KEPT_S):
            self._bytes -= len(self._kept.popitem(last=False)[1][1])

    def get(self, envelope: EnvelopeKey) -> bytes | None:
        kept = self._kept.get(envelope)
        return kept[1] if kept is not None and time.monotonic() - kept[0] <= ANSWER_KEPT_S else None

    async def for_copy(self, envelope: EnvelopeKey) -> bytes | None:
        """What to answer a copy of `envelope`: what its original was answered, waited for if the
        original is still being handled (its sender lost the first send in a reconnection and sent
        it again). At most as many copies wait as a sender sends (MAX_SENDS), for COPY_PATIENCE_S
        at most: others get what is known now."""
        coming = self._coming.get(envelope)
        if coming is None or self._waiting[envelope] >= MAX_SENDS:
            return self.get(envelope)
        self._waiting[envelope] += 1
        try:
            return await asyncio.wait_for(asyncio.shield(coming), COPY_PATIENCE_S)
        except TimeoutError:
            return None
        finally:
            self._waiting[envelope] -= 1
            if not self._waiting[envelope]:
                del self._waiting[envelope]


class _AcceptedSendersOnly(ReplayGuard):
    """Remembers the tickets of accepted senders only: others are refused right after opening,
    so a stranger's valid tickets never push genuine ones out of the bounded memory."""

    def __init__(self, accept: SenderFilter | None) -> None:
        super().__init__(max_age_s=TICKET_TTL_S, max_entries=REMEMBERED_TICKETS)
        self.accept = accept

    def check_and_remember(self, sender: PublicIdentity, nonce: bytes, ts: float, now: float) -> bool:
        if self.accept is not None and not self.accept(sender.fingerprint):
            return True
        return super().check_and_remember(sender, nonce, ts, now)


class TransferTickets:
    """The bus's `TransferAuthority` with this party's identity: vets others' begin requests —
    envelope, recipient, expiry, replay, and whether `accept(fingerprint)` takes large messages
    from that sender (None: any party that signs)."""

    def __init__(self, identity: Identity, accept: SenderFilter | None) -> None:
        self.identity = identity
        self.accept = accept
        self._guard = _AcceptedSendersOnly(accept)

    def vet(self, ticket: bytes, max_size: int, min_chunk: int) -> tuple[str, Ticket]:
        try:
            checked = check_ticket(ticket, self.identity, self._guard, max_size=max_size, min_chunk=min_chunk)
        except TicketRefused as exc:
            raise ValueError(str(exc)) from exc
        sender = checked.sender.fingerprint
        if self.accept is not None and not self.accept(sender):
            raise ValueError(f"{checked.sender.name} ({sender}) may not send large messages to this party")
        return sender, checked


@dataclasses.dataclass(frozen=True)
class Letter:
    """A sealed envelope and whom it is for (`SecureChannel.seal`)."""

    recipient: PublicIdentity
    parts: list[Buffer]
    task_id: str


class SecureChannel:
    """`accept_transfers_from(fingerprint)` says whom this party takes messages larger than
    the broker's `max_payload` from; nothing is spent on anyone else's (see `transport.bus`).
    `guard` remembers the envelopes already seen (a pod's survives restarts)."""

    def __init__(self, bus: Bus, identity: Identity, accept_transfers_from: SenderFilter | None = None,
                 guard: ReplayGuard | None = None) -> None:
        self.bus = bus
        bus.tickets = TransferTickets(identity, accept_transfers_from)
        self.identity = identity
        self.guard = guard or ReplayGuard()
        self.rejections: Counter[str] = Counter()
        self._seq = itertools.count(1)
        self._large_sends = asyncio.Semaphore(LARGE_SENDS)
        self._inbox: Callable[[Payload, Ack, str | None], Awaitable[None]] | None = None  # set by `listen_inbox`
        self._answers = _AnswersGiven()
        self._taking: set[asyncio.Task[None]] = set()

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    async def _seal(self, message_type: str, payload: list[Buffer], recipients: list[PublicIdentity],
                    task_id: str, announce: bool = False) -> list[Buffer]:
        seq = next(self._seq)
        if _is_large(payload):
            return await asyncio.to_thread(seal, self.identity, message_type, payload, recipients=recipients,
                                           task_id=task_id, seq=seq, announce=announce)
        return seal(self.identity, message_type, payload, recipients=recipients, task_id=task_id, seq=seq,
                    announce=announce)

    async def send(self, recipient: PublicIdentity, message: WireMessage, *, task_id: str = "",
                   timeout_s: float = 30.0) -> None:
        payload = pack(message)
        async with self._large_sends if _is_large(payload) else contextlib.nullcontext():
            await self.deliver(await self._letter(recipient, message.TYPE, payload, task_id), timeout_s=timeout_s)

    async def seal(self, recipient: PublicIdentity, message: WireMessage, *, task_id: str = "") -> Letter:
        """`message` sealed for `recipient`, to `deliver` once the caller has let go of the
        message: a pod's 400 MB model update is then held once, as ciphertext, while it is sent
        (and sent again, the same envelope, if it must be: the recipient's replay guard refuses a
        copy that did arrive). Unlike `send`, not limited to LARGE_SENDS at once: the caller
        bounds how many it seals (a pod: its task slots)."""
        return await self._letter(recipient, message.TYPE, pack(message), task_id)

    async def _letter(self, recipient: PublicIdentity, message_type: str, payload: list[Buffer],
                      task_id: str) -> Letter:
        return Letter(recipient, await self._seal(message_type, payload, [recipient], task_id), task_id)

    async def deliver(self, letter: Letter, *, timeout_s: float = 30.0) -> None:
        recipient = letter.recipient

        def ticket(transfer: str, size: int, digests: list[bytes]) -> bytes:
            return issue_ticket(self.identity, recipient, transfer, size, digests)

        answer = await self.bus.send(subjects.inbox(recipient.fingerprint), letter.parts, timeout_s=timeout_s,
                                     recipient=f"{recipient.name} ({recipient.fingerprint})", ticket=ticket)
        if answer and self._inbox is not None:
            # opened and handled as if it came to the inbox, but apart: what the recipient answered
            # never holds up this send (a pod's, sending a result, must not run a task in it)
            taking = asyncio.ensure_future(self._inbox(answer, no_acknowledgement, None))
            self._taking.add(taking)
            taking.add_done_callback(self._taking.discard)

    async def answer(self, opened: Opened, letter: Letter) -> bool:
        """Carry `letter` on the acknowledgement of `opened`, its sender's request, if that is not
        yet sent and the letter fits in one message. False if it must be delivered: `opened` is
        then acknowledged (if it was not already), so that its sender is not kept waiting while
        a large reply travels on its own."""
        if letter.recipient.fingerprint == opened.sender.fingerprint \
                and sum(len(part) for part in letter.parts) <= self.bus.chunk_size:
            return await opened.acknowledge(b"".join(letter.parts))
        await opened.acknowledge()
        return False

    async def cast(self, recipients: list[PublicIdentity], message: WireMessage, *,
                   timeout_s: float = 30.0) -> set[str]:
        """Send one large message to several parties at once: sealed once (one content key,
        wrapped for each), its bytes sent once over this party's link (`Bus.multicast`), each
        recipient vetting its own ticket. Returns the fingerprints of those that received it;
        the others are the caller's to `send` to."""
        async with self._large_sends:
            parts = await self._seal(message.TYPE, pack(message), recipients, "")

            def ticket_for(recipient: PublicIdentity) -> TicketIssuer:
                return lambda transfer, size, digests: issue_ticket(self.identity, recipient, transfer, size, digests)

            return await self.bus.multicast([CastRecipient(r.fingerprint, subjects.inbox(r.fingerprint), ticket_for(r))
                                             for r in recipients], parts, timeout_s=timeout_s)

    async def announce(self, subject: str, message: WireMessage, recipients: list[PublicIdentity]) -> None:
        """Publish `message` on this party's own subject, sealed for `recipients` and showing this
        party's public keys, so that others can address it (see `seal(announce=True)`)."""
        parts = await self._seal(message.TYPE, pack(message), recipients, "", announce=True)
        await self.bus.publish(subject, b"".join(parts))

    async def open(self, frame: Payload, vouched_by: str | None = None) -> Opened:
        """`vouched_by`: the fingerprint of the party whose verified transfer ticket covered every
        byte of `frame` (the bus says so), if any — see `open_envelope`."""
        if len(frame) > OFFLOAD_BYTES:
            return await asyncio.to_thread(open_envelope, frame, self.identity, self.guard, vouched_by=vouched_by)
        return open_envelope(frame, self.identity, self.guard, vouched_by=vouched_by)

    async def listen_inbox(self, on_opened: OpenedHandler, on_rejected: RejectedHandler) -> None:
        """Subscribe this party's inbox (the only subject envelopes are opened on: heartbeats are
        read by the modeller's own subscription); verified envelopes go to `on_opened`, rejections
        are counted and reported to `on_rejected` — never raised into the subscription. The
        sender hears that its message arrived when the handler awaits `opened.acknowledge()`, or
        returns."""

        async def on_frame(frame: Payload, ack: Ack, vouched_by: str | None) -> None:
            try:
                opened = await self.open(frame, vouched_by)
            except EnvelopeRejected as exc:
                self.rejections[exc.reason] += 1
                await on_rejected(exc)
                if exc.envelope is not None:  # a copy of a request: answered as the original was
                    answered = await self._answers.for_copy(exc.envelope)
                    if answered:
                        await ack(answered)
                return
            del frame  # the ciphertext is not needed while the handler works (a pod trains for minutes)
            envelope = (opened.header.sign_public, opened.header.nonce)
            self._answers.begin(envelope)

            async def acknowledge(answer: bytes = b"") -> bool:
                carried = await ack(answer)
                self._answers.settle(envelope, answer if carried else b"")
                return carried

            try:
                await on_opened(dataclasses.replace(opened, acknowledge=acknowledge))
            finally:
                self._answers.settle(envelope)

        self._inbox = on_frame
        await self.bus.subscribe(subjects.inbox(self.fingerprint), on_frame)


def _is_large(payload: list[Buffer]) -> bool:
    """Sealed in a worker thread, and sent LARGE_SENDS at a time."""
    return sum(len(part) for part in payload) > OFFLOAD_BYTES
