from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file

from fedpod.aggregation import FedAverage, Reply, Scaffold
from fedpod.aggregation.scaffold import CONTROL_DELTA
from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.local import run_evaluation, run_local_round, split
from fedpod.algorithms.training.metrics import evaluate
from fedpod.algorithms.training.plans import DataManager, DatasetHandle, TrainingPlan
from fedpod.algorithms.training.registry import builtin_plan
from fedpod.algorithms.training.torch_plan import TorchTrainingPlan
from fedpod.data.synth import generate
from fedpod.errors import AccessDenied, ConfigError

FEATURES = ["age", "bmi", "smoker", "diabetes", "systolic_bp", "cholesterol", "hba1c"]
CENTRES = generate(3, 3000, seed=11)
POOLED = pd.concat([c.patients for c in CENTRES])
MEANS = POOLED[FEATURES].mean().tolist()
STDS = POOLED[FEATURES].std().tolist()
MODEL_ARGS = {"target": "outcome", "features": FEATURES, "feature_means": MEANS, "feature_stds": STDS}


def plan_for(name: str, frame: pd.DataFrame, model_args: dict[str, Any], args: TrainingArgs) -> TrainingPlan:
    plan = builtin_plan(name)()
    plan.dataset = DatasetHandle("ehr", {}, lambda: frame)
    plan.post_init(model_args, args)
    return plan


def federated(name: str, args: TrainingArgs, rounds: int, model_args: dict[str, Any] = MODEL_ARGS) -> TrainingPlan:
    plans = [plan_for(name, c.patients, model_args, args) for c in CENTRES]
    params = plans[0].get_params()
    for round_number in range(rounds):
        replies = [Reply(str(i), (r := run_local_round(p, params, args, {})).params, r.num_samples, r.metrics)
                   for i, p in enumerate(plans)]
        params = FedAverage().aggregate(round_number, params, replies)
    plans[0].set_params(params)
    return plans[0]


def pooled_auc(plan: TrainingPlan) -> float:
    features = (POOLED[FEATURES].to_numpy() - np.array(MEANS)) / np.array(STDS)
    return evaluate("auc", POOLED["outcome"].to_numpy(), plan.predict_scores(features.astype(np.float32)))


def test_training_args_list_valid_keys_and_prefer_num_updates() -> None:
    with pytest.raises(ConfigError, match="valid keys: loader_args"):
        TrainingArgs.parse({"epoch": 3})
    with pytest.raises(ConfigError, match="unknown test_metric"):
        TrainingArgs.parse({"test_metric": "happiness"})
    for seed in (-1, 2**64):  # numpy's generators take neither: the pod failed with a bare ValueError
        with pytest.raises(ConfigError, match="random_seed"):
            TrainingArgs.parse({"random_seed": seed})
    assert TrainingArgs.parse({"num_updates": 5, "epochs": 3}).local_budget() == (5, 0, None)
    assert TrainingArgs.parse({}).local_budget() == (None, 1, None)


def test_federated_logistic_regression_learns_the_synthetic_target() -> None:
    args = TrainingArgs.parse({"num_updates": 30, "loader_args": {"batch_size": 32},
                               "optimizer_args": {"lr": 0.05}, "random_seed": 1})
    assert pooled_auc(federated("logistic_regression", args, rounds=5)) > 0.75


def test_sklearn_sgd_classifier_learns_with_partial_fit() -> None:
    model_args = {**MODEL_ARGS, "n_classes": 2, "loss": "log_loss", "alpha": 1e-4}
    args = TrainingArgs.parse({"epochs": 1, "loader_args": {"batch_size": 64}, "random_seed": 3})
    plan = federated("sgd_classifier", args, rounds=3, model_args=model_args)
    assert plan.get_params()["coef_"].shape == (1, len(FEATURES))
    assert pooled_auc(plan) > 0.7


def test_num_updates_gives_the_same_step_count_on_every_pod() -> None:
    args = TrainingArgs.parse({"num_updates": 17, "loader_args": {"batch_size": 50}})
    steps = {run_local_round(plan_for("mlp", c.patients, MODEL_ARGS, args),
                             plan_for("mlp", c.patients, MODEL_ARGS, args).get_params(), args, {}).metrics["steps"]
             for c in CENTRES}
    assert steps == {17.0}


def test_same_seed_gives_the_same_update() -> None:
    args = TrainingArgs.parse({"epochs": 1, "batch_maxnum": 5, "random_seed": 42, "optimizer_args": {"lr": 0.1}})
    frame = CENTRES[1].patients
    first = plan_for("mlp", frame, MODEL_ARGS, args)
    start = first.get_params()
    a = run_local_round(first, start, args, {}).params
    b = run_local_round(plan_for("mlp", frame, MODEL_ARGS, args), start, args, {}).params
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_a_handed_over_model_is_trained_in_place_and_returned_without_a_copy() -> None:
    """A pod holds a 400 MB model once: the received arrays become the plan's tensors, are
    trained in place, and are what the round returns. A caller that keeps its plan gets a copy."""
    args = TrainingArgs.parse({"num_updates": 3, "random_seed": 1, "optimizer_args": {"name": "sgd", "lr": 0.1}})
    frame = CENTRES[0].patients
    received = {k: np.array(v) for k, v in plan_for("mlp", frame, MODEL_ARGS, args).get_params().items()}
    start = {k: v.copy() for k, v in received.items()}
    plan = plan_for("mlp", frame, MODEL_ARGS, args)
    handed = run_local_round(plan, received, args, {}, hand_over=True).params
    for key, value in received.items():
        assert np.shares_memory(handed[key], value)
        assert np.shares_memory(plan.model().state_dict()[key].numpy(), value)
    kept = run_local_round(plan_for("mlp", frame, MODEL_ARGS, args), start, args, {})
    for key in handed:
        np.testing.assert_allclose(handed[key], kept.params[key], rtol=1e-6, atol=1e-7)  # the same training
        assert not np.shares_memory(kept.params[key], start[key])
    assert not any(np.array_equal(start[key], handed[key]) for key in start if key.endswith("weight"))


def test_misaligned_or_read_only_arrays_are_copied_when_adopted() -> None:
    plan = plan_for("logistic_regression", CENTRES[0].patients, MODEL_ARGS, TrainingArgs())
    params = plan.get_params()
    read_only = {k: v.copy() for k, v in params.items()}
    for value in read_only.values():
        value.flags.writeable = False
    plan.adopt_params(read_only)
    for key, value in read_only.items():
        assert not np.shares_memory(plan.model().state_dict()[key].numpy(), value)
    backing = np.zeros(params["weight"].size * 4 + 1, dtype=np.uint8)
    misaligned = np.frombuffer(backing[1:].data, dtype=np.float32).reshape(params["weight"].shape)
    assert not misaligned.flags.aligned
    plan.adopt_params({**params, "weight": misaligned})
    assert not np.shares_memory(plan.model().state_dict()["weight"].numpy(), backing)


def test_the_optimizer_is_chosen_by_name_and_an_unknown_one_is_refused() -> None:
    frame = CENTRES[0].patients
    sgd = plan_for("mlp", frame, MODEL_ARGS, TrainingArgs())
    assert isinstance(sgd.init_optimizer({"name": "sgd", "lr": 0.1}), torch.optim.SGD)  # type: ignore[attr-defined]
    assert isinstance(sgd.init_optimizer({}), torch.optim.Adam)  # type: ignore[attr-defined]
    args = TrainingArgs.parse({"num_updates": 1, "optimizer_args": {"name": "adamax"}})
    with pytest.raises(ConfigError, match="unknown optimizer 'adamax'"):
        run_local_round(plan_for("mlp", frame, MODEL_ARGS, args), sgd.get_params(), args, {})


def test_validation_reports_global_and_local_metrics() -> None:
    args = TrainingArgs.parse({"num_updates": 20, "test_ratio": 0.25, "test_metric": "auc",
                               "test_on_global_updates": True, "test_on_local_updates": True, "random_seed": 0})
    plan = plan_for("logistic_regression", CENTRES[0].patients, MODEL_ARGS, args)
    metrics = run_local_round(plan, plan.get_params(), args, {}).metrics
    assert {"global_auc", "local_auc", "local_samples", "loss"} <= set(metrics)
    assert metrics["local_samples"] == round(len(CENTRES[0].patients) * 0.25)


def test_neither_split_may_hold_fewer_rows_than_the_pods_min_group_size() -> None:
    assert [len(part) for part in split(400, 0.01, 0, min_rows=3)] == [396, 4]
    for seed in range(50):  # test parts a step apart in size are not one inside the other
        three, four = (set(split(400, ratio, seed)[1]) for ratio in (0.0075, 0.01))
        assert len(three) == 3 and len(four) == 4 and not three <= four
        assert all(np.array_equal(a, b) for a, b in zip(split(400, 0.01, seed), split(400, 0.01, seed), strict=True))
    with pytest.raises(AccessDenied, match=r"the test rows are fewer than 5.*\[rule: min_group_size\]"):
        split(400, 0.01, 0, min_rows=5)  # 4 test rows: a metric of 4 people's labels
    with pytest.raises(AccessDenied, match=r"the training rows are fewer than 5"):
        split(400, 0.99, 0, min_rows=5)  # a model update from 4 people
    with pytest.raises(AccessDenied, match=r"the training rows are fewer than 5"):
        split(4, 0.0, 0, min_rows=5)  # no test split: evaluation scores all of them
    args = TrainingArgs.parse({"num_updates": 2, "test_ratio": 0.002, "test_metric": "mse", "random_seed": 0})
    plan = plan_for("logistic_regression", CENTRES[0].patients, MODEL_ARGS, args)  # 3 of its 1,449 rows to test
    assert run_local_round(plan, plan.get_params(), args, {}, min_rows=3).num_samples == 1446
    for refused in (lambda: run_local_round(plan, plan.get_params(), args, {}, min_rows=4),
                    lambda: run_evaluation(plan, plan.get_params(), args, min_rows=4)):
        with pytest.raises(AccessDenied, match="min_group_size"):
            refused()


def test_scaffold_round_returns_a_control_delta_and_needs_num_updates() -> None:
    scaffold = Scaffold()
    args = TrainingArgs.parse({"num_updates": 10, "optimizer_args": {"lr": 0.05}})
    plan = plan_for("logistic_regression", CENTRES[2].patients, MODEL_ARGS, args)
    start = plan.get_params()
    config = scaffold.configure_round(1, start)
    result = run_local_round(plan, start, args, config, state={})
    assert set(result.extra[CONTROL_DELTA]) == {"weight", "bias"}
    with pytest.raises(ConfigError, match="num_updates"):
        run_local_round(plan, start, TrainingArgs.parse({"epochs": 1}), config, state={})


def test_fedprox_term_keeps_the_update_closer_to_the_global_model() -> None:
    args = TrainingArgs.parse({"num_updates": 40, "optimizer_args": {"lr": 0.2}, "random_seed": 5})
    frame = CENTRES[0].patients
    start = plan_for("logistic_regression", frame, MODEL_ARGS, args).get_params()

    def drift(config: dict[str, Any]) -> float:
        params = run_local_round(plan_for("logistic_regression", frame, MODEL_ARGS, args), start, args, config).params
        return float(sum(np.sum((params[k] - start[k]) ** 2) for k in start))

    assert drift({"fedprox_mu": 10.0}) < drift({})


class Diverging(TorchTrainingPlan):
    def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
        return torch.nn.Linear(2, 1)

    def training_data(self) -> DataManager:
        return DataManager(np.ones((8, 2), dtype=np.float32), np.ones(8, dtype=np.float32))

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.model()(data).squeeze(-1) * float("nan")).sum()


def test_a_diverging_plan_is_a_clear_error_not_a_nan_update() -> None:
    plan = Diverging()
    plan.post_init({}, TrainingArgs())
    with pytest.raises(ConfigError, match="diverged"):
        run_local_round(plan, plan.get_params(), TrainingArgs.parse({"num_updates": 2}), {})


def test_dp_args_are_validated_and_need_a_pods_ledger() -> None:
    args = TrainingArgs.parse({"dp_args": {"type": "local", "sigma": 1.0, "clip": 1.0}})
    assert args.dp_args is not None and args.dp_args.delta == 1e-5
    plan = Diverging()
    plan.post_init({}, args)
    with pytest.raises(ConfigError, match="privacy ledger"):
        run_local_round(plan, plan.get_params(), args, {})
    for bad in ({"sigma": -1, "clip": 1}, {"sigma": 1, "clip": 1, "delta": 1.5}, {"sigma": 1, "clip": 1, "eps": 1}):
        with pytest.raises(ConfigError):
            TrainingArgs.parse({"dp_args": bad})


def test_data_manager_takes_a_dataframe_with_a_target_column(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "y": [0, 1]})
    features, target = DataManager(frame, "y").arrays()
    assert features.shape == (2, 2) and target is not None and target.tolist() == [0, 1]
    with pytest.raises(ConfigError, match="target column 'z'"):
        DataManager(frame, "z").arrays()
    plan = plan_for("logistic_regression", CENTRES[0].patients, MODEL_ARGS, TrainingArgs())
    plan.export_model(tmp_path / "model.safetensors")
    assert set(load_file(str(tmp_path / "model.safetensors"))) == {"weight", "bias"}


def test_test_batch_size_scores_in_batches_with_the_same_result() -> None:
    whole = TrainingArgs.parse({"num_updates": 5, "random_seed": 1, "test_ratio": 0.2, "test_metric": "auc",
                                "test_on_global_updates": True})
    batched = TrainingArgs.parse({**whole.model_dump(exclude_none=True), "test_batch_size": 7})
    calls: list[int] = []
    torch.manual_seed(0)
    plan = plan_for("logistic_regression", CENTRES[0].patients, MODEL_ARGS, batched)
    original = plan.predict_scores

    def counting(features: np.ndarray) -> np.ndarray:
        calls.append(len(features))
        return original(features)

    plan.predict_scores = counting  # type: ignore[method-assign]
    with_batches = run_local_round(plan, plan.get_params(), batched, {}).metrics
    torch.manual_seed(0)
    reference = plan_for("logistic_regression", CENTRES[0].patients, MODEL_ARGS, whole)
    without = run_local_round(reference, reference.get_params(), whole, {}).metrics
    assert max(calls) == 7 and len(calls) > 1
    assert with_batches["global_auc"] == pytest.approx(without["global_auc"])


def test_a_data_managers_loader_arguments_are_used_under_the_modellers() -> None:
    """Issue 7, item 11d: DataManager(..., shuffle=False) was stored and never used."""
    from fedpod.algorithms.training.local import with_plan_loader_args

    default = TrainingArgs.parse({"num_updates": 2})
    assert with_plan_loader_args(default, {"shuffle": False, "batch_size": 8}).loader_args.model_dump() == \
        {"batch_size": 8, "shuffle": False, "drop_last": False}
    modeller = TrainingArgs.parse({"num_updates": 2, "loader_args": {"batch_size": 64}})
    merged = with_plan_loader_args(modeller, {"shuffle": False, "batch_size": 8}).loader_args
    assert (merged.batch_size, merged.shuffle) == (64, False)  # the modeller's wins where both set one
    with pytest.raises(ConfigError, match=r"field num_workers in the plan's training_data\(\)"):
        with_plan_loader_args(default, {"num_workers": 4})

    class Ordered(TorchTrainingPlan):
        """Records the order in which rows reach training_step: unshuffled, it is the dataset's."""

        seen: ClassVar[list[float]] = []

        def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
            return torch.nn.Linear(1, 1)

        def training_data(self) -> DataManager:
            return DataManager(torch.arange(6, dtype=torch.float32).reshape(6, 1), torch.zeros(6), shuffle=False,
                               batch_size=2)

        def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            Ordered.seen.extend(data[:, 0].tolist())
            return ((self.model()(data).squeeze(-1) - target) ** 2).mean()

    plan = Ordered()
    plan.post_init({}, TrainingArgs.parse({"num_updates": 3}))
    run_local_round(plan, plan.get_params(), TrainingArgs.parse({"num_updates": 3, "random_seed": 4}), {})
    assert Ordered.seen == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("name", ["perceptron", "sgd_classifier", "sgd_regressor"])
def test_a_scikit_learn_plan_predicts_at_the_modeller_before_and_after_training(name: str) -> None:
    """Issue 7, item 11a: `training_plan().model().predict(X)` raised "'Perceptron' object has no
    attribute 'classes_'" on the modeller's copy, which never sees data."""
    plan = plan_for(name, CENTRES[0].patients, MODEL_ARGS, TrainingArgs.parse({"num_updates": 5}))
    rows = ((POOLED[FEATURES].to_numpy() - np.array(MEANS)) / np.array(STDS))[:20]
    assert plan.model().predict(rows).shape == (20,)
    trained = federated(name, TrainingArgs.parse({"num_updates": 20, "random_seed": 2}), 2)
    predicted = trained.model().predict(rows)
    if name != "sgd_regressor":
        assert set(np.unique(predicted)) <= {0, 1}


def ten_classes(rows: int, seed: int) -> pd.DataFrame:
    """Ten classes, each a region of a 4-feature space a linear softmax model can separate; the
    regions are the same for every seed (one population, sampled by several pods)."""
    centres = np.random.default_rng(100).normal(0, 3, size=(10, 4))
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, rows)
    frame = pd.DataFrame(centres[label] + rng.normal(0, 0.7, size=(rows, 4)), columns=["a", "b", "c", "d"])
    frame["digit"] = label
    return frame


@pytest.mark.parametrize("name", ["logistic_regression", "mlp", "sgd_classifier"])
def test_a_ten_class_target_is_learnt_with_n_classes_and_refused_without(name: str) -> None:
    """Issue 7, item 11e: the built-ins trained a 10-class target as one sigmoid output."""
    frame = ten_classes(3000, seed=1)
    args = TrainingArgs.parse({"num_updates": 300, "random_seed": 3, "test_ratio": 0.2, "test_metric": "f1",
                               "test_on_local_updates": True, "optimizer_args": {"lr": 0.05}})
    two = plan_for(name, frame, {"target": "digit", "features": ["a", "b", "c", "d"]}, args)
    with pytest.raises(ConfigError, match=r"other than the labels of the 2 classes.*n_classes") as refused:
        run_local_round(two, two.get_params(), args, {})
    assert "9" not in refused.value.message  # nor which values it holds: a target expression can make them data
    ten = plan_for(name, frame, {"target": "digit", "features": ["a", "b", "c", "d"], "n_classes": 10}, args)
    result = run_local_round(ten, ten.get_params(), args, {})
    assert result.metrics["local_f1"] > 0.6, result.metrics  # macro F1 over ten classes; chance is ~0.1
    assert ten.predict_scores(frame[["a", "b", "c", "d"]].to_numpy(np.float32, copy=True)).shape == (3000, 10)
    continuous = frame.assign(digit=frame["a"])
    with pytest.raises(ConfigError, match="other than the labels"):
        plan_for(name, continuous, {"target": "digit", "features": ["a", "b"], "n_classes": 10},
                 args).training_data()


def test_the_metrics_plot_labels_its_axes_weights_the_global_curve_and_keeps_honest_ranges() -> None:
    """Issue 7, item 10: no y labels, no curve for all pods, and a zoomed axis that made a
    0.02 wobble look like a collapse."""
    from fedpod.modeller.results import metrics_figure

    replies = {r: {"alice": {"num_samples": 900, "loss": 0.5 - 0.1 * r, "global_auc": 0.80 + 0.01 * r,
                             "global_samples": 100.0},
                   "bob": {"num_samples": 100, "loss": 0.7 - 0.1 * r, "global_auc": 0.60, "global_samples": 300.0}}
               for r in range(3)}
    rows = pd.DataFrame([{"round": r, "pod": pod, **reply} for r, pods in replies.items()
                         for pod, reply in pods.items()])
    axes = metrics_figure(rows).axes
    loss, auc = axes
    assert loss.get_ylabel() == "training loss" and auc.get_ylabel() == "auc (global model, validation rows)"
    assert auc.get_ylim() == (0, 1.02) and loss.get_ylim()[0] == 0
    weighted = next(line for line in auc.get_lines() if line.get_label() == "all pods (weighted)")
    assert list(weighted.get_xdata()) == [0, 1, 2]  # rounds from 0, as everywhere
    assert weighted.get_ydata()[0] == pytest.approx((0.80 * 100 + 0.60 * 300) / 400)
    loss_curve = next(line for line in loss.get_lines() if line.get_label() == "all pods (weighted)")
    assert loss_curve.get_ydata()[0] == pytest.approx((0.5 * 900 + 0.7 * 100) / 1000)


def test_a_failure_outside_fedpod_leaves_the_pod_as_its_kind_alone() -> None:
    """pandas quotes the value it could not read: a text column named as a feature sent a patient's
    identifier to the modeller in the task's failure."""
    from fedpod.algorithms.training.builtin import tabular_arrays
    from fedpod.pod.service import reported_failure

    frame = pd.DataFrame({"patient_id": ["A00-000042", "A00-000043"], "y": [0, 1]})
    with pytest.raises(ValueError, match="A00-000042") as failed:
        tabular_arrays(frame, {"target": "y", "features": ["patient_id"]}, "ehr")
    message, hint = reported_failure(failed.value)
    assert "A00" not in message and "ValueError" in message and hint and "log" in hint
    assert reported_failure(ConfigError("n_classes must be at least 2, not 1", hint="set it")) == (
        "n_classes must be at least 2, not 1", "set it")
