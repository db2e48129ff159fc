"""Transfer tickets: what a sender must show before a receiver spends anything on a large message.

A message larger than the broker's `max_payload` travels as chunks, announced by a "begin"
request. Anyone who can publish to an inbox can send such a request, so the receiver must
not allocate, queue or even remember anything for it until it knows who sends it. The begin
request therefore carries a ticket, signed with the sender's identity key:

    msgpack {v, sign, box, to, transfer, size, expires, digests} | Ed25519 signature (64)

`to` is the recipient's fingerprint (a ticket cannot be replayed to someone else), `expires`
bounds how long it can be replayed at all, and `digests` holds the SHA-256 of every chunk, so
that a chunk injected by anyone else — even with a transfer id seen on the wire — is told apart
from the genuine one and ignored instead of corrupting or cutting the transfer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedpod.security.identity import Identity, PublicIdentity

SIGNATURE_BYTES = 64
TICKET_TTL_S = 60.0
MAX_SKEW_S = 30.0
DIGEST_BYTES = 32


class TicketRefused(ValueError):
    """A begin request whose ticket is missing, malformed, forged, expired or not for us."""


@dataclass(frozen=True)
class Ticket:
    sender: PublicIdentity
    transfer: str
    size: int
    digests: list[bytes]
    expires: float


def issue_ticket(identity: Identity, recipient: str, transfer: str, size: int, digests: list[bytes],
                 *, now: float | None = None) -> bytes:
    public = identity.public
    body: bytes = msgpack.packb({"v": 1, "name": public.name, "sign": public.sign_public, "box": public.box_public,
                          "to": recipient, "transfer": transfer, "size": size,
                          "expires": (time.time() if now is None else now) + TICKET_TTL_S,
                          "digests": b"".join(digests)}, use_bin_type=True)
    return body + identity.sign(body)


def check_ticket(data: bytes | bytearray | memoryview, me: str, *, max_size: int, min_chunk: int,
                 now: float | None = None) -> Ticket:
    """Verify a ticket addressed to fingerprint `me`; raise TicketRefused saying why."""
    raw = bytes(data)
    if len(raw) <= SIGNATURE_BYTES:
        raise TicketRefused("no transfer ticket (an unsigned begin request)")
    body, signature = raw[:-SIGNATURE_BYTES], raw[-SIGNATURE_BYTES:]
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=len(body),
                                 max_str_len=256, max_array_len=0, max_map_len=16)
        sender = PublicIdentity(str(fields["name"]), bytes(fields["sign"]), bytes(fields["box"]))
        Ed25519PublicKey.from_public_bytes(sender.sign_public).verify(signature, body)
        recipient, transfer = str(fields["to"]), str(fields["transfer"])
        size, expires, packed = int(fields["size"]), float(fields["expires"]), bytes(fields["digests"])
    except InvalidSignature as exc:
        raise TicketRefused("transfer ticket signature does not verify") from exc
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise TicketRefused(f"malformed transfer ticket ({type(exc).__name__})") from exc
    current = time.time() if now is None else now
    if recipient != me:
        raise TicketRefused(f"transfer ticket is for {recipient}")
    if not current <= expires <= current + TICKET_TTL_S + MAX_SKEW_S:
        raise TicketRefused("transfer ticket expired (or is dated too far ahead)")
    if not 0 < size <= max_size:
        raise TicketRefused(f"transfer of {size} bytes (limit {max_size})")
    count, remainder = divmod(len(packed), DIGEST_BYTES)
    if remainder or not 0 < count <= size // min_chunk + 1:
        raise TicketRefused("transfer ticket's chunk digests do not fit its size")
    digests = [packed[i : i + DIGEST_BYTES] for i in range(0, len(packed), DIGEST_BYTES)]
    return Ticket(sender, transfer, size, digests, expires)
