"""Signed, end-to-end encrypted envelopes: the only thing fedpod ever puts on the broker.

Frame layout (chosen so that a 400 MB body is never copied through a serialiser):

    b"FPE1" | u32 header length | header (msgpack) | Ed25519 signature (64) | body

The signature covers the header. The header names the sender (with both public keys, so
that an unknown modeller's first message can become an access request), the recipient's
fingerprint, the message type, task id, sequence number, timestamp and a random nonce.

An encrypted body is AES-256-GCM under a fresh content key; the content key is wrapped for
each recipient with a key derived (HKDF) from an ephemeral X25519 exchange. The body is
encrypted in segments of at most 8 MiB (their sizes are in the signed header; each
segment's associated data carries its index and whether it is the last, so segments cannot be
reordered, dropped or truncated). Segments let a payload given as several parts be encrypted
without first being joined, and decrypted in place into one buffer. With a single
recipient the GCM tag binds the body to the signed, wrapped key, so no digest is needed;
with several recipients (or a plaintext broadcast such as a heartbeat) any recipient could
forge a body under the shared key, so the header then also carries the body's SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, ValidationError

from fedpod.errors import EnvelopeRejected
from fedpod.security.identity import Identity, PublicIdentity

MAGIC = b"FPE1"
_PREFIX = struct.Struct(">4sI")
SIGNATURE_BYTES = 64
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_AGE_S = 300.0
DEFAULT_MAX_SKEW_S = 30.0
SEGMENT_BYTES = 8 * 1024 * 1024
TAG_BYTES = 16
NONCE_BYTES = 16
Buffer = bytes | bytearray | memoryview


class Wrap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    to: str
    key: bytes


class Encryption(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ephemeral: bytes
    nonce: bytes
    wraps: list[Wrap]
    segments: list[int]


class Header(BaseModel):
    """The signed part of an envelope. Unknown fields are refused: the header is ours alone."""

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
    body_len: int
    digest: bytes | None
    enc: Encryption | None

    @property
    def sender(self) -> PublicIdentity:
        return PublicIdentity(self.sender_name, self.sign_public, self.box_public)


async def _nothing_to_acknowledge() -> None:
    return None


@dataclass(frozen=True)
class Opened:
    """A verified envelope: who sent it, what type, and the decrypted payload. `acknowledge`
    tells the sender it arrived (set by the channel that received it)."""

    header: Header
    payload: bytes | bytearray
    acknowledge: Callable[[], Awaitable[None]] = _nothing_to_acknowledge

    @property
    def sender(self) -> PublicIdentity:
        return self.header.sender


def _kek(shared: bytes, ephemeral: bytes, recipient_box: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"fedpod-wrap-v1" + ephemeral + recipient_box).derive(shared)


def _segments(parts: Sequence[Buffer]) -> Iterator[memoryview]:
    produced = False
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), SEGMENT_BYTES):
            produced = True
            yield view[start : start + SEGMENT_BYTES]
    if not produced:
        yield memoryview(b"")


def _segment_nonce(base: bytes, index: int) -> bytes:
    return base + index.to_bytes(4, "big")


def _segment_aad(envelope_nonce: bytes, index: int, last: bool) -> bytes:
    return envelope_nonce + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def seal(
    sender: Identity,
    message_type: str,
    payload: Buffer | Sequence[Buffer],
    *,
    recipients: list[PublicIdentity] | None,
    task_id: str = "",
    seq: int = 0,
    now: float | None = None,
) -> list[Buffer]:
    """Build an envelope; returns its parts (head, then the body's parts) so that large bodies
    are never joined. `payload` may itself be a list of parts.

    `recipients=None` makes a signed plaintext broadcast (heartbeats, discovery requests).
    """
    parts: Sequence[Buffer] = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    nonce = os.urandom(NONCE_BYTES)
    enc: Encryption | None = None
    hasher = hashlib.sha256()
    body: list[Buffer]
    if recipients is None:
        body = list(parts)
        for part in body:
            hasher.update(part)
        digest: bytes | None = hasher.digest()
    else:
        if not recipients:
            raise ValueError("an encrypted envelope needs at least one recipient")
        content_key = AESGCM.generate_key(256)
        cipher = AESGCM(content_key)
        base = os.urandom(8)
        segments = list(_segments(parts))
        body = [cipher.encrypt(_segment_nonce(base, i), segment, _segment_aad(nonce, i, i == len(segments) - 1))
                for i, segment in enumerate(segments)]
        ephemeral = X25519PrivateKey.generate()
        ephemeral_public = ephemeral.public_key().public_bytes_raw()
        wraps = []
        for recipient in recipients:
            shared = ephemeral.exchange(recipient.box_key())
            kek = _kek(shared, ephemeral_public, recipient.box_public)
            wraps.append(Wrap(to=recipient.fingerprint, key=AESGCM(kek).encrypt(b"\0" * 12, content_key, nonce)))
        enc = Encryption(ephemeral=ephemeral_public, nonce=base, wraps=wraps, segments=[len(s) for s in segments])
        digest = None
        if len(recipients) > 1:
            for part in body:
                hasher.update(part)
            digest = hasher.digest()
    public = sender.public
    header = Header(
        v=1,
        type=message_type,
        sender_name=public.name,
        sign_public=public.sign_public,
        box_public=public.box_public,
        to=recipients[0].fingerprint if recipients and len(recipients) == 1 else None,
        task=task_id,
        seq=seq,
        ts=time.time() if now is None else now,
        nonce=nonce,
        body_len=sum(len(part) for part in body),
        digest=digest,
        enc=enc,
    )
    header_bytes = msgpack.packb(header.model_dump(), use_bin_type=True)
    head = _PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + sender.sign(header_bytes)
    return [head, *body]


def seal_bytes(*args: Any, **kwargs: Any) -> bytes:
    """`seal` joined into one bytes object, for small messages and tests."""
    return b"".join(bytes(part) for part in seal(*args, **kwargs))


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
) -> Opened:
    """Verify and decrypt an envelope addressed to `me` (or a broadcast); raise EnvelopeRejected."""
    view = memoryview(frame)
    if len(view) < _PREFIX.size + SIGNATURE_BYTES:
        raise EnvelopeRejected("malformed", "frame too short")
    magic, header_len = _PREFIX.unpack(view[: _PREFIX.size])
    if magic != MAGIC:
        raise EnvelopeRejected("malformed", "not a fedpod envelope")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len + SIGNATURE_BYTES > len(view):
        raise EnvelopeRejected("malformed", "bad header length")
    header_end = _PREFIX.size + header_len
    header_bytes = bytes(view[_PREFIX.size : header_end])
    signature = bytes(view[header_end : header_end + SIGNATURE_BYTES])
    body = view[header_end + SIGNATURE_BYTES :]
    try:
        header = Header.model_validate(msgpack.unpackb(header_bytes, raw=False, strict_map_key=True))
    except (ValueError, ValidationError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EnvelopeRejected("malformed", f"header does not decode: {type(exc).__name__}") from exc
    if signature == b"\0" * SIGNATURE_BYTES:
        raise EnvelopeRejected("unsigned")
    try:
        header.sender.verify_key().verify(signature, header_bytes)
    except (InvalidSignature, ValueError) as exc:
        raise EnvelopeRejected("bad-signature", f"claimed sender {header.sender_name}") from exc
    if header.v != 1:
        raise EnvelopeRejected("malformed", f"unsupported envelope version {header.v}")
    if len(header.nonce) != NONCE_BYTES:
        raise EnvelopeRejected("malformed", "nonce is not 16 bytes")
    if header.body_len != len(body):
        raise EnvelopeRejected("tampered", "body length differs from the signed length")
    if header.digest is not None and hashlib.sha256(body).digest() != header.digest:
        raise EnvelopeRejected("tampered", "body digest differs from the signed digest")
    my_fingerprint = me.fingerprint
    if header.to is not None and header.to != my_fingerprint:
        raise EnvelopeRejected("wrong-recipient", f"addressed to {header.to}")
    current = time.time() if now is None else now
    if current - header.ts > max_age_s:
        raise EnvelopeRejected("expired", f"{current - header.ts:.0f}s old")
    if header.ts - current > max_skew_s:
        raise EnvelopeRejected("future", f"{header.ts - current:.0f}s ahead of this clock")
    if guard.seen(header.sender, header.nonce):
        raise EnvelopeRejected("replayed", f"nonce seen before from {header.sender_name}")
    payload: bytes | bytearray
    if header.enc is None:
        if header.digest is None:
            raise EnvelopeRejected("malformed", "plaintext body without digest")
        payload = bytes(body)
    else:
        payload = _decrypt(header, header.enc, body, me, my_fingerprint)
    # Remember the nonce only once the body authenticated: otherwise a tampered copy of a
    # genuine envelope, sent first, would get the genuine one refused as a replay.
    if not guard.check_and_remember(header.sender, header.nonce, header.ts, current):
        raise EnvelopeRejected("replayed", f"nonce seen before from {header.sender_name}")
    return Opened(header, payload)


def _decrypt(header: Header, enc: Encryption, body: memoryview, me: Identity, my_fingerprint: str) -> bytearray:
    if len(enc.wraps) > 1 and header.digest is None:
        raise EnvelopeRejected("malformed", "multi-recipient body without digest")
    if len(enc.nonce) != 8 or not enc.segments or any(size < 0 or size > SEGMENT_BYTES for size in enc.segments) \
            or sum(size + TAG_BYTES for size in enc.segments) != len(body):
        raise EnvelopeRejected("tampered", "segment sizes do not match the body")
    wrap = next((w for w in enc.wraps if w.to == my_fingerprint), None)
    if wrap is None:
        raise EnvelopeRejected("wrong-recipient", "no content key wrapped for this party")
    try:
        shared = me.box_key.exchange(X25519PublicKey.from_public_bytes(enc.ephemeral))
        kek = _kek(shared, enc.ephemeral, me.public.box_public)
        content_key = AESGCM(kek).decrypt(b"\0" * 12, wrap.key, header.nonce)
        cipher = AESGCM(content_key)
        plain = bytearray(sum(enc.segments))
        out = memoryview(plain)
        read = written = 0
        last = len(enc.segments) - 1
        for index, size in enumerate(enc.segments):
            cipher.decrypt_into(_segment_nonce(enc.nonce, index), body[read : read + size + TAG_BYTES],
                                _segment_aad(header.nonce, index, index == last), out[written : written + size])
            read += size + TAG_BYTES
            written += size
        return plain
    except (InvalidTag, ValueError) as exc:
        raise EnvelopeRejected("tampered", "body does not decrypt") from exc
