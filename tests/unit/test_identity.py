from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fedpod.errors import ConfigError
from fedpod.security.identity import Identity


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
