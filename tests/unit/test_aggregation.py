from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedpod.aggregation import (
    CoordinateMedian,
    FedAdam,
    FedAverage,
    FedProx,
    FedYogi,
    Params,
    Reply,
    Scaffold,
    TrimmedMean,
    aggregator_from_config,
    registered_aggregators,
)
from fedpod.aggregation.base import all_finite, sample_weights
from fedpod.aggregation.scaffold import CONTROL_DELTA
from fedpod.errors import ConfigError

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
vectors = arrays(np.float32, st.integers(1, 6), elements=finite)


def params_like(vector: np.ndarray) -> Params:
    return {"w": vector.astype(np.float32), "b": np.asarray([vector.sum()], dtype=np.float32)}


def reply(pod: str, params: Params, samples: int, **extra: Params) -> Reply:
    return Reply(pod=pod, params=params, num_samples=samples, extra=extra)


@settings(max_examples=60, deadline=None)
@given(vector=vectors, counts=st.lists(st.integers(1, 10_000), min_size=1, max_size=6))
def test_fedavg_of_identical_updates_is_that_update(vector: np.ndarray, counts: list[int]) -> None:
    params = params_like(vector)
    replies = [reply(f"p{i}", params, n) for i, n in enumerate(counts)]
    result = FedAverage().aggregate(1, params_like(np.zeros_like(vector)), replies)
    for key in params:
        np.testing.assert_allclose(result[key], params[key], rtol=1e-5, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 10**9), min_size=1, max_size=20))
def test_sample_weights_sum_to_one(counts: list[int]) -> None:
    replies = [reply(f"p{i}", {}, n) for i, n in enumerate(counts)]
    weights = sample_weights(replies)
    assert weights.sum() == pytest.approx(1.0) and (weights > 0).all()


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 5), size=st.integers(1, 5))
def test_fedavg_is_a_convex_combination(data: st.DataObject, n: int, size: int) -> None:
    stack = [data.draw(arrays(np.float64, size, elements=st.floats(-1e3, 1e3))) for _ in range(n)]
    counts = data.draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    replies = [reply(f"p{i}", {"w": v}, c) for i, (v, c) in enumerate(zip(stack, counts, strict=True))]
    result = FedAverage().aggregate(1, {"w": np.zeros(size)}, replies)["w"]
    assert (result >= np.min(stack, axis=0) - 1e-9).all() and (result <= np.max(stack, axis=0) + 1e-9).all()
    expected = sum(c * v for c, v in zip(counts, stack, strict=True)) / sum(counts)
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 5))
def test_scaffold_with_zero_controls_and_server_lr_one_equals_fedavg(data: st.DataObject, n: int) -> None:
    global_params = {"w": data.draw(arrays(np.float64, 4, elements=st.floats(-100, 100)))}
    replies = [reply(f"p{i}", {"w": data.draw(arrays(np.float64, 4, elements=st.floats(-100, 100)))},
                     data.draw(st.integers(1, 50)), **{CONTROL_DELTA: {"w": np.zeros(4)}}) for i in range(n)]
    scaffold = Scaffold(server_lr=1.0)
    scaffold.configure_round(1, global_params)
    np.testing.assert_allclose(scaffold.aggregate(1, global_params, replies)["w"],
                               FedAverage().aggregate(1, global_params, replies)["w"], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(scaffold.control["w"], np.zeros(4))


def test_scaffold_moves_its_control_by_the_mean_delta_scaled_by_participation() -> None:
    scaffold = Scaffold(total_pods=4)
    x = {"w": np.zeros(2)}
    assert set(scaffold.configure_round(1, x)["scaffold_control"]) == {"w"}
    replies = [reply("a", {"w": np.ones(2)}, 1, **{CONTROL_DELTA: {"w": np.array([2.0, 0.0])}}),
               reply("b", {"w": np.ones(2)}, 1, **{CONTROL_DELTA: {"w": np.array([0.0, 4.0])}})]
    scaffold.aggregate(1, x, replies)
    np.testing.assert_allclose(scaffold.control["w"], [0.5, 1.0])
    with pytest.raises(ValueError, match="control-variate"):
        scaffold.aggregate(2, x, [reply("a", {"w": np.ones(2)}, 1)])


@pytest.mark.parametrize("optimizer", [FedAdam(), FedYogi(), aggregator_from_config({"name": "fedadagrad"})])
def test_server_optimizers_stay_put_without_change_and_follow_the_pseudo_gradient(optimizer: FedAdam) -> None:
    x = {"w": np.array([1.0, -1.0])}
    same = optimizer.aggregate(1, x, [reply("a", {"w": x["w"].copy()}, 3)])
    np.testing.assert_allclose(same["w"], x["w"])
    moved = optimizer.aggregate(2, x, [reply("a", {"w": np.array([2.0, -3.0])}, 3)])
    assert moved["w"][0] > 1.0 and moved["w"][1] < -1.0
    restored = type(optimizer)()
    restored.load_state(optimizer.state())
    np.testing.assert_allclose(restored.m["w"], optimizer.m["w"])


def test_median_and_trimmed_mean_resist_one_outlier() -> None:
    x = {"w": np.zeros(3)}
    honest = [reply(f"p{i}", {"w": np.full(3, float(i))}, 10) for i in range(4)]
    attacker = reply("evil", {"w": np.full(3, 1e9)}, 10**9)
    assert (CoordinateMedian().aggregate(1, x, [*honest, attacker])["w"] <= 3).all()
    assert (TrimmedMean(beta=0.2).aggregate(1, x, [*honest, attacker])["w"] <= 3).all()
    np.testing.assert_allclose(TrimmedMean(beta=0.25).aggregate(1, x, honest)["w"], np.full(3, 1.5))


@pytest.mark.parametrize("bad", [
    {"w": np.array([np.nan, 0.0])}, {"w": np.array([np.inf, 0.0])}, {"w": np.zeros(3)}, {"v": np.zeros(2)},
], ids=["nan", "inf", "shape", "name"])
def test_malformed_or_non_finite_updates_are_refused_naming_the_pod(bad: Params) -> None:
    with pytest.raises(ValueError, match="pod mallory"):
        FedAverage().aggregate(1, {"w": np.zeros(2)}, [reply("ok", {"w": np.ones(2)}, 1), reply("mallory", bad, 1)])


@pytest.mark.parametrize("values", [
    np.array([np.nan, 1.0], np.float32), np.array([1.0, -np.inf], np.float32), np.array([np.inf, -np.inf]),
    np.array([1.0, np.nan], np.float16), np.array([1 + 0j, complex(np.nan, 0)]),
], ids=["nan32", "inf32", "inf-inf64", "nan16", "complex"])
def test_all_finite_finds_every_nan_and_infinity(values: np.ndarray) -> None:
    assert not all_finite(values)


@pytest.mark.parametrize("values", [
    np.full(4, np.finfo(np.float32).max, np.float32),  # their float32 sum overflows; float64's does not
    np.full(4, np.finfo(np.float64).max),  # their sum overflows: checked value by value
    np.arange(5, dtype=np.int64), np.zeros(0, np.float32),
], ids=["max32", "max64", "int", "empty"])
def test_all_finite_accepts_finite_values_whose_sum_overflows(values: np.ndarray) -> None:
    assert all_finite(values)


def test_every_aggregator_round_trips_through_its_config() -> None:
    assert {"fedavg", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad", "median",
            "trimmed_mean"} <= set(registered_aggregators())
    for name in registered_aggregators():
        aggregator = aggregator_from_config({"name": name})
        assert aggregator_from_config(aggregator.get_config()).get_config() == aggregator.get_config()
    assert FedProx(mu=0.5).configure_round(1, {})["fedprox_mu"] == 0.5
    with pytest.raises(ConfigError, match="choose one of"):
        aggregator_from_config({"name": "fedmagic"})
    with pytest.raises(ConfigError, match=r"unknown argument `nu` for aggregator 'fedprox'.*it takes: mu"):
        aggregator_from_config({"name": "fedprox", "nu": 1})


@pytest.mark.parametrize("pods", [3, 7, 10])
def test_fedavg_of_identical_float32_updates_is_exact(pods: int) -> None:
    for value in range(1, 30):
        params = {"w": np.full(5, float(value), dtype=np.float32)}
        result = FedAverage().aggregate(1, params, [reply(f"p{i}", params, 1) for i in range(pods)])
        assert result["w"].dtype == np.float32
        np.testing.assert_array_equal(result["w"], params["w"])


def test_a_poisoned_update_is_set_aside_with_its_reason() -> None:
    from fedpod.aggregation.screening import screen_updates

    x = {"w": np.zeros(4)}
    honest = [reply(f"p{i}", {"w": np.full(4, 0.1 * (i + 1))}, 10) for i in range(3)]
    poisoned = reply("evil", {"w": np.full(4, 1e30)}, 10)
    kept, rejected = screen_updates([*honest, poisoned], x)
    assert [r.pod for r in kept] == ["p0", "p1", "p2"]
    assert "evil" in rejected and "x the round's median" in rejected["evil"] and "limit 10x" in rejected["evil"]
    assert screen_updates([*honest, poisoned], x, limit=None)[1] == {}
    two = screen_updates([honest[0], poisoned], x)  # two replies: neither is the odd one out
    assert two[1] == {}


def test_trimmed_mean_refuses_to_be_a_plain_mean() -> None:
    x = {"w": np.zeros(2)}
    replies = [reply(f"p{i}", {"w": np.full(2, float(i))}, 10) for i in range(3)]
    with pytest.raises(ValueError, match=r"trims nothing from 3 replies \(floor\(0.1 x 3\) = 0\)"):
        TrimmedMean(beta=0.1).aggregate(1, x, replies)
    with pytest.raises(ValueError, match="plain mean"):
        TrimmedMean(beta=0.0)


def test_a_large_model_is_screened_and_averaged_across_threads_as_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpod.aggregation import threads
    from fedpod.aggregation.screening import screen_updates

    rng = np.random.default_rng(7)
    size = 3 * threads.MIN_SPAN + 12_345  # several spans, the last one uneven
    x = {"w": rng.normal(size=size).astype(np.float32), "b": np.zeros(3, dtype=np.float32)}
    pods = [reply(f"p{i}", {"w": rng.normal(size=size).astype(np.float32), "b": np.full(3, i, np.float32)}, 10 + i)
            for i in range(4)]
    nan = {"w": x["w"].copy(), "b": x["b"]}
    nan["w"][size - 1] = np.nan  # in the last span only

    def run() -> tuple[Params, dict[str, str], str]:
        kept, rejected = screen_updates([*pods, reply("poisoned", {k: v * 1e6 for k, v in x.items()}, 1)], x)
        with pytest.raises(ValueError, match="pod mallory: w contains NaN") as refused:
            FedAverage().aggregate(1, x, [*pods, reply("mallory", nan, 1)])
        return FedAverage().aggregate(1, x, kept), rejected, str(refused.value)

    monkeypatch.setattr(threads, "workers", lambda: 4)
    assert len(threads.spans(size)) == 3
    threaded = run()
    monkeypatch.setattr(threads, "workers", lambda: 1)
    serial = run()
    for key in x:
        np.testing.assert_array_equal(threaded[0][key], serial[0][key])
    assert threaded[1:] == serial[1:] and list(threaded[1]) == ["poisoned"]
