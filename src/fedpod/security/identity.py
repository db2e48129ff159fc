"""Party identities: an Ed25519 signing key and an X25519 encryption key.

The fingerprint hashes both public keys, so pinning a fingerprint pins both. It is short
(16 base32 characters in four groups) so that two people can compare it over the phone.
Private keys live in `<keystore>/<name>.key` (mode 0600); the public half in `<name>.pub`.

Verification and key agreement are libsodium's (PyNaCl), signing and key storage
`cryptography`'s: the two compute the same standard functions (RFC 8032, RFC 7748), and on the
2-core machines measured libsodium verifies an Ed25519 signature in 78 us against OpenSSL's
346 and agrees an X25519 key in 39 against 74. Every envelope opened costs one of each, and a
modeller opens every heartbeat and reply of every pod (100 pods: 25 beats and 100 replies a
round).

The same Ed25519 key is the party's NATS user key (nkeys are Ed25519 keys in NATS's own
encoding): a broker that fedpod configures lists each party's `nats_user_key`, and the party
connects with `nats_seed`, so that one key both signs envelopes and logs in to the broker.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base, crypto_sign_open

from fedpod.errors import ConfigError
from fedpod.names import check_name

SIGNATURE_BYTES = 64
KEY_BYTES = 32  # Ed25519 and X25519 keys alike
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


def fedpod_home() -> Path:
    """`$FEDPOD_HOME`, falling back to `~/.fedpod`."""
    return Path(os.environ.get("FEDPOD_HOME") or Path.home() / ".fedpod")


def default_keystore() -> Path:
    """`$FEDPOD_KEYSTORE`, else `$FEDPOD_HOME/keys`."""
    return Path(os.environ["FEDPOD_KEYSTORE"]) if os.environ.get("FEDPOD_KEYSTORE") else fedpod_home() / "keys"


def _x25519_key(key: bytes) -> bytes:
    if len(key) != KEY_BYTES:  # PyNaCl's binding does not check
        raise ValueError(f"an X25519 key is {KEY_BYTES} bytes, not {len(key)}")
    return key


def x25519(private: bytes, public: bytes) -> bytes:
    """The X25519 shared secret of a private key and a peer's public key; ValueError for a key of
    the wrong length or a low-order point (no shared secret)."""
    try:
        return bytes(crypto_scalarmult(_x25519_key(private), _x25519_key(public)))
    except (nacl.exceptions.CryptoError, TypeError) as exc:
        raise ValueError("not a usable X25519 public key") from exc


def x25519_public(private: bytes) -> bytes:
    return bytes(crypto_scalarmult_base(_x25519_key(private)))


@functools.lru_cache(maxsize=4096)
def fingerprint_of(sign_public: bytes, box_public: bytes) -> str:
    """Remembered: every message opened makes a fresh PublicIdentity of its sender's keys, and
    the fingerprint is read several times each (a hash and base32 each time, 3% of a pod's
    round at 10 pods)."""
    digest = hashlib.sha256(b"fedpod-fp-v1" + sign_public + box_public).digest()
    text = base64.b32encode(digest[:10]).decode()
    return "-".join(text[i : i + 4] for i in range(0, 16, 4))


FINGERPRINT_PATTERN = re.compile(r"^[A-Z2-7]{4}(-[A-Z2-7]{4}){3}$")


def check_fingerprint(value: str) -> str:
    """A fingerprint as `fingerprint_of` writes it (four groups of four base32 characters), or
    ConfigError: a mistyped one would otherwise be accepted and never match anyone."""
    if not FINGERPRINT_PATTERN.match(value):
        raise ConfigError(f"{value!r} is not a fingerprint", hint="it looks like ABCD-EFGH-IJKL-MNOP "
                          "(`fedpod identity show NAME` prints it); compare it out of band")
    return value


def nats_user_key(sign_public: bytes) -> str:
    """The `U…` public nkey that a NATS server lists for the holder of this Ed25519 key."""
    import nkeys

    raw = bytes([nkeys.PREFIX_BYTE_USER]) + sign_public
    return base64.b32encode(raw + bytes(nkeys.crc16_checksum(raw))).decode().rstrip("=")


@dataclass(frozen=True)
class PublicIdentity:
    """What a party shows the world; enough to verify its signatures and encrypt to it."""

    name: str
    sign_public: bytes
    box_public: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.sign_public, self.box_public)

    def verify_key(self) -> Ed25519PublicKey:
        """The key as a `cryptography` object, for code that verifies with it directly (the
        previous envelope that benchmarks/transport/envelope_cost compares with)."""
        return Ed25519PublicKey.from_public_bytes(self.sign_public)

    def box_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.box_public)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise InvalidSignature unless `signature` is this party's Ed25519 signature of `data`."""
        if len(signature) != SIGNATURE_BYTES:  # libsodium reads the first 64 bytes as the signature
            raise InvalidSignature(f"a signature is {SIGNATURE_BYTES} bytes, not {len(signature)}")
        if len(self.sign_public) != KEY_BYTES:
            raise InvalidSignature(f"an Ed25519 key is {KEY_BYTES} bytes, not {len(self.sign_public)}")
        try:
            crypto_sign_open(signature + data, self.sign_public)
        except (nacl.exceptions.CryptoError, TypeError) as exc:
            raise InvalidSignature(f"not a signature of {self.name}") from exc

    @property
    def nats_user(self) -> str:
        return nats_user_key(self.sign_public)

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "sign_public": self.sign_public.hex(),
            "box_public": self.box_public.hex(),
            "fingerprint": self.fingerprint,
            "nats_user": self.nats_user,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> PublicIdentity:
        return cls(data["name"], bytes.fromhex(data["sign_public"]), bytes.fromhex(data["box_public"]))

    @classmethod
    def load(cls, path: Path) -> PublicIdentity:
        """Read a `<name>.pub` file (what a party hands to a custodian or a broker operator)."""
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read public identity {path}: {exc}",
                              hint="pass the NAME.pub file written beside the identity's key") from exc


@dataclass(frozen=True)
class Identity:
    """A party's private keys. Never serialised anywhere but its own keystore file."""

    name: str
    signing_key: Ed25519PrivateKey
    box_key: X25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(check_name(name, "identity"), Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @functools.cached_property
    def public(self) -> PublicIdentity:  # its keys serialised once, not for every message sealed
        return PublicIdentity(
            self.name,
            self.signing_key.public_key().public_bytes(_RAW, _RAW_PUB),
            self.box_key.public_key().public_bytes(_RAW, _RAW_PUB),
        )

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data)

    @functools.cached_property
    def box_private(self) -> bytes:
        """The raw X25519 private key, for `x25519`."""
        return self.box_key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)

    @property
    def nats_seed(self) -> str:
        """The NATS user seed (`SU…`) of this identity's signing key, for nats-py's `nkeys_seed_str`."""
        import nkeys

        raw = self.signing_key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)
        return bytes(nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER)).decode()

    def save(self, keystore: Path) -> Path:
        """Write `<name>.key` (0600, created with that mode so it is never world-readable)."""
        check_name(self.name, "identity")
        keystore.mkdir(parents=True, exist_ok=True)
        ignore = keystore / ".gitignore"
        if not ignore.exists():  # a keystore inside a git work tree (a pod folder) is never committed
            ignore.write_text("# private keys: never commit them (written by fedpod)\n*.key\n")
        path = keystore / f"{self.name}.key"
        if path.exists():
            raise ConfigError(f"identity {self.name!r} already exists", where=str(path),
                              hint="choose another name or delete the old key deliberately")
        secret = {
            "name": self.name,
            "sign_private": self.signing_key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC).hex(),
            "box_private": self.box_key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC).hex(),
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(secret, handle)
        os.chmod(path, 0o600)
        (keystore / f"{self.name}.pub").write_text(json.dumps(self.public.as_dict(), indent=2))
        return path

    @classmethod
    def load(cls, name_or_path: str | Path, keystore: Path | None = None) -> Identity:
        """Load by name from a keystore, or from an explicit `.key` path."""
        path = Path(name_or_path)
        if path.suffix != ".key":
            path = (keystore or default_keystore()) / f"{check_name(str(name_or_path), 'identity')}.key"
        if not path.exists():
            raise ConfigError(f"no identity at {path}", hint="create one with `fedpod identity create NAME`")
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"key file {path} is readable by others", hint=f"chmod 600 {path}")
        try:
            data = json.loads(path.read_text())
            return cls(
                check_name(data["name"], "identity"),
                Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["sign_private"])),
                X25519PrivateKey.from_private_bytes(bytes.fromhex(data["box_private"])),
            )
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"key file {path} is corrupt: {exc}") from exc

    @classmethod
    def load_or_create(cls, name: str, keystore: Path) -> Identity:
        check_name(name, "identity")
        try:
            return cls.load(name, keystore)
        except ConfigError:
            if (keystore / f"{name}.key").exists():
                raise
            identity = cls.generate(name)
            identity.save(keystore)
            return identity
