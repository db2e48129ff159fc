from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from fedpod.errors import ConfigError
from fedpod.security.identity import Identity, PublicIdentity, x25519, x25519_public


def test_identity_is_saved_with_mode_0600_and_loads_back(tmp_path: Path) -> None:
    identity = Identity.generate("alice")
    path = identity.save(tmp_path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = Identity.load("alice", tmp_path)
    assert loaded.fingerprint == identity.fingerprint


def test_fingerprint_is_short_and_comparable() -> None:
    fingerprint = Identity.generate("x").fingerprint
    assert re.fullmatch(r"[A-Z2-7]{4}(-[A-Z2-7]{4}){3}", fingerprint)
    assert fingerprint != Identity.generate("x").fingerprint


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    path = Identity.generate("bob").save(tmp_path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        Identity.load("bob", tmp_path)


def test_existing_identity_is_never_overwritten(tmp_path: Path) -> None:
    Identity.generate("carol").save(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        Identity.generate("carol").save(tmp_path)


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "", ".hidden", "x" * 129, "name with space", "ümlaut"])
def test_names_that_could_be_paths_are_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        Identity.generate(name)
    with pytest.raises(ConfigError, match="name"):
        Identity.load_or_create(name, tmp_path / "keys")
    assert not (tmp_path / "keys").exists()
    assert list(tmp_path.parent.glob("*.key")) == []


def test_the_identity_key_is_also_the_nats_user_key() -> None:
    import nkeys

    identity = Identity.generate("alice")
    pair = nkeys.from_seed(identity.nats_seed.encode())
    assert pair.public_key.decode() == identity.public.nats_user
    assert identity.public.nats_user.startswith("U") and len(identity.public.nats_user) == 56


def test_signatures_verify_with_the_signers_key_only_and_never_at_another_length() -> None:
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    message = b"outer and header bytes"
    signature = alice.sign(message)  # signed by cryptography (OpenSSL), verified by libsodium
    alice.public.verify(signature, message)
    for key, data, sig in [(bob.public, message, signature), (alice.public, message + b"!", signature),
                           (alice.public, message[1:], signature + message[:1]),  # the boundary moved
                           (alice.public, message, signature[:63]),
                           (PublicIdentity("x", b"\1" * 31, alice.public.box_public), message, signature)]:
        with pytest.raises(InvalidSignature):
            key.verify(sig, data)


def test_key_agreement_matches_the_standard_and_refuses_low_order_points() -> None:
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    standard = alice.box_key.exchange(X25519PublicKey.from_public_bytes(bob.public.box_public))
    assert x25519(alice.box_private, bob.public.box_public) == standard == x25519(bob.box_private,
                                                                                   alice.public.box_public)
    assert x25519_public(alice.box_private) == alice.public.box_public
    for bad in [b"\0" * 32, (1).to_bytes(32, "little"), b"\1" * 31]:  # low-order points, a short key
        with pytest.raises(ValueError):
            x25519(alice.box_private, bad)
