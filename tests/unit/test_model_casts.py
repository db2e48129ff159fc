"""What a pod keeps of the models cast to it: bounded per modeller, each handed over once."""

from __future__ import annotations

from fedpod.pod.casts import KEPT_PER_MODELLER, ModelCasts


def test_each_modeller_leaves_at_most_its_latest_casts_and_each_is_taken_once() -> None:
    casts = ModelCasts()
    for number in range(KEPT_PER_MODELLER + 3):
        casts.keep("modeller-a", f"cast{number}", b"x" * 10)
    casts.keep("modeller-b", "cast0", b"b")
    assert casts.take("modeller-a", "cast0") is None  # pushed out by later ones
    latest = f"cast{KEPT_PER_MODELLER + 2}"
    assert casts.take("modeller-a", latest) == b"x" * 10
    assert casts.take("modeller-a", latest) is None  # handed over once
    assert casts.take("modeller-b", "cast0") == b"b"  # another modeller's casts are its own
    assert casts.take("modeller-b", f"cast{KEPT_PER_MODELLER + 1}") is None  # nor can it take a's
