"""Updates as integers in the ring of 2^64, so that masks cancel exactly.

Each value is clipped to [-clipping_range, clipping_range] and quantised to an integer q in
[0, quantization_range]; the pod multiplies q by its sample count n (FedAvg's weight, folded in
before masking) and appends n itself, so the unmasked sum holds sum(n*q) and sum(n). The
modeller divides, which gives the sample-weighted mean exactly up to the quantisation step:
every value is off by at most clipping_range / quantization_range (1.9e-6 with the defaults),
plus whatever clipping removed (pods count it).

The ring holds the sum as long as sum(n) * quantization_range < 2^64: with the default range of
2^22, up to 2^42 samples in a round. A decoded sum outside [0, sum(n) * quantization_range] can
only come from a masked vector that was not built this way: the round fails rather than present
it as a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpod.aggregation.base import all_finite

RING_BITS = 64


@dataclass(frozen=True)
class Quantisation:
    clipping_range: float = 8.0
    quantization_range: int = 2**22

    def __post_init__(self) -> None:
        if not self.clipping_range > 0:
            raise ValueError("clipping_range must be positive")
        if not 2 <= self.quantization_range <= 2**40:
            raise ValueError("quantization_range must be between 2 and 2^40")

    @property
    def step(self) -> float:
        """The largest error of one decoded value (half a quantisation step of the mean, doubled)."""
        return self.clipping_range / self.quantization_range

    def max_samples(self) -> int:
        return int((2**RING_BITS - 1) // self.quantization_range)


def encode(values: np.ndarray, samples: int, quantisation: Quantisation) -> tuple[np.ndarray, int]:
    """`values` (flat floats) weighted by `samples`, as uint64, with `samples` appended; also how
    many values were clipped."""
    if samples < 1 or samples > quantisation.max_samples():
        raise ValueError(f"sample count {samples} is outside 1..{quantisation.max_samples()}")
    if not all_finite(values):
        raise ValueError("the update holds NaN or infinite values")
    c, q_range = quantisation.clipping_range, quantisation.quantization_range
    clipped = int(np.count_nonzero(np.abs(values) > c))
    scaled = (np.clip(values, -c, c) + c) * (q_range / (2 * c))
    quantised = np.rint(scaled).astype(np.uint64)
    encoded = np.empty(len(values) + 1, dtype=np.uint64)
    np.multiply(quantised, np.uint64(samples), out=encoded[:-1])
    encoded[-1] = samples
    return encoded, clipped


def decode(total: np.ndarray, quantisation: Quantisation) -> tuple[np.ndarray, int]:
    """The sample-weighted mean of the encoded updates summed in `total`, and the total samples.
    Raises ValueError when the sum cannot have come from well-formed updates."""
    samples = int(total[-1])
    if samples < 1:
        raise ValueError("the unmasked sum carries no samples: a masked vector or a share was wrong")
    sums = total[:-1]
    limit = samples * quantisation.quantization_range
    if limit >= 2**RING_BITS or int(sums.max(initial=0)) > limit:
        raise ValueError("the unmasked sum is out of range: a masked vector or a share was wrong")
    c, q_range = quantisation.clipping_range, quantisation.quantization_range
    mean = sums.astype(np.float64) / samples
    return mean * (2 * c / q_range) - c, samples


def flat_update(params: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> np.ndarray:
    """`params - reference` as one float64 vector, parameters in name order (what a pod masks)."""
    if set(params) != set(reference):
        raise ValueError(f"the update's parameters {sorted(set(params) ^ set(reference))} differ from the global "
                         "model's")
    return np.concatenate([(np.asarray(params[name], np.float64) - np.asarray(reference[name], np.float64)).ravel()
                           for name in sorted(reference)]) if reference else np.zeros(0)


def apply_update(reference: dict[str, np.ndarray], update: np.ndarray) -> dict[str, np.ndarray]:
    """`reference + update`, the flat update cut back into the reference's names and shapes."""
    sizes = [int(np.asarray(reference[name]).size) for name in sorted(reference)]
    if sum(sizes) != len(update):
        raise ValueError(f"the aggregated update has {len(update)} values, the model {sum(sizes)}")
    result, start = {}, 0
    for name, size in zip(sorted(reference), sizes, strict=True):
        base = np.asarray(reference[name])
        result[name] = (base + update[start:start + size].reshape(base.shape)).astype(base.dtype)
        start += size
    return result
