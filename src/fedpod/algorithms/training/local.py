"""One local training round at a pod: seed, split, validate the global model, train, validate again.

Pure with respect to I/O: the pod gives the plan (with its dataset injected), the global
parameters and the round's instructions; the result is new parameters, a sample count and
metrics. `state` keeps what a pod must remember between rounds of one experiment
(Scaffold's own control variate).
"""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
from pydantic import ValidationError

from fedpod.aggregation.base import Params, all_finite
from fedpod.algorithms.training.args import LoaderArgs, TrainingArgs
from fedpod.algorithms.training.layout import layout_digest, recording
from fedpod.algorithms.training.metrics import evaluate
from fedpod.algorithms.training.plans import LocalResult, TrainingPlan
from fedpod.algorithms.training.privacy import PrivacyRound, Spent, check_delta, clip_and_noise, recording_charges
from fedpod.errors import AccessDenied, ConfigError, invalid_fields


def seed_everything(seed: int | None) -> None:
    """Fed-BioMed resets the seed at the start of every round, on pods and modeller alike."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")  # loaded if and only if the plan uses it
    if torch is not None:
        torch.manual_seed(seed)


def split(count: int, test_ratio: float, seed: int | None, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/test split per pod (the same every round for a given seed). Each part keeps
    the dataset's row order: shuffling is the loader's to do, and `shuffle=False` means it.

    `min_rows`: a pod's `min_group_size`. Neither part may hold fewer rows, for what leaves the
    pod is computed from one or the other: a model update from a handful of rows all but holds
    them, and a test metric from one row is that row's label (the mean squared error of a model
    the modeller chose is its value, squared). The rows are shuffled by the seed and the test
    part's size together: with one order for every size, the test parts of 3 and of 4 rows (two
    test_ratios a step apart) would differ by one row, and their metrics by its value."""
    n_test = round(count * test_ratio)
    order = np.random.default_rng([0 if seed is None else seed, n_test]).permutation(count)
    if test_ratio > 0 and (n_test == 0 or n_test == count):
        raise ConfigError(f"test_ratio {test_ratio} leaves no training or no test rows out of {count}")
    for part, rows in (("the training rows", count - n_test), ("the test rows", n_test)):
        if 0 < rows < min_rows:
            raise AccessDenied(f"{part} are fewer than {min_rows}, this pod's min_group_size: nothing computed "
                               "from them may leave it", rule="min_group_size",
                               hint="a test_ratio that leaves more rows in each part" if test_ratio > 0 else None)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _validate(plan: TrainingPlan, features: np.ndarray, target: np.ndarray, args: TrainingArgs,
              prefix: str) -> dict[str, float]:
    size = args.test_batch_size or max(1, len(features))  # batches bound the memory a large test set takes
    scores = np.concatenate([plan.predict_scores(features[start:start + size])
                             for start in range(0, len(features), size)]) if len(features) else np.empty(0)
    metrics = {f"{prefix}_samples": float(len(target))}
    if args.test_metric:
        metrics[f"{prefix}_{args.test_metric}"] = evaluate(args.test_metric, target, scores, **args.test_metric_args)
    return metrics


def with_plan_loader_args(args: TrainingArgs, plan_kwargs: dict[str, Any]) -> TrainingArgs:
    """The plan's `DataManager(..., shuffle=False)` arguments, under the modeller's `loader_args`
    (which win where both set one, as in Fed-BioMed); an argument fedpod does not use is an error."""
    if not plan_kwargs:
        return args
    try:
        loader = LoaderArgs.model_validate({**plan_kwargs, **args.loader_args.model_dump(exclude_unset=True)})
    except ValidationError as exc:
        raise invalid_fields(exc, "DataManager loader arguments", "the plan's training_data()") from exc
    return args.model_copy(update={"loader_args": loader})


def _prepare(plan: TrainingPlan, global_params: Params, args: TrainingArgs, adopt: bool = False,
             min_rows: int = 1) -> tuple[np.ndarray, np.ndarray, TrainingArgs, np.ndarray, np.ndarray, str | None]:
    """Seed, load the global parameters (`adopt`: handed over to the plan, see
    `TrainingPlan.adopt_params`) and the plan's data, and split it (the same way every round);
    the last item is the digest of the feature names the data was built with, where known."""
    seed_everything(args.random_seed)
    if adopt:
        plan.adopt_params(global_params)
    else:
        plan.set_params(global_params)
    with recording() as reported:
        data = plan.training_data()
    features, target = data.arrays()
    if target is None:
        raise ConfigError("training_data() returned no target")
    args = with_plan_loader_args(args, data.loader_kwargs)
    train_rows, test_rows = split(len(features), args.test_ratio, args.random_seed, min_rows)
    return features, target, args, train_rows, test_rows, layout_digest(reported)


DP_KEPT_METRICS = ("steps", "train_seconds")  # under DP, the pod reports nothing else computed from its data


def run_local_round(plan: TrainingPlan, global_params: Params, args: TrainingArgs, round_config: dict[str, Any],
                    *, device: str = "cpu", state: dict[str, Params] | None = None,
                    privacy: PrivacyRound | None = None, hand_over: bool = False, min_rows: int = 1) -> LocalResult:
    """One round; with `dp_args`, `privacy` (from the pod, never the modeller) privatises it: the
    ledger is charged before anything trains, and the reply carries only what epsilon covers (the
    parameters) plus epsilon itself — no loss, no validation scores. `min_rows`: see `split`.

    `hand_over`: the caller gives `global_params` to the plan to train in place (unless central DP
    needs them after training) and takes the result in the plan's own memory, which the plan's
    next round would change — a pod, whose plan lives for one round, so that a 400 MB model is
    held once. Otherwise the result is the caller's own copy."""
    dp = args.dp_args
    if dp is not None and privacy is None:
        raise ConfigError("dp_args need the pod's privacy ledger", hint="run the round through a pod")
    adopt = hand_over and (dp is None or dp.type != "central")
    features, target, args, train_rows, test_rows, layout = _prepare(plan, global_params, args, adopt, min_rows)
    spent: list[Spent] = []
    if dp is not None and privacy is not None:
        check_delta(dp, len(train_rows))
        privacy = recording_charges(privacy, spent)
        if dp.type == "central":
            if round_config.get("scaffold_control") is not None:
                raise ConfigError("central DP cannot protect Scaffold's control variates",
                                  hint="use FedAvg, FedProx or FedOpt aggregators with central DP")
            privacy.charge(privacy.central_mechanism(), dp.delta)
    metrics: dict[str, float] = {}
    if len(test_rows) and args.test_on_global_updates and dp is None:
        metrics |= _validate(plan, features[test_rows], target[test_rows], args, "global")
    dp_sgd = {"privacy": privacy} if dp is not None and dp.type == "local" else {}  # plans predating DP take none
    result = plan.train_round(features[train_rows], target[train_rows], args, round_config, device,
                              state if state is not None else {}, **dp_sgd)
    if len(test_rows) and args.test_on_local_updates and dp is None:
        metrics |= _validate(plan, features[test_rows], target[test_rows], args, "local")
    for name, values in result.params.items():
        if not all_finite(np.asarray(values)):
            raise ConfigError(f"local training produced non-finite values in {name}", hint="lower the learning rate")
    if not hand_over:
        result.params = {name: np.array(values) for name, values in result.params.items()}
    result.metrics |= metrics
    result.feature_layout = layout
    if dp is None or privacy is None:
        return result
    if dp.type == "central":
        result.params, _ = clip_and_noise(result.params, global_params, privacy)
        result.num_samples = 1  # DP-FedAvg weighs pods equally: the count is data too
    result.metrics = {k: v for k, v in result.metrics.items() if k in DP_KEPT_METRICS} | {
        "dp_epsilon": spent[-1].experiment_epsilon, "dp_delta": dp.delta,
        **({"dp_epsilon_remaining": spent[-1].remaining} if spent[-1].remaining is not None else {})}
    return result


def run_evaluation(plan: TrainingPlan, global_params: Params, args: TrainingArgs, min_rows: int = 1) -> LocalResult:
    """Validate the given parameters on this pod's test split (all rows when `test_ratio` is 0),
    training nothing: task kind `evaluate`, which a custodian may grant without `train`.
    `min_rows`: see `split`."""
    features, target, args, train_rows, test_rows, layout = _prepare(plan, global_params, args, min_rows=min_rows)
    rows = test_rows if len(test_rows) else train_rows
    metrics = _validate(plan, features[rows], target[rows], args, "global")
    return LocalResult(params=dict(global_params), num_samples=len(rows), metrics=metrics, extra={},
                       feature_layout=layout)
