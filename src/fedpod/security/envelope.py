"""Signed, end-to-end encrypted envelopes: the only thing fedpod ever puts on the broker.

What a broker client can read of an envelope is as little as routing allows:

    b"FPE3" | u32 outer length | outer (msgpack) | sealed header | body segments

The outer part holds an ephemeral X25519 public key, one wrapped content key per recipient
(each under an 8-byte tag derived from the key exchange, which means nothing to anyone
without the recipient's private key), and the sealed header's length. A broadcast that must
be addressable by strangers (a pod's heartbeat) also shows the sender's public keys, which
say no more than the fingerprint already in its subject. Everything else — the sender's
name and keys, the message type, task id, sequence number, timestamp, nonce, recipient and
segment sizes — is in the header, which is signed and then sealed under the content key
(with the outer part as associated data). The signature covers the outer part too, so a
co-recipient cannot re-wrap or strip the keys of a multi-recipient envelope.

The body is AES-256-GCM under the same content key in segments of at most 8 MiB; each
segment's associated data carries the envelope nonce, its index and whether it is the last,
so segments cannot be reordered, dropped or truncated. Segments let a payload given as
several parts be encrypted without first being joined, and decrypted in place into one
buffer. With a single recipient the GCM tag binds the body to the signed header; with several
any recipient could forge a body under the shared key, so the header then also carries the
body's digest (`security.digest`: BLAKE3 since version 3, SHA-256 before).

Cost over the previous signed plaintext header (measured in `benchmarks/transport`): none
measurable for a message to one party (one more small AES-GCM operation); a broadcast that was
signed plaintext (heartbeats) now costs an X25519 exchange and 56 bytes per recipient.

A large body is encrypted into one buffer populated in a single call, and a large frame the
caller lets us write to is decrypted where it lies: page faults, not AES, dominated both.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, ValidationError

from fedpod.buffers import LARGE_BUFFERS
from fedpod.errors import EnvelopeRejected
from fedpod.security.digest import bulk_digest
from fedpod.security.identity import SIGNATURE_BYTES, Identity, PublicIdentity, x25519, x25519_public

if TYPE_CHECKING:
    from fedpod.transport.bus import Ack

VERSION = 3  # 3: bulk digests are BLAKE3 (security.digest); 2 had SHA-256
MAGIC = b"FPE" + str(VERSION).encode()
_PREFIX = struct.Struct(">4sI")
MAX_OUTER_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_RECIPIENTS = 10_000
DEFAULT_MAX_AGE_S = 300.0
DEFAULT_MAX_SKEW_S = 30.0
SEGMENT_BYTES = 8 * 1024 * 1024
LARGE_BYTES = 1024 * 1024
TAG_BYTES = 16
NONCE_BYTES = 16
WRAP_TAG_BYTES = 8
WRAP_BYTES = WRAP_TAG_BYTES + 32 + TAG_BYTES
_HEADER_INDEX = 0xFFFFFFFF  # the sealed header's GCM nonce suffix; segments count up from 0
Buffer = bytes | bytearray | memoryview


class Outer(BaseModel):
    """The only plaintext of an envelope. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int
    ephemeral: bytes
    base: bytes
    wraps: list[bytes]
    header_len: int
    keys: bytes | None = None


class Header(BaseModel):
    """The signed, sealed part of an envelope. Unknown fields are refused: the header is ours alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int
    type: str
    sender_name: str
    sign_public: bytes
    box_public: bytes
    to: str | None
    task: str
    seq: int
    ts: float
    nonce: bytes
    segments: list[int]
    digest: bytes | None

    @property
    def sender(self) -> PublicIdentity:
        return PublicIdentity(self.sender_name, self.sign_public, self.box_public)


async def no_acknowledgement(answer: bytes = b"") -> bool:
    """The `Ack` of what nobody waits on: an answer that arrived on an acknowledgement."""
    return False


@dataclass(frozen=True)
class Opened:
    """A verified envelope: who sent it, what type, and the decrypted payload. `acknowledge`
    tells the sender it arrived, and may carry the answer (set by the channel that received it;
    see `transport.bus.Ack`)."""

    header: Header
    payload: bytes | bytearray | memoryview
    acknowledge: Ack = no_acknowledgement

    @property
    def sender(self) -> PublicIdentity:
        return self.header.sender


def _wrap_keys(shared: bytes, ephemeral: bytes, recipient_box: bytes) -> tuple[bytes, bytes]:
    """The key that wraps the content key for one recipient, and the tag that finds its wrap."""
    derived = HKDF(hashes.SHA256(), 32 + WRAP_TAG_BYTES, salt=None,
                   info=b"fedpod-wrap-v2" + ephemeral + recipient_box).derive(shared)
    return derived[:32], derived[32:]


def _segments(parts: Sequence[Buffer]) -> Iterator[memoryview]:
    produced = False
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), SEGMENT_BYTES):
            produced = True
            yield view[start : start + SEGMENT_BYTES]
    if not produced:
        yield memoryview(b"")


def _gcm_nonce(base: bytes, index: int) -> bytes:
    return base + index.to_bytes(4, "big")


def _segment_aad(envelope_nonce: bytes, index: int, last: bool) -> bytes:
    return envelope_nonce + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def seal(
    sender: Identity,
    message_type: str,
    payload: Buffer | Sequence[Buffer],
    *,
    recipients: list[PublicIdentity],
    task_id: str = "",
    seq: int = 0,
    now: float | None = None,
    announce: bool = False,
) -> list[Buffer]:
    """Build an envelope; returns its parts (head, then the body's parts) so that large bodies
    are never joined. `payload` may itself be a list of parts.

    `announce=True` shows the sender's public keys in the outer part, for a broadcast on the
    sender's own subject (heartbeats): strangers learn where to send a sealed request, and
    nothing the subject did not already say. Only then may `recipients` be empty.
    """
    if not recipients and not announce:
        raise ValueError("an envelope needs at least one recipient")
    parts: Sequence[Buffer] = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    nonce = os.urandom(NONCE_BYTES)
    content_key = AESGCM.generate_key(256)
    cipher = AESGCM(content_key)
    base = os.urandom(8)
    segments = list(_segments(parts))
    body = _buffer(sum(len(segment) + TAG_BYTES for segment in segments))
    written = 0
    for i, segment in enumerate(segments):
        cipher.encrypt_into(_gcm_nonce(base, i), segment, _segment_aad(nonce, i, i == len(segments) - 1),
                            body[written : written + len(segment) + TAG_BYTES])
        written += len(segment) + TAG_BYTES
    digest = bulk_digest(body) if len(recipients) > 1 else None
    ephemeral = os.urandom(32)
    ephemeral_public = x25519_public(ephemeral)
    wraps = []
    for recipient in recipients:
        kek, tag = _wrap_keys(x25519(ephemeral, recipient.box_public), ephemeral_public, recipient.box_public)
        wraps.append(tag + AESGCM(kek).encrypt(b"\0" * 12, content_key, ephemeral_public))
    public = sender.public
    header = Header(
        v=VERSION,
        type=message_type,
        sender_name=public.name,
        sign_public=public.sign_public,
        box_public=public.box_public,
        to=recipients[0].fingerprint if len(recipients) == 1 else None,
        task=task_id,
        seq=seq,
        ts=time.time() if now is None else now,
        nonce=nonce,
        segments=[len(s) for s in segments],
        digest=digest,
    )
    header_bytes = msgpack.packb(header.model_dump(), use_bin_type=True)
    outer = Outer(v=VERSION, ephemeral=ephemeral_public, base=base, wraps=wraps,
                  header_len=len(header_bytes) + SIGNATURE_BYTES + TAG_BYTES,
                  keys=public.sign_public + public.box_public if announce else None)
    outer_bytes = msgpack.packb(outer.model_dump(), use_bin_type=True)
    signed = header_bytes + sender.sign(outer_bytes + header_bytes)
    sealed_header = cipher.encrypt(_gcm_nonce(base, _HEADER_INDEX), signed, outer_bytes)
    return [_PREFIX.pack(MAGIC, len(outer_bytes)) + outer_bytes + sealed_header, body]


def _buffer(size: int) -> memoryview:
    """Room for a body. A large one is lent by `fedpod.buffers` (last round's, if free) or newly
    mapped and populated in one go: on the machines measured, faulting 400 MB in page by page
    cost more than encrypting it."""
    if size < LARGE_BYTES:
        return memoryview(bytearray(size))
    return LARGE_BUFFERS.take(size, populate=True)


def seal_bytes(*args: Any, **kwargs: Any) -> bytes:
    """`seal` joined into one bytes object, for small messages and tests."""
    return b"".join(bytes(part) for part in seal(*args, **kwargs))


def _outer(view: memoryview) -> tuple[Outer, bytes, int]:
    """Parse the plaintext part: the outer fields, their bytes, and where the sealed header starts."""
    if len(view) < _PREFIX.size:
        raise EnvelopeRejected("malformed", "frame too short")
    magic, outer_len = _PREFIX.unpack(view[: _PREFIX.size])
    if magic != MAGIC:
        if magic[:3] == MAGIC[:3]:  # a party on another fedpod version: say so, not "garbage"
            raise EnvelopeRejected("malformed", f"envelope version {magic[3:].decode(errors='replace')}; this party "
                                                f"reads version {VERSION} (upgrade the older side)")
        raise EnvelopeRejected("malformed", "not a fedpod envelope")
    if outer_len > MAX_OUTER_BYTES or _PREFIX.size + outer_len > len(view):
        raise EnvelopeRejected("malformed", "bad outer length")
    outer_bytes = bytes(view[_PREFIX.size : _PREFIX.size + outer_len])
    try:
        outer = Outer.model_validate(msgpack.unpackb(outer_bytes, raw=False, strict_map_key=True,
                                                     max_array_len=MAX_RECIPIENTS, max_map_len=16))
    except (ValueError, ValidationError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EnvelopeRejected("malformed", f"outer part does not decode: {type(exc).__name__}") from exc
    if outer.v != VERSION:
        raise EnvelopeRejected("malformed", f"unsupported envelope version {outer.v}")
    if len(outer.ephemeral) != 32 or len(outer.base) != 8 or any(len(w) != WRAP_BYTES for w in outer.wraps) \
            or (outer.keys is not None and len(outer.keys) != 64):
        raise EnvelopeRejected("malformed", "outer fields have the wrong sizes")
    if not SIGNATURE_BYTES + TAG_BYTES < outer.header_len <= MAX_HEADER_BYTES \
            or _PREFIX.size + outer_len + outer.header_len > len(view):
        raise EnvelopeRejected("malformed", "bad header length")
    return outer, outer_bytes, _PREFIX.size + outer_len


def announced_sender(frame: Buffer) -> tuple[bytes, bytes] | None:
    """The (signing, encryption) public keys an announcing envelope shows, unverified — as much
    as anyone on the broker can learn from it. None if it announces nothing."""
    try:
        outer, _, _ = _outer(memoryview(frame))
    except EnvelopeRejected:
        return None
    return (outer.keys[:32], outer.keys[32:]) if outer.keys else None


class ReplayGuard:
    """Remembers (sender, nonce) pairs for the freshness window, bounded in size.

    Entries older than `max_age_s` can be forgotten safely: such envelopes are refused as
    expired before the guard is consulted. `fedpod.security.replay.DurableReplayGuard` also
    keeps the nonces of trusted senders across restarts.
    """

    def __init__(self, max_age_s: float = DEFAULT_MAX_AGE_S, max_entries: int = 200_000) -> None:
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[bytes, bytes], float] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, sender: PublicIdentity, nonce: bytes) -> bool:
        with self._lock:
            return (sender.sign_public, nonce) in self._seen

    def check_and_remember(self, sender: PublicIdentity, nonce: bytes, ts: float, now: float) -> bool:
        with self._lock:
            return self._remember(self._seen, (sender.sign_public, nonce), ts, now, self.max_entries)

    def _remember(self, seen: OrderedDict[tuple[bytes, bytes], float], key: tuple[bytes, bytes], ts: float,
                  now: float, max_entries: int | None) -> bool:
        while seen:
            oldest_key, oldest_ts = next(iter(seen.items()))
            if now - oldest_ts > self.max_age_s + DEFAULT_MAX_SKEW_S or (max_entries and len(seen) >= max_entries):
                del seen[oldest_key]
            else:
                break
        if key in seen:
            return False
        seen[key] = ts
        return True


def open_envelope(
    frame: bytes | bytearray | memoryview,
    me: Identity,
    guard: ReplayGuard,
    *,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
    now: float | None = None,
    vouched_by: str | None = None,
) -> Opened:
    """Verify and decrypt an envelope addressed to `me`; raise EnvelopeRejected saying why.

    A body sealed for several recipients carries its digest in the signed header, since each of
    them knows the content key and could otherwise swap the body for the others. `vouched_by`
    is the fingerprint of a party whose signed transfer ticket listed the digest of every chunk
    of `frame`, each checked on arrival (`transport.bus`): when that is the envelope's signer, the
    signer has vouched for these very bytes, and the body is not hashed a second time (a pod
    receiving a round's 40 MB model by cast: 9 ms)."""
    view = memoryview(frame)
    outer, outer_bytes, header_start = _outer(view)
    content_key = _unwrap(outer, me)
    cipher = AESGCM(content_key)
    body_start = header_start + outer.header_len
    try:
        signed = cipher.decrypt(_gcm_nonce(outer.base, _HEADER_INDEX), bytes(view[header_start:body_start]),
                                outer_bytes)
    except InvalidTag as exc:
        raise EnvelopeRejected("tampered", "header does not decrypt") from exc
    header_bytes, signature = signed[:-SIGNATURE_BYTES], signed[-SIGNATURE_BYTES:]
    try:
        header = Header.model_validate(msgpack.unpackb(header_bytes, raw=False, strict_map_key=True))
    except (ValueError, ValidationError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EnvelopeRejected("malformed", f"header does not decode: {type(exc).__name__}") from exc
    if signature == b"\0" * SIGNATURE_BYTES:
        raise EnvelopeRejected("unsigned")
    try:
        header.sender.verify(signature, outer_bytes + header_bytes)
    except (InvalidSignature, ValueError) as exc:
        raise EnvelopeRejected("bad-signature", f"claimed sender {header.sender_name}") from exc
    if header.v != VERSION:
        raise EnvelopeRejected("malformed", f"unsupported envelope version {header.v}")
    if len(header.nonce) != NONCE_BYTES:
        raise EnvelopeRejected("malformed", "nonce is not 16 bytes")
    if outer.keys is not None and outer.keys != header.sign_public + header.box_public:
        raise EnvelopeRejected("tampered", "announced keys differ from the signer's")
    body = view[body_start:]
    if len(outer.wraps) > 1 and header.digest is None:
        raise EnvelopeRejected("malformed", "multi-recipient body without digest")
    if not header.segments or any(size < 0 or size > SEGMENT_BYTES for size in header.segments) \
            or sum(size + TAG_BYTES for size in header.segments) != len(body):
        raise EnvelopeRejected("tampered", "body length differs from the signed segment sizes")
    if header.digest is not None and vouched_by != header.sender.fingerprint and bulk_digest(body) != header.digest:
        raise EnvelopeRejected("tampered", "body digest differs from the signed digest")
    if header.to is not None and header.to != me.fingerprint:
        raise EnvelopeRejected("wrong-recipient", f"addressed to {header.to}")
    current = time.time() if now is None else now
    if current - header.ts > max_age_s:
        raise EnvelopeRejected("expired", f"{current - header.ts:.0f}s old")
    if header.ts - current > max_skew_s:
        raise EnvelopeRejected("future", f"{header.ts - current:.0f}s ahead of this clock")
    if guard.seen(header.sender, header.nonce):
        raise EnvelopeRejected("replayed", f"nonce seen before from {header.sender_name}",
                               envelope=(header.sign_public, header.nonce))
    payload = _decrypt_body(cipher, outer.base, header, body)
    # Remember the nonce only once the body authenticated: otherwise a tampered copy of a
    # genuine envelope, sent first, would get the genuine one refused as a replay.
    if not guard.check_and_remember(header.sender, header.nonce, header.ts, current):
        raise EnvelopeRejected("replayed", f"nonce seen before from {header.sender_name}",
                               envelope=(header.sign_public, header.nonce))
    return Opened(header, payload)


def _unwrap(outer: Outer, me: Identity) -> bytes:
    """The content key wrapped for `me`: one X25519 exchange, whatever the number of wraps."""
    try:
        shared = x25519(me.box_private, outer.ephemeral)
    except ValueError as exc:  # a low-order point: no shared secret
        raise EnvelopeRejected("malformed", "invalid ephemeral key") from exc
    kek, tag = _wrap_keys(shared, outer.ephemeral, me.public.box_public)
    wrap = next((w for w in outer.wraps if w[:WRAP_TAG_BYTES] == tag), None)
    if wrap is None:
        raise EnvelopeRejected("wrong-recipient", "no content key wrapped for this party")
    try:
        return AESGCM(kek).decrypt(b"\0" * 12, wrap[WRAP_TAG_BYTES:], outer.ephemeral)
    except InvalidTag as exc:
        raise EnvelopeRejected("tampered", "content key does not unwrap") from exc


def _decrypt_body(cipher: AESGCM, base: bytes, header: Header, body: memoryview) -> memoryview:
    """The plaintext, in a new buffer — or, for a large frame the caller let us write to (a
    reassembled transfer), where the ciphertext lay: each segment is decrypted into a scratch
    buffer and copied back over ciphertext already read, so no second large buffer is faulted in."""
    in_place = not body.readonly and len(body) >= LARGE_BYTES
    total = sum(header.segments)
    out = body if in_place else _buffer(total)
    scratch = memoryview(bytearray(max(header.segments))) if in_place else None
    read = written = 0
    last = len(header.segments) - 1
    try:
        for index, size in enumerate(header.segments):
            target = scratch[:size] if scratch is not None else out[written : written + size]
            cipher.decrypt_into(_gcm_nonce(base, index), body[read : read + size + TAG_BYTES],
                                _segment_aad(header.nonce, index, index == last), target)
            if scratch is not None:
                out[written : written + size] = target
            read += size + TAG_BYTES
            written += size
    except (InvalidTag, ValueError) as exc:
        raise EnvelopeRejected("tampered", "body does not decrypt") from exc
    return out[:total]
