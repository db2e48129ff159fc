"""The four steps of secure aggregation, as the pod and the modeller each run them. Pure: the
caller carries the messages (the modeller routes everything; pods never talk to each other).

1. keys    — each pod makes two X25519 key pairs for this round (one to seal shares, one for
             masks) and a self-mask seed b, and sends the public keys with a commitment to b.
2. shares  — given everyone's public keys, each pod Shamir-shares b and its mask private key
             among itself and its neighbours, and seals each neighbour's pair of shares to them.
3. masked  — each pod receives the sealed shares addressed to it, trains, and sends
             y = encode(update) + PRG(b) + sum over neighbours v of ±PRG(s_uv) (mod 2^64).
4. unmask  — the modeller names who sent y (survivors) and who shared but did not (dropped);
             each pod returns, per neighbour, the share of b if it survived or the share of its
             mask key if it dropped — never both for one pod. The modeller rebuilds each b
             (checked against its commitment) and each dropped pod's key (checked against its
             public key), removes the masks, and decodes the weighted sum.

The modeller learns the sum over the survivors and nothing else: a single pod's y is uniform
in the ring. Threats: the modeller is honest but curious (it may also lie about who dropped;
a pod refuses to reveal both secrets of one pod, and a threshold above half of each share group
keeps it from collecting both through different pods). Pods may drop at any step; the round
completes while every share group keeps `threshold` members through step 4. A pod that sends
wrong shares is named (its shares are off the committed polynomial); a wrong masked vector makes
the decoded sum fall out of range with overwhelming probability, and the round fails.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np

from fedpod.aggregation.secure import masks, shamir
from fedpod.aggregation.secure.fixedpoint import Quantisation, decode
from fedpod.errors import SecAggError

FULL_GRAPH_UP_TO = 20  # pods; beyond, each pod masks with about 3 log2(n) neighbours (Bell et al.)
Y_BYTES = 66  # a field element of 2^521 - 1


@dataclass(frozen=True)
class Settings:
    """Flower's SecAgg+ names. `num_shares`: the size of each share group (a pod and its
    neighbours; default all pods up to 20, else about 3 log2(n) + 1). `reconstruction_threshold`:
    shares needed to rebuild a secret (default: more than half of a share group)."""

    num_shares: int | None = None
    reconstruction_threshold: int | None = None
    clipping_range: float = 8.0
    quantization_range: int = 2**22

    @property
    def quantisation(self) -> Quantisation:
        return Quantisation(self.clipping_range, self.quantization_range)


@dataclass(frozen=True)
class Plan:
    """What every party derives identically from the participants and the round's context."""

    context: bytes
    participants: tuple[str, ...]
    neighbours: dict[str, tuple[str, ...]]
    threshold: int
    quantisation: Quantisation

    def group(self, pod: str) -> tuple[str, ...]:
        """Who holds shares of `pod`'s secrets, in x order (x = position + 1)."""
        return tuple(sorted((pod, *self.neighbours[pod])))

    def x_of(self, owner: str, holder: str) -> int:
        return self.group(owner).index(holder) + 1


def make_plan(participants: list[str], context: bytes, settings: Settings) -> Plan:
    names = tuple(sorted(set(participants)))
    n = len(names)
    if n < 2:
        raise SecAggError("secure aggregation needs at least two pods: with one, the sum is its update")
    degree = n - 1 if n <= FULL_GRAPH_UP_TO else min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))
    if settings.num_shares is not None:
        if settings.num_shares < 2:
            raise SecAggError("num_shares must be at least 2")
        degree = min(n - 1, settings.num_shares - 1)
    if degree < n - 1 and degree % 2:
        degree += 1  # a ring lattice: as many neighbours on each side
    if degree == n - 1:
        neighbours = {name: tuple(other for other in names if other != name) for name in names}
    else:
        ring = list(names)
        random.Random(hashlib.sha256(b"fedpod-secagg-graph\0" + context).digest()).shuffle(ring)
        where = {name: i for i, name in enumerate(ring)}
        neighbours = {name: tuple(sorted(ring[(where[name] + step) % n] for step in range(-degree // 2, degree // 2 + 1)
                                         if step != 0)) for name in names}
    group_size = degree + 1
    threshold = settings.reconstruction_threshold or group_size // 2 + 1
    if not group_size // 2 < threshold <= group_size:
        raise SecAggError(f"reconstruction_threshold {threshold} must be above half of a share group "
                          f"({group_size} pods) and at most its size")
    return Plan(context, names, neighbours, threshold, settings.quantisation)


@dataclass(frozen=True)
class PublicKeys:
    seal_key: bytes
    mask_key: bytes
    commitment: bytes


def _sign(me: str, other: str) -> int:
    return 1 if me < other else -1


def _share_bytes(x: int, b_y: int, s_y: int) -> bytes:
    return x.to_bytes(2, "big") + b_y.to_bytes(Y_BYTES, "big") + s_y.to_bytes(Y_BYTES, "big")


def _read_share(data: bytes) -> tuple[int, int, int]:
    if len(data) != 2 + 2 * Y_BYTES:
        raise ValueError("a share has the wrong length")
    return (int.from_bytes(data[:2], "big"), int.from_bytes(data[2:2 + Y_BYTES], "big"),
            int.from_bytes(data[2 + Y_BYTES:], "big"))


def _associated(plan: Plan, owner: str, holder: str) -> bytes:
    return plan.context + b"\0" + owner.encode() + b"\0" + holder.encode()


@dataclass
class PodSession:
    """One pod's side of one round."""

    plan: Plan
    me: str
    _seal_private: bytes = field(default_factory=masks.new_private_key)
    _mask_private: bytes = field(default_factory=masks.new_private_key)
    _self_seed: bytes = field(default_factory=lambda: os.urandom(32))
    _keys: dict[str, PublicKeys] = field(default_factory=dict)
    _sharers: frozenset[str] = frozenset()
    _held: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # owner -> (x, b share, key share)
    _unmasked: bool = False

    def __post_init__(self) -> None:
        if self.me not in self.plan.participants:
            raise SecAggError(f"{self.me} is not among this round's pods")

    def advertise(self) -> PublicKeys:
        return PublicKeys(masks.public_key(self._seal_private), masks.public_key(self._mask_private),
                          masks.commitment(self._self_seed, self.plan.context))

    def share(self, keys: dict[str, PublicKeys]) -> dict[str, bytes]:
        """Step 2: the sealed shares for each holder of this pod's group (its own kept here)."""
        mine = self.advertise()
        if keys.get(self.me) != mine:
            raise SecAggError(f"the key list does not hold {self.me}'s own keys as it sent them")
        if not set(keys) <= set(self.plan.participants):
            raise SecAggError("the key list names pods outside this round")
        self._keys = dict(keys)
        holders = [h for h in self.plan.group(self.me) if h in keys]
        if len(holders) < self.plan.threshold:
            raise SecAggError(f"only {len(holders)} of {self.me}'s share group sent keys; "
                              f"{self.plan.threshold} needed")
        group = self.plan.group(self.me)
        b_shares = shamir.split(self._self_seed, len(group), self.plan.threshold)
        s_shares = shamir.split(self._mask_private, len(group), self.plan.threshold)
        sealed = {}
        for holder, (x, b_y), (_, s_y) in zip(group, b_shares, s_shares, strict=True):
            if holder not in keys:
                continue
            if holder == self.me:
                self._held[self.me] = (x, b_y, s_y)
                continue
            key = masks.agree(self._seal_private, keys[holder].seal_key, self.plan.context, b"seal")
            sealed[holder] = masks.seal(key, _share_bytes(x, b_y, s_y), _associated(self.plan, self.me, holder))
        return sealed

    def mask(self, encoded: np.ndarray, sealed_for_me: dict[str, bytes]) -> np.ndarray:
        """Step 3: keep the shares the neighbours who shared sent here; mask the encoded update."""
        if not self._keys:
            raise SecAggError("masking before the key list arrived")
        self._sharers = frozenset(sealed_for_me) | {self.me}
        for owner, sealed in sealed_for_me.items():
            if owner not in self._keys or self.me not in self.plan.group(owner):
                raise SecAggError(f"a share from {owner}, who does not share with {self.me}")
            key = masks.agree(self._seal_private, self._keys[owner].seal_key, self.plan.context, b"seal")
            try:
                x, b_y, s_y = _read_share(masks.open_sealed(key, sealed, _associated(self.plan, owner, self.me)))
            except Exception as exc:
                raise SecAggError(f"the share from {owner} does not open: {type(exc).__name__}") from exc
            if x != self.plan.x_of(owner, self.me):
                raise SecAggError(f"the share from {owner} has the wrong index")
            self._held[owner] = (x, b_y, s_y)
        masked: np.ndarray = encoded + masks.expand(self._self_seed, len(encoded))
        for other in self.plan.neighbours[self.me]:
            if other in self._sharers:
                seed = masks.agree(self._mask_private, self._keys[other].mask_key, self.plan.context, b"mask")
                if _sign(self.me, other) > 0:
                    masked += masks.expand(seed, len(encoded))
                else:
                    masked -= masks.expand(seed, len(encoded))
        return masked

    def unmask(self, survivors: set[str], dropped: set[str]) -> dict[str, tuple[str, int, int]]:
        """Step 4: per owner whose shares this pod holds, ("self", x, y) for a survivor or
        ("key", x, y) for a pod that dropped — once per round, and never both for one pod."""
        if self._unmasked:
            raise SecAggError(f"{self.me} already answered the unmasking of this round")
        if survivors & dropped:
            raise SecAggError(f"pods named both surviving and dropped: {sorted(survivors & dropped)}")
        if self.me not in survivors:
            raise SecAggError(f"{self.me} is asked to unmask but not listed among the survivors")
        if len(survivors) < self.plan.threshold:
            raise SecAggError(f"only {len(survivors)} pods survived; revealing shares needs {self.plan.threshold}")
        if not (survivors | dropped) <= set(self._keys):
            raise SecAggError("the unmasking names pods that never sent keys")
        self._unmasked = True
        answer = {}
        for owner, (x, b_y, s_y) in self._held.items():
            if owner in survivors:
                answer[owner] = ("self", x, b_y)
            elif owner in dropped:
                answer[owner] = ("key", x, s_y)
        return answer


@dataclass
class ModellerSession:
    """The modeller's side of one round: it routes, collects and unmasks."""

    plan: Plan
    keys: dict[str, PublicKeys] = field(default_factory=dict)
    sharers: set[str] = field(default_factory=set)
    masked: dict[str, np.ndarray] = field(default_factory=dict)

    def accept_keys(self, keys: dict[str, PublicKeys]) -> dict[str, PublicKeys]:
        self.keys = {pod: k for pod, k in keys.items() if pod in self.plan.participants}
        self._enough(set(self.keys), "sent keys")
        return self.keys

    def route_shares(self, sealed: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Step 2 to 3: the sealed shares each pod sent, regrouped by the pod they are for."""
        self.sharers = {owner for owner in sealed if owner in self.keys}
        self._enough(self.sharers, "shared their secrets")
        routed: dict[str, dict[str, bytes]] = {pod: {} for pod in self.sharers}
        for owner in self.sharers:
            for holder, box in sealed[owner].items():
                if holder in self.sharers and holder in self.plan.group(owner):
                    routed[holder][owner] = box
        return routed

    def accept_masked(self, masked: dict[str, np.ndarray]) -> tuple[set[str], set[str]]:
        """Step 3 to 4: (survivors, dropped) to send with the unmasking request."""
        self.masked = {pod: y for pod, y in masked.items() if pod in self.sharers}
        self._enough(set(self.masked), "sent masked updates")
        lengths = {len(y) for y in self.masked.values()}
        if len(lengths) != 1:
            raise SecAggError("the masked updates differ in length")
        return set(self.masked), self.sharers - set(self.masked)

    def finish(self, answers: dict[str, dict[str, tuple[str, int, int]]]) -> tuple[np.ndarray, int]:
        """The sample-weighted mean of the survivors' updates and the total samples, from the
        survivors' unmasking answers; SecAggError naming what was lost or who lied."""
        total = self.unmasked_sum(answers)
        try:
            return decode(total, self.plan.quantisation)
        except ValueError as exc:
            raise SecAggError(f"{exc}; the round's sum is not used") from exc

    def unmasked_sum(self, answers: dict[str, dict[str, tuple[str, int, int]]]) -> np.ndarray:
        """The survivors' encoded vectors summed in the ring of 2^64, every mask removed."""
        survivors, dropped = set(self.masked), self.sharers - set(self.masked)
        length = len(next(iter(self.masked.values())))
        total = np.zeros(length, dtype=np.uint64)
        for y in self.masked.values():
            total += y
        liars: set[str] = set()
        for owner in sorted(survivors):
            seed, wrong = self._rebuild(owner, "self", answers)
            liars |= set(wrong)
            total -= masks.expand(seed, length)
        for owner in sorted(dropped):
            private, wrong = self._rebuild(owner, "key", answers)
            liars |= set(wrong)
            for other in self.plan.neighbours[owner]:
                if other in survivors:
                    seed = masks.agree(private, self.keys[other].mask_key, self.plan.context, b"mask")
                    pairwise = masks.expand(seed, length)
                    total = total - pairwise if _sign(other, owner) > 0 else total + pairwise
        if liars:
            raise SecAggError(f"pods {', '.join(sorted(liars))} sent shares that do not match the secrets their "
                              "owners committed to; the round's sum is not used")
        return total

    def _rebuild(self, owner: str, kind: str,
                 answers: dict[str, dict[str, tuple[str, int, int]]]) -> tuple[bytes, list[str]]:
        """`owner`'s self-mask seed ("self", checked against its commitment) or mask key ("key",
        checked against its public key), and the holders whose shares were wrong."""
        def check(secret: bytes) -> bool:
            if kind == "self":
                return masks.commitment(secret, self.plan.context) == self.keys[owner].commitment
            return masks.public_key(secret) == self.keys[owner].mask_key

        shares = {holder: (x, y) for holder, given in answers.items() if holder in self.plan.group(owner)
                  for o, (k, x, y) in given.items() if o == owner and k == kind}
        if len(shares) < self.plan.threshold:
            lost = len([h for h in self.plan.group(owner) if h not in answers])
            raise SecAggError(f"too many pods lost: {len(shares)} of {owner}'s share group answered the unmasking "
                              f"({lost} of {len(self.plan.group(owner))} lost), {self.plan.threshold} needed")
        try:
            secret = shamir.combine(list(shares.values()), self.plan.threshold)
            if check(secret):
                return secret, []
        except ValueError:
            pass
        try:
            return shamir.recover(shares, self.plan.threshold, check)
        except ValueError as exc:
            raise SecAggError(f"the shares of {owner}'s {'self-mask seed' if kind == 'self' else 'mask key'} do not "
                              f"give back what it committed to: {exc}") from exc

    def _enough(self, pods: set[str], what: str) -> None:
        if len(pods) < self.plan.threshold:
            lost = sorted(set(self.plan.participants) - pods)
            raise SecAggError(f"only {len(pods)} of {len(self.plan.participants)} pods {what} "
                              f"({len(lost)} lost: {', '.join(lost)}); {self.plan.threshold} needed")
