"""Shamir's t-of-n secret sharing of 32-byte secrets over the prime field of 2^521 - 1.

A share is (x, y) with x in 1..n. Any t shares give the secret back; fewer give nothing.
`combine` checks every share beyond the first t against the polynomial, so a wrong share is
found (and `recover` names it) instead of yielding a wrong secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from itertools import combinations, islice

PRIME = 2**521 - 1
SECRET_BYTES = 32
Share = tuple[int, int]


def split(secret: bytes, n: int, t: int) -> list[Share]:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes")
    if not 1 <= t <= n:
        raise ValueError(f"threshold {t} must be between 1 and the number of shares {n}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    return [(x, _evaluate(coefficients, x)) for x in range(1, n + 1)]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value


def _interpolate(shares: Sequence[Share], at: int) -> int:
    """The value at `at` of the polynomial through `shares` (Lagrange)."""
    total = 0
    for i, (xi, yi) in enumerate(shares):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _to_secret(value: int) -> bytes:
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares do not lie on one polynomial")
    return value.to_bytes(SECRET_BYTES, "big")


def combine(shares: Sequence[Share], t: int) -> bytes:
    """The secret from at least `t` shares; ValueError if they are too few, repeat an x, or do
    not all lie on one polynomial of degree t - 1."""
    if len({x for x, _ in shares}) != len(shares):
        raise ValueError("two shares have the same x")
    if len(shares) < t:
        raise ValueError(f"{len(shares)} shares, {t} needed")
    basis = list(shares[:t])
    for x, y in shares[t:]:
        if _interpolate(basis, x) != y % PRIME:
            raise ValueError("the shares do not lie on one polynomial")
    return _to_secret(_interpolate(basis, 0))


def recover(shares: dict[str, Share], t: int, check: Callable[[bytes], bool],
            max_tries: int = 5000) -> tuple[bytes, list[str]]:
    """Where `combine` fails: the secret that `check` accepts (a commitment, or a public key it
    must match), found from some t of the shares, and the holders whose shares are off its
    polynomial. ValueError if no set of t shares (of the first `max_tries`) gives one."""
    holders = sorted(shares)
    for basis in islice(combinations(holders, t), max_tries):
        points = [shares[h] for h in basis]
        try:
            candidate = _to_secret(_interpolate(points, 0))
        except ValueError:
            continue
        if check(candidate):
            wrong = [h for h in holders if _interpolate(points, shares[h][0]) != shares[h][1] % PRIME]
            return candidate, wrong
    raise ValueError(f"no {t} of the {len(shares)} shares give the committed secret")
