"""Differential privacy at a pod: DP-SGD through Opacus, central clipping and noise, and the
epsilon ledger that charges both before anything trains."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedpod.algorithms.training.args import DPArgs, TrainingArgs
from fedpod.algorithms.training.local import run_local_round
from fedpod.algorithms.training.privacy import Mechanism, PrivacyRound, Spent, clip_and_noise, epsilon
from fedpod.errors import AccessDenied, ConfigError
from fedpod.governance.privacy_budget import Budget, PrivacyLedger
from tests.unit.test_training_local import CENTRES, MODEL_ARGS, plan_for

MECHANISM = Mechanism(noise_multiplier=1.1, sample_rate=0.01, steps=100)


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **details: Any) -> None:
        self.events.append((event, details))


def charge(ledger: PrivacyLedger, experiment: str = "e1", modeller: str = "FP-LAB", budget: float | None = 5.0,
           scope: str = "per_modeller", mechanism: Mechanism = MECHANISM) -> Spent:
    return ledger.charge(dataset="ehr", modeller=modeller, name=modeller.lower(), experiment=experiment,
                         budget=Budget(budget, scope), delta=1e-5, mechanism=mechanism)  # type: ignore[arg-type]


def test_rounds_of_one_experiment_compose_through_rdp_and_experiments_add(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "budget.jsonl", Audit())
    first = charge(ledger, budget=None)
    second = charge(ledger, budget=None)
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.01, 100), (1.1, 0.01, 100)]
    assert second.experiment_epsilon == pytest.approx(accountant.get_epsilon(1e-5))
    assert second.experiment_epsilon < 2 * first.experiment_epsilon  # tighter than adding the rounds
    assert ledger.spent("ehr", "FP-LAB") == pytest.approx(second.experiment_epsilon)
    other = charge(ledger, experiment="e2", budget=None)
    assert ledger.spent("ehr", "FP-LAB") == pytest.approx(second.experiment_epsilon + other.experiment_epsilon)


def test_a_charge_beyond_the_budget_is_refused_naming_what_remains_and_nothing_is_spent(tmp_path: Path) -> None:
    one_round = epsilon([MECHANISM], 1e-5)
    audit = Audit()
    ledger = PrivacyLedger(tmp_path / "budget.jsonl", audit)
    spent = charge(ledger, budget=one_round * 1.5)
    assert spent.remaining == pytest.approx(one_round * 0.5)
    with pytest.raises(AccessDenied, match=r"remains of fp-lab's budget .*\[rule: epsilon_budget\]") as refused:
        charge(ledger, experiment="e2", budget=one_round * 1.5)
    assert f"{one_round * 0.5:.4g} remains" in refused.value.message
    assert ledger.spent("ehr") == pytest.approx(one_round)
    assert [event for event, _ in audit.events] == ["privacy-charge"]
    assert audit.events[0][1]["epsilon"] == pytest.approx(one_round, rel=1e-5)


def test_the_ledger_survives_a_restart_and_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "budget.jsonl"
    first = charge(PrivacyLedger(path, Audit()), budget=100)
    with path.open("a") as handle:
        handle.write('{"dataset": "ehr", "modeller": "FP-LA')  # killed mid-write
    restarted = PrivacyLedger(path, Audit())
    assert restarted.spent("ehr", "FP-LAB") == pytest.approx(first.experiment_epsilon)
    second = charge(restarted, budget=100)  # the same experiment goes on composing after the restart
    assert second.experiment_epsilon == pytest.approx(epsilon([MECHANISM, MECHANISM], 1e-5))


def test_a_total_budget_is_shared_by_every_modeller(tmp_path: Path) -> None:
    one_round = epsilon([MECHANISM], 1e-5)
    ledger = PrivacyLedger(tmp_path / "budget.jsonl", Audit())
    charge(ledger, modeller="FP-LAB", budget=one_round * 1.5, scope="total")
    charge(ledger, modeller="FP-OTHER", budget=one_round * 1.5)  # per modeller: the other still has its own
    with pytest.raises(AccessDenied, match="all modellers' budget"):
        charge(ledger, modeller="FP-THIRD", budget=one_round * 2.5, scope="total")


def test_delta_cannot_change_within_an_experiment(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "budget.jsonl", Audit())
    charge(ledger, budget=None)
    with pytest.raises(ConfigError, match=r"changed dp_args\.delta"):
        ledger.charge(dataset="ehr", modeller="FP-LAB", name="lab", experiment="e1", budget=Budget(None),
                      delta=1e-6, mechanism=MECHANISM)


def test_central_noise_clips_the_whole_update_and_adds_the_pods_share() -> None:
    reference = {"w": np.zeros(20_000), "b": np.zeros(1)}
    params = {"w": np.full(20_000, 0.1), "b": np.array([3.0])}
    privacy = PrivacyRound(DPArgs(type="central", sigma=2.0, clip=1.0), shares=4, threshold=3,
                           charge=lambda m, d: Spent(0.0, None))
    noised, norm = clip_and_noise(params, reference, privacy, np.random.default_rng(0))
    assert norm == pytest.approx(math.sqrt(20_000 * 0.01 + 9))
    scale = 1.0 / norm
    residual = noised["w"] - 0.1 * scale
    assert residual.std() == pytest.approx(2.0 * 1.0 / math.sqrt(4), rel=0.03)  # sigma * clip / sqrt(shares)
    assert abs(residual.mean()) < 0.02
    # accounted on the threshold's shares and a per-record sensitivity of 2 * clip
    assert privacy.central_mechanism() == Mechanism(2.0 * math.sqrt(3 / 4) / 2, 1.0, 1)


def recording(budget: float | None = None) -> tuple[list[Mechanism], Any]:
    seen: list[Mechanism] = []

    def record(mechanism: Mechanism, delta: float) -> Spent:
        seen.append(mechanism)
        total = epsilon(seen, delta)
        if budget is not None and total > budget:
            raise AccessDenied("over budget", rule="epsilon_budget")
        return Spent(total, None if budget is None else budget - total)

    return seen, record


def dp_round(kind: str, seed: int = 7, **extra: Any) -> tuple[Any, list[Mechanism], dict[str, np.ndarray]]:
    args = TrainingArgs.parse({"num_updates": 10, "random_seed": seed, "test_ratio": 0.2, "test_metric": "auc",
                               "test_on_local_updates": True, "loader_args": {"batch_size": 64},
                               "dp_args": {"type": kind, "sigma": 1.0, "clip": 1.0}, **extra})
    plan = plan_for("logistic_regression", CENTRES[0].patients, MODEL_ARGS, args)
    start = plan.get_params()
    seen, record = recording()
    assert args.dp_args is not None
    result = run_local_round(plan, start, args, {}, privacy=PrivacyRound(args.dp_args, 1, 1, record))
    return result, seen, start


def test_local_dp_trains_with_opacus_reports_epsilon_and_nothing_else_computed_from_the_data() -> None:
    result, seen, _ = dp_round("local")
    rows = len(CENTRES[0].patients) - round(len(CENTRES[0].patients) * 0.2)
    assert seen == [Mechanism(1.0, 1 / math.ceil(rows / 64), 10)]  # charged once, before training
    accountant = RDPAccountant()
    accountant.history = [(1.0, 1 / math.ceil(rows / 64), 10)]
    assert result.metrics["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert result.metrics["dp_delta"] == 1e-5
    assert not any(k.startswith(("local_", "global_")) or k == "loss" for k in result.metrics)
    assert result.num_samples == rows


def test_the_modellers_seed_does_not_fix_the_noise() -> None:
    for kind in ("local", "central"):
        first, _, _ = dp_round(kind)
        again, _, _ = dp_round(kind)
        assert not all(np.array_equal(first.params[k], again.params[k]) for k in first.params), kind


def test_central_dp_reports_one_sample_and_a_bounded_noisy_update() -> None:
    result, seen, start = dp_round("central")
    assert seen == [Mechanism(0.5, 1.0, 1)]
    assert result.num_samples == 1
    noise = np.concatenate([(result.params[k] - start[k]).ravel() for k in start])
    assert np.linalg.norm(noise) < 1.0 + 6 * math.sqrt(len(noise))


def test_a_round_over_budget_trains_nothing() -> None:
    args = TrainingArgs.parse({"num_updates": 10, "dp_args": {"type": "local", "sigma": 0.5, "clip": 1.0}})
    plan = plan_for("logistic_regression", CENTRES[0].patients, MODEL_ARGS, args)
    start = plan.get_params()
    _, record = recording(budget=0.01)
    assert args.dp_args is not None
    with pytest.raises(AccessDenied, match="over budget"):
        run_local_round(plan, start, args, {}, privacy=PrivacyRound(args.dp_args, 1, 1, record))
    assert all(np.array_equal(plan.get_params()[k], start[k]) for k in start)


def test_local_dp_trains_a_gru_through_opacus_and_keeps_parameter_names() -> None:
    from fedpod.journeys import to_tensor  # noqa: F401  (the journey plans' input)

    args = TrainingArgs.parse({"num_updates": 3, "dp_args": {"type": "local", "sigma": 1.0, "clip": 1.0},
                               "loader_args": {"batch_size": 32}})
    import torch

    from fedpod.algorithms.training.torch_plan import TorchTrainingPlan

    class Gru(TorchTrainingPlan):
        def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
            class Net(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.gru = torch.nn.GRU(3, 8, batch_first=True)
                    self.out = torch.nn.Linear(8, 1)

                def forward(self, x: torch.Tensor) -> torch.Tensor:
                    hidden, _ = self.gru(x)
                    return self.out(hidden[:, -1]).squeeze(-1)

            return Net()

        def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.binary_cross_entropy_with_logits(self.model()(data), target.float())

    plan = Gru()
    plan.post_init({}, args)
    start = plan.get_params()
    features = np.random.default_rng(0).normal(size=(200, 5, 3)).astype(np.float32)
    target = (features.sum(axis=(1, 2)) > 0).astype(np.float32)
    _, record = recording()
    assert args.dp_args is not None
    result = plan.train_round(features, target, args, {}, "cpu", {}, privacy=PrivacyRound(args.dp_args, 1, 1, record))
    assert sorted(result.params) == sorted(start)
    assert any(not np.array_equal(result.params[k], start[k]) for k in start)
    assert type(plan.model().gru) is torch.nn.GRU  # the plan's own model, trained, not Opacus's copy


def test_scikit_learn_plans_refuse_local_dp() -> None:
    args = TrainingArgs.parse({"num_updates": 2, "dp_args": {"type": "local", "sigma": 1.0, "clip": 1.0}})
    plan = plan_for("sgd_classifier", CENTRES[0].patients, MODEL_ARGS, args)
    _, record = recording()
    assert args.dp_args is not None
    with pytest.raises(ConfigError, match="needs a PyTorch plan"):
        run_local_round(plan, plan.get_params(), args, {}, privacy=PrivacyRound(args.dp_args, 1, 1, record))


def test_noisy_sql_bounds_counts_and_clamped_sums_and_refuses_the_rest() -> None:
    import duckdb
    import pyarrow as pa

    from fedpod.algorithms.sql.noisy import add_noise, plan_noisy
    from fedpod.errors import NotMergeable

    plan = plan_noisy("SELECT COUNT(*) AS n, AVG(age) AS mean_age, SUM(bmi) FILTER (WHERE age > 50) FROM ehr",
                      {"age": (0, 120), "BMI": (-10, 60)})
    assert plan.sensitivities == [1.0, 120.0, 1.0, 60.0]  # COUNT, AVG's SUM and COUNT, the filtered SUM
    assert plan.scales == [0, 14, 0, 15]  # sums in units of 2^-g: 120 * 2^14 and 60 * 2^15 are 2^20 to 2^21
    connection = duckdb.connect()
    connection.execute("CREATE TABLE ehr AS SELECT * FROM (VALUES (30, 500.0), (60, 20.0), (200, -99.0)) t(age, bmi)")
    exact = connection.execute(plan.partial_sql).fetchone()
    # age 200 clamped to 120; bmi -99 clamped to -10 (age > 50 rows)
    assert exact == (3, 210 * 2**14, 3, (20 - 10) * 2**15)
    for query, why in [("SELECT MIN(age) FROM ehr", "COUNT, SUM and AVG only"),
                       ("SELECT SUM(age) FROM ehr", "declare bounds for age"),
                       ("SELECT sex, COUNT(*) FROM ehr GROUP BY sex", "GROUP BY"),
                       ("SELECT age FROM ehr", "aggregates")]:
        with pytest.raises(NotMergeable, match=why):
            plan_noisy(query, {})
    # a partial named twice is computed and noised once: epsilon is split over fewer shares
    twice = plan_noisy("SELECT SUM(age) AS s, s / COUNT(*), AVG(age) FROM ehr HAVING COUNT(*) > 0", {"age": (0, 120)})
    assert twice.sensitivities == [120.0, 1.0, 1.0]  # SUM(age), COUNT(*), AVG's COUNT(age)
    counts = plan_noisy("SELECT COUNT(*) AS n FROM ehr", {})
    noisy = [add_noise(pa.table({"p0": [100]}), counts, epsilon=0.5).column("p0")[0].as_py() for _ in range(4000)]
    q = math.exp(-0.5)  # the discrete Laplace distribution of scale 1 / epsilon
    assert np.std(noisy) == pytest.approx(math.sqrt(2 * q) / (1 - q), rel=0.08)
    assert np.mean(noisy) == pytest.approx(100, abs=0.2)


def test_a_noisy_query_answers_whatever_the_data_so_failing_tells_nothing() -> None:
    """`WHERE id = 42 AND CAST(diagnosis AS INT) = 0` failed exactly when patient 42 was in the
    data: a bit outside the noise, as often as asked at an epsilon near zero. Under TRY a value's
    error drops the row, or its value, and the query answers."""
    import duckdb

    from fedpod.algorithms.sql.noisy import plan_noisy

    connection = duckdb.connect()
    connection.execute("CREATE TABLE ehr AS SELECT * FROM (VALUES (42, 'HIV', 30), (7, '12', 40)) t(id, dx, age)")
    for query, exact in [("SELECT COUNT(*) FROM ehr WHERE id = 42 AND CAST(dx AS INT) = 0", (0,)),
                         ("SELECT COUNT(*) FILTER (WHERE CAST(dx AS INT) > 0), COUNT(CAST(dx AS INT)) FROM ehr",
                          (1, 1)),
                         ("SELECT SUM(dx) FROM ehr", (12 * 2**16,))]:
        assert connection.execute(plan_noisy(query, {"dx": (0, 20)}).partial_sql).fetchone() == exact, query
    for refused in ("SELECT COUNT(*) FROM ehr WHERE error(dx) IS NULL",  # whatever the data: a volatile function
                    "SELECT COUNT(*) FROM ehr WHERE random() < 0.5"):
        with pytest.raises(duckdb.BinderException, match="TRY can not be used"):
            connection.execute(plan_noisy(refused, {}).partial_sql)


def test_noisy_sql_adds_its_noise_in_integers_so_no_answer_shows_in_the_low_bits() -> None:
    """A double plus Laplace noise drawn as a double can land only on values some true answers
    reach (Mironov 2012). Every noisy COUNT is a whole number and every noisy SUM a whole number
    of its units, 2^-g, whatever the true answer: the set of possible answers is the same for all."""
    import duckdb

    from fedpod.algorithms.sql.noisy import add_noise, discrete_laplace, plan_noisy

    plan = plan_noisy("SELECT COUNT(*) AS n, SUM(bmi) AS s FROM ehr", {"bmi": (0.0, 70.0)})
    connection = duckdb.connect()
    for value in (21.3, 21.4, 1 / 3):
        connection.execute("CREATE OR REPLACE TABLE ehr AS SELECT ? AS bmi", [value])
        partials = connection.execute(plan.partial_sql).to_arrow_table()
        for _ in range(200):
            n, total = add_noise(partials, plan, epsilon=1.0).to_pylist()[0].values()
            assert float(n).is_integer() and math.ldexp(total, plan.scales[1]).is_integer()
    draws = [discrete_laplace(Fraction(1, 3)) for _ in range(3000)]  # a scale below one: mostly zero
    assert set(draws) <= set(range(-20, 21)) and draws.count(0) / len(draws) == pytest.approx(
        (1 - math.exp(-3)) / (1 + math.exp(-3)), abs=0.03)
