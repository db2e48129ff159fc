from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpod.errors import EnvelopeRejected
from fedpod.security import envelope
from fedpod.security.envelope import MAGIC, ReplayGuard, announced_sender, open_envelope, seal, seal_bytes
from fedpod.security.identity import Identity
from tests.conftest import Impersonator

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
CAROL = Identity.generate("carol")


def reason(frame: bytes, me: Identity = BOB, guard: ReplayGuard | None = None, **kwargs: Any) -> str:
    with pytest.raises(EnvelopeRejected) as info:
        open_envelope(frame, me, guard or ReplayGuard(), **kwargs)
    return info.value.reason


@settings(max_examples=50, deadline=None)
@given(payload=st.binary(max_size=5000), task=st.text(max_size=20), seq=st.integers(0, 2**40))
def test_envelope_round_trips_any_payload(payload: bytes, task: str, seq: int) -> None:
    frame = seal_bytes(ALICE, "task", payload, recipients=[BOB.public], task_id=task, seq=seq)
    opened = open_envelope(frame, BOB, ReplayGuard())
    assert opened.payload == payload
    assert opened.sender.fingerprint == ALICE.fingerprint
    assert (opened.header.task, opened.header.seq, opened.header.type) == (task, seq, "task")


def test_payload_is_not_visible_in_the_frame() -> None:
    secret = b"patient 12345 has diagnosis X" * 4
    frame = seal_bytes(ALICE, "task", secret, recipients=[BOB.public])
    assert secret[:20] not in frame


@pytest.mark.parametrize("recipients,announce", [([BOB], False), ([BOB, CAROL], False), ([CAROL, BOB], True)],
                         ids=["one", "two", "announced"])
def test_every_single_bit_change_is_rejected(recipients: list[Identity], announce: bool) -> None:
    frame = seal_bytes(ALICE, "result", b"x" * 64, recipients=[r.public for r in recipients], task_id="t",
                       announce=announce)
    open_envelope(frame, BOB, ReplayGuard())  # the original is fine
    for bit in range(len(frame) * 8):
        tampered = bytearray(frame)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(EnvelopeRejected):
            open_envelope(bytes(tampered), BOB, ReplayGuard())


def test_truncated_or_extended_frames_are_rejected() -> None:
    frame = seal_bytes(ALICE, "task", b"payload", recipients=[BOB.public])
    for cut in range(len(frame)):
        with pytest.raises(EnvelopeRejected):
            open_envelope(frame[:cut], BOB, ReplayGuard())
    assert reason(frame + b"\0") == "tampered"


def test_replayed_envelope_is_rejected() -> None:
    frame = seal_bytes(ALICE, "task", b"once", recipients=[BOB.public])
    guard = ReplayGuard()
    open_envelope(frame, BOB, guard)
    assert reason(frame, guard=guard) == "replayed"


def test_expired_and_future_envelopes_are_rejected() -> None:
    old = seal_bytes(ALICE, "task", b"", recipients=[BOB.public], now=1_000.0)
    assert reason(old, now=1_000.0 + 301) == "expired"
    future = seal_bytes(ALICE, "task", b"", recipients=[BOB.public], now=2_000.0)
    assert reason(future, now=2_000.0 - 31) == "future"


def test_envelope_for_someone_else_is_rejected() -> None:
    frame = seal_bytes(ALICE, "task", b"for bob", recipients=[BOB.public])
    assert reason(frame, me=CAROL) == "wrong-recipient"


class Unsigning:
    """A sender that leaves the signature empty."""

    public = ALICE.public

    @staticmethod
    def sign(data: bytes) -> bytes:
        return b"\0" * 64


def test_unsigned_envelope_is_rejected() -> None:
    assert reason(seal_bytes(Unsigning(), "task", b"x", recipients=[BOB.public])) == "unsigned"


def test_forged_sender_claiming_anothers_keys_is_rejected() -> None:
    """Mallory puts Alice's public keys in the header but can only sign with her own key."""
    forged = seal_bytes(Impersonator(Identity.generate("alice"), ALICE), "task", b"x", recipients=[BOB.public])
    assert reason(forged) == "bad-signature"


def test_an_observer_reads_no_name_type_task_or_keys() -> None:
    """Finding 11: all a broker client sees is the outer part — an ephemeral key, opaque wraps."""
    frame = seal_bytes(ALICE, "task", b"x", recipients=[BOB.public, CAROL.public], task_id="task-7f3a")
    outer_len = struct.unpack(">4sI", frame[:8])[1]
    outer = msgpack.unpackb(frame[8 : 8 + outer_len])
    assert set(outer) == {"v", "ephemeral", "base", "wraps", "header_len", "keys"} and outer["keys"] is None
    for visible in (b"alice", b"task-7f3a", b"task", ALICE.public.sign_public, ALICE.public.box_public,
                    BOB.fingerprint.encode(), BOB.public.box_public):
        assert visible not in frame
    assert announced_sender(frame) is None


def test_an_announcement_shows_the_senders_keys_only() -> None:
    frame = seal_bytes(ALICE, "heartbeat", b"pod alice, 2 tasks", recipients=[BOB.public], announce=True)
    assert announced_sender(frame) == (ALICE.public.sign_public, ALICE.public.box_public)
    assert b"alice" not in frame and b"heartbeat" not in frame
    assert open_envelope(frame, BOB, ReplayGuard()).payload == b"pod alice, 2 tasks"
    assert reason(frame, me=CAROL) == "wrong-recipient"
    nobody = seal_bytes(ALICE, "heartbeat", b"", recipients=[], announce=True)
    assert reason(nobody) == "wrong-recipient"
    with pytest.raises(ValueError, match="at least one recipient"):
        seal(ALICE, "task", b"", recipients=[])


def test_a_co_recipient_cannot_rewrap_a_multi_recipient_envelope() -> None:
    """Carol, a recipient, knows the content key; she re-seals Alice's signed header for Bob
    alone (dropping her own wrap). The signature covers the outer part: Bob refuses it."""
    frame = seal_bytes(ALICE, "model", b"weights", recipients=[BOB.public, CAROL.public])
    outer_len = struct.unpack(">4sI", frame[:8])[1]
    outer = msgpack.unpackb(frame[8 : 8 + outer_len])
    outer["wraps"] = outer["wraps"][:1]
    packed = msgpack.packb(outer, use_bin_type=True)
    stripped = struct.pack(">4sI", MAGIC, len(packed)) + packed + frame[8 + outer_len :]
    assert reason(stripped) == "tampered"  # the sealed header's associated data no longer matches


def _reencrypted_by(recipient: Identity, frame: bytes, body: bytes) -> bytes:
    """`frame` with its body replaced by `body` (the same length), encrypted under the content
    key, as any recipient of a multi-recipient envelope can: only the signed digest tells."""
    outer, _, header_start = envelope._outer(memoryview(frame))
    cipher = AESGCM(envelope._unwrap(outer, recipient))
    opened = open_envelope(frame, recipient, ReplayGuard())
    nonce, sizes = opened.header.nonce, opened.header.segments
    assert sizes == [len(body)]
    forged = cipher.encrypt(envelope._gcm_nonce(outer.base, 0), body, envelope._segment_aad(nonce, 0, True))
    return frame[: header_start + outer.header_len] + forged


def test_a_co_recipient_cannot_swap_a_multi_recipient_body_unless_the_signer_vouched_for_the_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    frame = seal_bytes(ALICE, "model", b"weights!", recipients=[BOB.public, CAROL.public])
    forged = _reencrypted_by(CAROL, frame, b"poisons!")
    with pytest.raises(EnvelopeRejected, match="body digest differs"):
        open_envelope(forged, BOB, ReplayGuard())
    with pytest.raises(EnvelopeRejected, match="body digest differs"):  # Carol's ticket vouches for no Alice bytes
        open_envelope(forged, BOB, ReplayGuard(), vouched_by=CAROL.fingerprint)
    hashed: list[int] = []
    monkeypatch.setattr(envelope, "bulk_digest", lambda body: hashed.append(len(body)) or b"")
    # The bus checked every chunk against a ticket Alice signed: these are her bytes, not hashed again.
    assert open_envelope(frame, BOB, ReplayGuard(), vouched_by=ALICE.fingerprint).payload == b"weights!"
    assert hashed == []


def test_garbage_is_rejected_as_malformed() -> None:
    for garbage in (b"", b"hello", MAGIC + b"\xff" * 100, msgpack.packb({"a": 1}) * 20, b"FPE1" + bytes(200)):
        assert reason(garbage) == "malformed"


def test_an_envelope_of_another_version_is_refused_naming_both_versions() -> None:
    """A party not yet upgraded (version 2 digests bodies with SHA-256) hears which side to
    upgrade, not that it sent garbage."""
    frame = seal_bytes(ALICE, "task", b"x", recipients=[BOB.public])
    with pytest.raises(EnvelopeRejected, match=r"envelope version 2; this party reads version 3 \(upgrade"):
        open_envelope(b"FPE2" + frame[4:], BOB, ReplayGuard())


def test_multi_recipient_envelope_opens_for_each_recipient() -> None:
    frame = seal_bytes(ALICE, "model", b"weights", recipients=[BOB.public, CAROL.public])
    assert open_envelope(frame, BOB, ReplayGuard()).payload == b"weights"
    assert open_envelope(frame, CAROL, ReplayGuard()).payload == b"weights"


def test_replay_guard_forgets_entries_older_than_the_window() -> None:
    guard = ReplayGuard(max_age_s=10)
    sender = ALICE.public
    assert guard.check_and_remember(sender, b"n", ts=0, now=0)
    assert not guard.check_and_remember(sender, b"n", ts=0, now=5)
    guard.check_and_remember(sender, b"other", ts=100, now=100)
    assert len(guard._seen) == 1


def test_a_durable_guard_remembers_trusted_senders_across_restarts(tmp_path: Path) -> None:
    from fedpod.security.replay import DurableReplayGuard

    path = tmp_path / "nonces.bin"
    trusted = {ALICE.fingerprint}.__contains__
    first = DurableReplayGuard(path, trusted)
    now = time.time()
    assert first.check_and_remember(ALICE.public, b"n" * 16, ts=now, now=now)
    assert first.check_and_remember(BOB.public, b"m" * 16, ts=now, now=now)  # untrusted: memory only
    first.close()
    second = DurableReplayGuard(path, trusted)
    assert second.seen(ALICE.public, b"n" * 16)
    assert not second.check_and_remember(ALICE.public, b"n" * 16, ts=now, now=now)
    assert second.check_and_remember(BOB.public, b"m" * 16, ts=now, now=now)
    second.close()
    with path.open("ab") as handle:
        handle.write(b"torn")  # a crash mid-write leaves a partial record: it is dropped, not fatal
    assert DurableReplayGuard(path, trusted).seen(ALICE.public, b"n" * 16)


def test_tampered_copy_does_not_get_the_genuine_envelope_refused() -> None:
    frame = seal_bytes(ALICE, "task", b"genuine", recipients=[BOB.public])
    tampered = bytearray(frame)
    tampered[-3] ^= 0x04
    guard = ReplayGuard()
    assert reason(bytes(tampered), guard=guard) == "tampered"
    assert open_envelope(frame, BOB, guard).payload == b"genuine"


def test_multi_segment_payload_given_in_parts_round_trips() -> None:
    parts = [b"a" * 5, bytes(range(256)) * (40 * 1024), b"z" * (9 * 1024 * 1024)]
    frame = seal_bytes(ALICE, "result", parts, recipients=[BOB.public])
    assert open_envelope(frame, BOB, ReplayGuard()).payload == b"".join(parts)


def test_reordered_segments_are_rejected() -> None:
    head, body = seal(ALICE, "result", os.urandom(20 * 1024 * 1024), recipients=[BOB.public])
    segment = 8 * 1024 * 1024 + 16  # two full segments and a shorter last one
    first, second, rest = body[:segment], body[segment : 2 * segment], body[2 * segment :]
    assert reason(bytes(head) + bytes(second) + bytes(first) + bytes(rest)) == "tampered"


def test_a_large_writable_frame_is_decrypted_where_it_lies() -> None:
    """A reassembled transfer is decrypted in place (no second large buffer); a tampered one is
    still refused, and a read-only frame is left as it was."""
    payload = os.urandom(20 * 1024 * 1024)
    frame = bytearray(seal_bytes(ALICE, "result", payload, recipients=[BOB.public]))
    untouched = bytes(frame)
    assert open_envelope(bytes(frame), BOB, ReplayGuard()).payload == payload
    opened = open_envelope(memoryview(frame), BOB, ReplayGuard())
    assert opened.payload == payload and isinstance(opened.payload, memoryview) and opened.payload.obj is frame
    tampered = bytearray(untouched)
    tampered[-100] ^= 1
    assert reason(memoryview(tampered)) == "tampered"
