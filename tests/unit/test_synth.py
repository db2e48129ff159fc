from __future__ import annotations

import numpy as np
import pandas as pd

from fedpod.data.synth import generate, outcome_probability


def test_generation_is_deterministic_for_a_seed() -> None:
    first, second = generate(3, 900, seed=4), generate(3, 900, seed=4)
    for a, b in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(a.patients, b.patients)
        pd.testing.assert_frame_equal(a.observations, b.observations)
    assert not generate(3, 900, seed=5)[0].patients.equals(first[0].patients)


def test_centres_differ_in_size_age_and_coding() -> None:
    centres = generate(3, 3000, seed=1)
    sizes = [len(c.patients) for c in centres]
    assert sum(sizes) == 3000 and sizes[0] > sizes[1] > sizes[2]
    ages = [c.patients["age"].mean() for c in centres]
    assert ages[0] < ages[1] < ages[2]
    codes = [set(c.observations["code"]) for c in centres]
    assert codes[0] != codes[1]
    observation_columns = ["patient_id", "time", "code", "value"]
    assert all(list(c.observations.columns) == observation_columns for c in centres)


def test_target_depends_on_the_features() -> None:
    patients = pd.concat([c.patients for c in generate(3, 6000, seed=2)])
    probability = outcome_probability(patients)
    outcome = patients["outcome"].to_numpy()
    # rank AUC of the true risk score: far better than chance means the target is learnable
    order = np.argsort(probability)
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    positives = outcome == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    auc = (ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert auc > 0.75
    assert 0.05 < outcome.mean() < 0.5
