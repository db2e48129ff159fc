"""Which pods take part in a round. The default takes all; a custom strategy subclasses
`NodeSelectionStrategy` and gets the round number, the candidates and a seeded generator
(no randomness of its own, so that runs are reproducible)."""

from __future__ import annotations

import numpy as np

from fedpod.modeller.discovery import Target


class NodeSelectionStrategy:
    def select(self, round_number: int, candidates: list[Target], rng: np.random.Generator) -> list[Target]:
        return list(candidates)


class AllNodes(NodeSelectionStrategy):
    pass


class RandomFraction(NodeSelectionStrategy):
    """A random share of the pods each round (at least one)."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        self.fraction = fraction

    def select(self, round_number: int, candidates: list[Target], rng: np.random.Generator) -> list[Target]:
        count = max(1, round(self.fraction * len(candidates)))
        chosen = sorted(rng.choice(len(candidates), size=count, replace=False))
        return [candidates[i] for i in chosen]
