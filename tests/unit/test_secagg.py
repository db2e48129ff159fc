"""Secure aggregation, in-process (issue 10, items 1-2): the unmasked sum equals the plain
weighted mean within the fixed-point step; one pod's masked vector looks uniform; dropouts up to
the threshold are recovered exactly and beyond it the round fails naming the loss; wrong shares
name the pod that sent them and a wrong masked vector fails the round."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedpod.aggregation.secure import masks, shamir
from fedpod.aggregation.secure.fixedpoint import Quantisation, decode, encode
from fedpod.aggregation.secure.protocol import ModellerSession, PodSession, SecAggError, Settings, make_plan


def pods_named(n: int) -> list[str]:
    return [f"pod{i:03d}" for i in range(n)]


def run_round(updates: dict[str, np.ndarray], samples: dict[str, int], *, settings_: Settings | None = None,
              drop_before_masking: frozenset[str] = frozenset(), drop_before_unmasking: frozenset[str] = frozenset(),
              tamper: dict[str, object] | None = None) -> tuple[np.ndarray, int]:
    """One round with every message carried by hand, as the transport carries them."""
    tamper = tamper or {}
    plan = make_plan(list(updates), os.urandom(16), settings_ or Settings())
    pods = {name: PodSession(plan, name) for name in plan.participants}
    modeller = ModellerSession(plan)
    keys = modeller.accept_keys({name: pod.advertise() for name, pod in pods.items()})
    routed = modeller.route_shares({name: pod.share(keys) for name, pod in pods.items()})
    masked = {}
    for name, pod in pods.items():
        if name in drop_before_masking:
            continue
        encoded, _ = encode(updates[name], samples[name], plan.quantisation)
        masked[name] = pod.mask(encoded, routed[name])
        if tamper.get("masked") == name:
            masked[name] = np.random.default_rng(0).integers(0, 2**63, len(encoded), dtype=np.uint64)
    survivors, dropped = modeller.accept_masked(masked)
    answers = {}
    for name in sorted(survivors - drop_before_unmasking):
        answers[name] = pods[name].unmask(survivors, dropped)
        if tamper.get("shares") == name:
            answers[name] = {owner: (kind, x, y + 1) for owner, (kind, x, y) in answers[name].items()}
    return modeller.finish(answers)


def plain_mean(updates: dict[str, np.ndarray], samples: dict[str, int], pods: list[str]) -> np.ndarray:
    weights = np.array([samples[p] for p in pods], dtype=np.float64)
    return np.sum([updates[p] * samples[p] for p in pods], axis=0) / weights.sum()


def random_round(n: int, length: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    rng = np.random.default_rng(seed)
    names = pods_named(n)
    return ({p: rng.normal(0, 1, length) for p in names}, {p: int(rng.integers(1, 5000)) for p in names})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-8, 8, allow_nan=False), min_size=1, max_size=40), st.integers(1, 10**6),
       st.integers(1, 10**6))
def test_fixed_point_sums_are_exact_up_to_the_stated_step(values: list[float], n1: int, n2: int) -> None:
    quantisation = Quantisation()
    a, b = np.array(values), np.array(values[::-1])
    total = encode(a, n1, quantisation)[0] + encode(b, n2, quantisation)[0]
    mean, samples = decode(total, quantisation)
    assert samples == n1 + n2
    assert np.max(np.abs(mean - (a * n1 + b * n2) / (n1 + n2))) <= quantisation.step


def test_values_beyond_the_clipping_range_are_clipped_and_counted() -> None:
    encoded, clipped = encode(np.array([-20.0, 0.5, 9.0]), 3, Quantisation(clipping_range=8.0))
    mean, _ = decode(encoded, Quantisation(clipping_range=8.0))
    assert clipped == 2 and np.allclose(mean, [-8.0, 0.5, 8.0], atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([np.nan]), 1, Quantisation())


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_the_unmasked_sum_is_the_plain_weighted_mean(n: int, length: int, seed: int) -> None:
    updates, samples = random_round(n, length, seed)
    mean, total = run_round(updates, samples)
    assert total == sum(samples.values())
    assert np.max(np.abs(mean - plain_mean(updates, samples, list(updates)))) <= Quantisation().step


@settings(max_examples=20, deadline=None)
@given(st.integers(3, 12), st.data())
def test_dropouts_up_to_the_threshold_are_recovered_exactly(n: int, data: st.DataObject) -> None:
    updates, samples = random_round(n, 50, data.draw(st.integers(0, 2**32 - 1)))
    plan = make_plan(list(updates), b"x", Settings())
    can_lose = n - plan.threshold
    lost = data.draw(st.lists(st.sampled_from(sorted(updates)), max_size=can_lose, unique=True))
    split_at = data.draw(st.integers(0, len(lost)))
    before, after = frozenset(lost[:split_at]), frozenset(lost[split_at:])
    mean, total = run_round(updates, samples, drop_before_masking=before, drop_before_unmasking=after)
    included = [p for p in updates if p not in before]  # a pod lost after masking still counts: its y arrived
    assert total == sum(samples[p] for p in included)
    assert np.max(np.abs(mean - plain_mean(updates, samples, included))) <= Quantisation().step


def test_beyond_the_threshold_the_round_fails_naming_how_many_were_lost() -> None:
    updates, samples = random_round(10, 20, 1)
    plan = make_plan(list(updates), b"x", Settings())
    assert plan.threshold == 6
    with pytest.raises(SecAggError, match=r"only 5 of 10 pods sent masked updates \(5 lost: .*\); 6 needed"):
        run_round(updates, samples, drop_before_masking=frozenset(pods_named(10)[:5]))
    with pytest.raises(SecAggError, match=r"too many pods lost: 5 of .* share group answered .* 6 needed"):
        run_round(updates, samples, drop_before_unmasking=frozenset(pods_named(10)[:5]))


@pytest.mark.parametrize("count", [1, 2, 131_071, 131_072, 131_073, 400_000])
def test_a_mask_is_one_aes_ctr_keystream_whatever_the_chunking(count: int) -> None:
    """expand encrypts zeros a bounded chunk at a time; both pods must still get the same words
    as one pass of AES-256-CTR would give, across every chunk boundary."""
    seed = os.urandom(32)
    whole = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * count))
    assert masks.expand(seed, count).tobytes() == whole


def test_a_large_federation_masks_with_a_logarithmic_neighbourhood() -> None:
    updates, samples = random_round(40, 30, 2)
    plan = make_plan(list(updates), b"ctx", Settings())
    degrees = {len(v) for v in plan.neighbours.values()}
    assert degrees == {16} and all(p in plan.neighbours[q] for p in plan.neighbours for q in plan.neighbours[p])
    lost = frozenset(pods_named(40)[::10])  # 4 pods, spread over the ring
    mean, _ = run_round(updates, samples, drop_before_masking=lost)
    assert np.max(np.abs(mean - plain_mean(updates, samples, [p for p in updates if p not in lost]))) <= 2e-6


def test_one_pods_masked_vector_is_indistinguishable_from_uniform() -> None:
    """Even for an update of all zeros, each 64-bit word is uniform: a chi-square test on the
    top byte and on the bottom byte of 200,000 words."""
    updates = {p: np.zeros(200_000) for p in pods_named(3)}
    plan = make_plan(list(updates), os.urandom(16), Settings())
    pods = {name: PodSession(plan, name) for name in plan.participants}
    modeller = ModellerSession(plan)
    keys = modeller.accept_keys({n: p.advertise() for n, p in pods.items()})
    routed = modeller.route_shares({n: p.share(keys) for n, p in pods.items()})
    y = pods["pod000"].mask(encode(updates["pod000"], 10, plan.quantisation)[0], routed["pod000"])
    for byte in (y >> np.uint64(56), y & np.uint64(0xFF)):
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4


def test_a_pod_that_sends_wrong_shares_is_named() -> None:
    updates, samples = random_round(6, 10, 3)
    with pytest.raises(SecAggError, match=r"pods pod002 sent shares that do not match"):
        run_round(updates, samples, tamper={"shares": "pod002"})
    with pytest.raises(SecAggError, match=r"pods pod004 sent shares"):  # also when recovering a dropped pod's key
        run_round(updates, samples, drop_before_masking=frozenset({"pod001"}), tamper={"shares": "pod004"})


def test_a_wrong_masked_vector_fails_the_round_instead_of_giving_a_model() -> None:
    updates, samples = random_round(5, 100, 4)
    with pytest.raises(SecAggError, match="out of range"):
        run_round(updates, samples, tamper={"masked": "pod003"})


def test_a_pod_never_reveals_both_secrets_of_one_pod_nor_answers_twice() -> None:
    updates, _ = random_round(4, 5, 5)
    plan = make_plan(list(updates), b"ctx", Settings())
    pods = {name: PodSession(plan, name) for name in plan.participants}
    modeller = ModellerSession(plan)
    keys = modeller.accept_keys({n: p.advertise() for n, p in pods.items()})
    routed = modeller.route_shares({n: p.share(keys) for n, p in pods.items()})
    pod = pods["pod000"]
    pod.mask(encode(updates["pod000"], 3, plan.quantisation)[0], routed["pod000"])
    with pytest.raises(SecAggError, match="both surviving and dropped"):
        pod.unmask({"pod000", "pod001", "pod002"}, {"pod002", "pod003"})
    with pytest.raises(SecAggError, match="only 2 pods survived"):
        pod.unmask({"pod000", "pod001"}, {"pod002", "pod003"})
    answer = pod.unmask({"pod000", "pod001", "pod002"}, {"pod003"})
    assert {owner: kind for owner, (kind, _, _) in answer.items()} == {
        "pod000": "self", "pod001": "self", "pod002": "self", "pod003": "key"}
    with pytest.raises(SecAggError, match="already answered"):
        pod.unmask({"pod000", "pod001", "pod002", "pod003"}, set())


def test_a_substituted_key_list_is_refused() -> None:
    plan = make_plan(pods_named(3), b"ctx", Settings())
    pods = {name: PodSession(plan, name) for name in plan.participants}
    keys = {n: p.advertise() for n, p in pods.items()}
    forged = dict(keys, pod000=PodSession(plan, "pod000").advertise())
    with pytest.raises(SecAggError, match="does not hold pod000's own keys"):
        pods["pod000"].share(forged)


def test_shamir_shares_rebuild_with_any_threshold_and_name_a_wrong_one() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 7, 4)
    assert shamir.combine(shares[3:], 4) == secret == shamir.combine([shares[0], shares[2], shares[4], shares[6]], 4)
    with pytest.raises(ValueError, match="4 needed"):
        shamir.combine(shares[:3], 4)
    bad = dict(zip("abcdefg", shares, strict=True))
    bad["c"] = (bad["c"][0], bad["c"][1] + 5)
    with pytest.raises(ValueError, match="one polynomial"):
        shamir.combine(list(bad.values()), 4)
    assert shamir.recover(bad, 4, lambda s: s == secret) == (secret, ["c"])


def test_settings_are_checked() -> None:
    with pytest.raises(SecAggError, match="at least two pods"):
        make_plan(["solo"], b"", Settings())
    with pytest.raises(SecAggError, match="above half"):
        make_plan(pods_named(5), b"", Settings(reconstruction_threshold=2))
    assert make_plan(pods_named(30), b"", Settings(num_shares=7)).threshold == 4


def test_a_partial_too_large_to_add_is_refused_without_its_value() -> None:
    """A secure sum hides each pod's partial from the modeller; the refusal quoted it (`partial 0
    (4.4e+13) is too large`), and a query scaled by a constant made any sum too large."""
    from fedpod.algorithms.sql.secure import encode_partials

    with pytest.raises(ValueError, match=r"partial 0 is beyond \+-4\.39805e\+12, too large") as refused:
        encode_partials({"p0": 43_980_465_111_776.5}, ["sum"])
    assert "43980" not in str(refused.value) and "4.39805e+13" not in str(refused.value)
    assert list(encode_partials({"p0": 1.5, "p1": 7}, ["sum", "count"]).view(np.int64)) == [3 * 2**19, 7]
