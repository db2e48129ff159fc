"""Transfer tickets: what a sender must show before a receiver spends anything on a large message.

A message larger than the broker's `max_payload` travels as chunks, announced by a "begin"
request. Anyone who can publish to an inbox can send such a request, so the receiver must
not allocate, queue or even remember anything for it until it knows who sends it. The begin
request therefore carries a ticket: a small envelope (signed, sealed for the recipient, so an
observer learns neither sender nor size beyond what it sees) holding

    {transfer, size, digests}

The envelope's recipient and timestamp bind the ticket to one receiver and a short life
(`TICKET_TTL_S`), and `digests` holds the digest (`security.digest`) of every chunk, so that a
chunk injected by anyone else — even with a transfer id seen on the wire — is told apart from
the genuine one and ignored instead of corrupting or cutting the transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from fedpod.errors import EnvelopeRejected
from fedpod.security.digest import DIGEST_BYTES
from fedpod.security.envelope import ReplayGuard, open_envelope, seal_bytes
from fedpod.security.identity import Identity, PublicIdentity

TICKET_TYPE = "transfer-ticket"
TICKET_TTL_S = 60.0


class TicketRefused(ValueError):
    """A begin request whose ticket is missing, malformed, forged, expired or not for us."""


@dataclass(frozen=True)
class Ticket:
    sender: PublicIdentity
    transfer: str
    size: int
    digests: list[bytes]
    expires: float


def issue_ticket(identity: Identity, recipient: PublicIdentity, transfer: str, size: int, digests: list[bytes],
                 *, now: float | None = None) -> bytes:
    fields = msgpack.packb({"transfer": transfer, "size": size, "digests": b"".join(digests)}, use_bin_type=True)
    return seal_bytes(identity, TICKET_TYPE, fields, recipients=[recipient], now=now)


def check_ticket(data: bytes | bytearray | memoryview, me: Identity, guard: ReplayGuard, *, max_size: int,
                 min_chunk: int, now: float | None = None) -> Ticket:
    """Open a ticket addressed to `me` (a replay is refused by `guard`); raise TicketRefused saying why."""
    if not data:
        raise TicketRefused("no transfer ticket (an unsigned begin request)")
    try:
        opened = open_envelope(data, me, guard, max_age_s=TICKET_TTL_S, now=now)
    except EnvelopeRejected as exc:
        raise TicketRefused(f"transfer ticket refused: {exc.message}") from exc
    if opened.header.type != TICKET_TYPE:
        raise TicketRefused(f"a {opened.header.type[:32]!r} envelope is not a transfer ticket")
    try:
        fields = msgpack.unpackb(opened.payload, raw=False, strict_map_key=True, max_str_len=256, max_array_len=0,
                                 max_map_len=8)
        transfer, size, packed = str(fields["transfer"]), int(fields["size"]), bytes(fields["digests"])
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise TicketRefused(f"malformed transfer ticket ({type(exc).__name__})") from exc
    if not 0 < size <= max_size:
        raise TicketRefused(f"transfer of {size} bytes (limit {max_size})")
    count, remainder = divmod(len(packed), DIGEST_BYTES)
    if remainder or not 0 < count <= size // min_chunk + 1:
        raise TicketRefused("transfer ticket's chunk digests do not fit its size")
    digests = [packed[i : i + DIGEST_BYTES] for i in range(0, len(packed), DIGEST_BYTES)]
    return Ticket(opened.sender, transfer, size, digests, opened.header.ts + TICKET_TTL_S)
