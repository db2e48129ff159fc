"""The digest of bulk bytes: each chunk of a large transfer (listed in its signed ticket,
`security.tickets`), the body of an envelope sealed for several recipients (`security.envelope`),
and what a pod's audit log records of each result it returned (`result_blake3`; `b3sum` checks it).

BLAKE3 (32 bytes) rather than SHA-256: a cryptographic hash of the same strength for this use, at
3 to 5 times the throughput on the 2-core machines measured (1.8-2.6 against 0.5-1.0 GB/s), where a
round of a 40 MB model hashed each update four times — on the way out and in, chunk by chunk and
whole — about a fifth of a 10-pod round (benchmarks/rounds --one 10 10000000: 4.2 -> 3.2 s).
It releases the GIL, as hashlib does. Imported on first use: an idle pod's memory is its
imports (tests/unit/test_pod_imports.py), and one that only beats needs no bulk digest.
"""

from __future__ import annotations

from collections.abc import Sequence

DIGEST_BYTES = 32


Buffer = bytes | bytearray | memoryview


def bulk_digest(data: Buffer | Sequence[Buffer]) -> bytes:
    """BLAKE3 of one buffer, or of parts as if joined (a model update is its header and arrays)."""
    from blake3 import blake3

    if isinstance(data, Buffer):
        return blake3(data).digest()
    hasher = blake3()
    for part in data:
        hasher.update(part)
    return hasher.digest()
