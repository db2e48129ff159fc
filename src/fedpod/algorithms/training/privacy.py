"""Differential privacy for a training round at a pod, and the epsilon it costs.

Two kinds, chosen by the modeller in `training_args["dp_args"]`; the pod does the privatising
itself either way, because the modeller is the party the guarantee is against:

- `local`: DP-SGD through Opacus. Each example's gradient is clipped to `clip` and Gaussian
  noise of `sigma * clip` is added to every batch's sum; batches are Poisson-sampled. The
  guarantee is Opacus's (add/remove one example), accounted by its RDP accountant over the
  round's steps at sample rate 1 / batches-per-epoch.
- `central`: the pod trains normally, clips its whole update (new minus global parameters) to L2
  norm `clip` and adds Gaussian noise, so that the aggregate carries noise of `sigma * clip`:
  under secure aggregation each of the m pods adds a 1/sqrt(m) share (the modeller sees only the
  sum); without it each pod adds all of it (the modeller sees each update). The pod reports one
  sample, so FedAvg weighs pods equally, as DP-FedAvg does. Accounting is per record and
  deliberately conservative: one patient's records can move the clipped update anywhere in the
  ball of radius `clip` (sensitivity 2 * clip), and under secure aggregation the modeller may
  see as few as `reconstruction_threshold` noise shares summed.

Noise and Poisson sampling draw from the operating system's entropy, never from the modeller's
`random_seed`: a modeller who could replay the noise could subtract it. The sample count each
pod reports for local DP is not covered by epsilon (it is what FedAvg weighs by).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedpod.aggregation.base import Params
from fedpod.algorithms.training.args import DPArgs
from fedpod.errors import ConfigError

# Rényi orders searched for the tightest epsilon: Opacus's defaults, plus orders near 1, which
# are the best ones when there is little noise.
ALPHAS = [1 + x / 100 for x in range(1, 10)] + [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


@dataclass(frozen=True)
class Mechanism:
    """`steps` runs of the sampled Gaussian mechanism, as Opacus's accountants count them."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon(history: Sequence[Mechanism], delta: float) -> float:
    """Epsilon at `delta` of every mechanism in `history` composed (Opacus's RDP accountant)."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant  # imports torch: only pods that run DP tasks pay it

    accountant = RDPAccountant()
    accountant.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in history]
    return float(accountant.get_epsilon(delta, alphas=ALPHAS))


@dataclass(frozen=True)
class Spent:
    """What one charge left: this experiment's epsilon so far, and what remains of the budget."""

    experiment_epsilon: float
    remaining: float | None


Charge = Callable[[Mechanism, float], Spent]  # raises AccessDenied when the budget would be exceeded


@dataclass(frozen=True)
class PrivacyRound:
    """What the pod (never the modeller) decides about a DP round: how many pods' noise shares
    make up the aggregate (1 without secure aggregation), the fewest of them the modeller can see
    summed, and the ledger to charge before anything is trained."""

    dp: DPArgs
    shares: int
    threshold: int
    charge: Charge

    def central_mechanism(self) -> Mechanism:
        seen = self.dp.sigma * math.sqrt(self.threshold / self.shares)
        return Mechanism(noise_multiplier=seen / 2, sample_rate=1.0, steps=1)  # sensitivity 2 * clip


def recording_charges(privacy: PrivacyRound, spent: list[Spent]) -> PrivacyRound:
    """The same round, its charges' outcomes appended to `spent` (what the reply reports)."""
    def charge(mechanism: Mechanism, delta: float) -> Spent:
        spent.append(privacy.charge(mechanism, delta))
        return spent[-1]

    return PrivacyRound(privacy.dp, privacy.shares, privacy.threshold, charge)


def local_mechanism(dp: DPArgs, batches_per_epoch: int, steps: int) -> Mechanism:
    return Mechanism(noise_multiplier=dp.sigma, sample_rate=1.0 / batches_per_epoch, steps=steps)


def check_delta(dp: DPArgs, rows: int) -> None:
    """A delta of 1/rows or more would allow releasing one record outright with that probability."""
    if dp.delta >= 1.0 / max(rows, 1):
        raise ConfigError(f"dp_args.delta {dp.delta:g} is not below 1/{rows} (this pod's training rows)",
                          hint=f"use a delta well below {1.0 / max(rows, 1):.1e}, such as 1e-5 or less")


def entropy_rng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def clip_and_noise(params: Params, reference: Params, privacy: PrivacyRound,
                   rng: np.random.Generator | None = None) -> tuple[Params, float]:
    """`reference + clip(update) + noise` per parameter, and the update's L2 norm before clipping.
    The norm is over every parameter together, as DP-FedAvg clips."""
    names = sorted(params)
    if set(names) != set(reference):
        raise ConfigError("central DP: the update's parameters differ from the global model's")
    deltas = {n: np.asarray(params[n], dtype=np.float64) - np.asarray(reference[n], dtype=np.float64) for n in names}
    norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in deltas.values()))
    scale = min(1.0, privacy.dp.clip / norm) if norm > 0 else 1.0
    std = privacy.dp.sigma * privacy.dp.clip / math.sqrt(privacy.shares)
    rng = rng or entropy_rng()
    noised = {n: (np.asarray(reference[n], dtype=np.float64) + scale * deltas[n]
                  + rng.normal(0.0, std, size=deltas[n].shape)).astype(np.asarray(params[n]).dtype, copy=False)
              for n in names}
    return noised, norm
