"""Key agreement, mask expansion and the sealing of shares between two pods.

Two pods agree a 32-byte seed from X25519 (their key pairs for this round) and HKDF-SHA256 bound
to the round's context; AES-256-CTR expands a seed into as many 64-bit words as the update has
(about 1.6 GB/s here). The seeds of the share-sealing keys and of the masks come from separate
key pairs, as in the paper, so that revealing one never reveals the other.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpod.security.identity import KEY_BYTES, x25519, x25519_public


def new_private_key() -> bytes:
    return os.urandom(KEY_BYTES)  # any 32 bytes: X25519 clamps the scalar itself (RFC 7748)


def public_key(private: bytes) -> bytes:
    return x25519_public(private)


def agree(private: bytes, peer_public: bytes, context: bytes, purpose: bytes) -> bytes:
    """The seed two pods share: X25519 then HKDF over the round's context and the purpose."""
    shared = x25519(private, peer_public)
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=purpose + b"\0" + context).derive(shared)


_EXPAND_CHUNK = 1 << 20  # bytes of keystream a call: the zeros it encrypts stay 1 MiB for any model


def expand(seed: bytes, count: int) -> np.ndarray:
    """`count` pseudo-random uint64 words from a 32-byte seed (AES-256-CTR of zeros)."""
    size = 8 * count
    buffer = bytearray(size + 15)  # room for the block beyond the input update_into wants
    zeros = memoryview(bytes(min(size, _EXPAND_CHUNK)))  # cryptography refuses an input that overlaps its output
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    for start in range(0, size, _EXPAND_CHUNK):
        length = min(_EXPAND_CHUNK, size - start)
        encryptor.update_into(zeros[:length], memoryview(buffer)[start : start + length + 15])
    return np.frombuffer(buffer, dtype=np.uint64, count=count)


def commitment(secret: bytes, context: bytes) -> bytes:
    """A binding commitment to a self-mask seed, sent with the public keys: a share set that
    reconstructs to anything else is caught."""
    return hashlib.sha256(b"fedpod-secagg-self-mask\0" + context + secret).digest()


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Raises cryptography's InvalidTag when the sealed bytes were altered or misaddressed."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated)
