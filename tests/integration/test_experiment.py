"""Federated training with `Experiment` over a real NATS server, pods as processes."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedpod.algorithms.training.metrics import evaluate
from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.modeller.client import Modeller
from fedpod.modeller.experiment import Experiment, RoundFailed
from fedpod.modeller.standardise import global_standardisation
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, RunningPod, heartbeats, start_pod_process, wait_until

pytestmark = pytest.mark.integration
DATASET = "ehr-records-2025"
FEATURES = ["age", "bmi", "smoker", "diabetes", "systolic_bp", "cholesterol", "hba1c"]
PODS = ["alice", "bob", "charlie"]


@pytest.fixture
def data(tmp_path: Path) -> list[Path]:
    return [f / "patients.csv" for f in write(generate(3, 2400, seed=5), tmp_path / "data")]


@pytest.fixture
def pods(pod_factory: PodFactory, data: list[Path], modeller_identity: Identity) -> list[RunningPod]:
    return [pod_factory(name, [DatasetSpec(name=DATASET, kind="csv", path=str(csv), tags=["ehr"])],
                        [modeller_identity]) for name, csv in zip(PODS, data, strict=True)]


@pytest.fixture
def modeller(broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path) -> Any:
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=120) as client:
        yield client


def standardisation(modeller: Modeller) -> dict[str, Any]:
    """Global means and standard deviations, computed exactly with federated SQL."""
    return {"target": "outcome"} | global_standardisation(modeller, modeller.resolve(tags=["ehr"]), FEATURES)


TRAINING_ARGS = {"num_updates": 25, "loader_args": {"batch_size": 32}, "optimizer_args": {"lr": 0.05},
                 "random_seed": 7, "test_ratio": 0.2, "test_metric": "auc", "test_on_global_updates": True}


def experiment(modeller: Modeller, tmp_path: Path, **overrides: Any) -> Experiment:
    arguments: dict[str, Any] = {"tags": ["ehr"], "training_plan_class": "logistic_regression",
                                 "model_args": standardisation(modeller), "training_args": TRAINING_ARGS,
                                 "round_limit": 3, "modeller": modeller, "experiments_root": tmp_path / "experiments"}
    return Experiment(**{**arguments, **overrides})


def pooled_auc(exp: Experiment, files: list[Path]) -> float:
    pooled = pd.concat([pd.read_csv(f) for f in files])
    args = exp.model_args()
    x = (pooled[FEATURES].to_numpy() - np.array(args["feature_means"])) / np.array(args["feature_stds"])
    return evaluate("auc", pooled["outcome"].to_numpy(), exp.training_plan().predict_scores(x.astype(np.float32)))


def test_experiment_trains_over_three_pods_and_records_everything(pods: list[RunningPod], modeller: Modeller,
                                                                  tmp_path: Path, data: list[Path]) -> None:
    exp = experiment(modeller, tmp_path)
    assert exp.run() == 3 and exp.round_current() == 3
    replies = exp.training_replies()
    assert sorted(replies) == [0, 1, 2]
    assert all(set(replies[r]) == set(PODS) for r in replies)
    assert {"loss", "num_samples", "global_auc", "seconds", "steps"} <= set(replies[2]["alice"])
    assert replies[2]["alice"]["steps"] == 25.0
    assert sorted(exp.aggregated_params()) == [0, 1, 2]
    assert pooled_auc(exp, data) > 0.75
    folder = exp.experimentation_path()
    assert folder.name == "Experiment_0001"
    assert len(pd.read_csv(folder / "metrics.csv")) == 9 and (folder / "model.safetensors").exists()
    assert (folder / "metrics.png").stat().st_size > 10_000
    exp.training_plan().export_model(tmp_path / "final.safetensors")
    assert (tmp_path / "final.safetensors").stat().st_size > 0
    assert experiment(modeller, tmp_path).experimentation_path().name == "Experiment_0002"


def test_run_and_run_once_respect_the_round_limit(pods: list[RunningPod], modeller: Modeller, tmp_path: Path) -> None:
    exp = experiment(modeller, tmp_path, round_limit=1, training_args={**TRAINING_ARGS, "num_updates": 2},
                     tensorboard=True)
    assert exp.run_once() == 1
    assert exp.run_once() == 0 and exp.round_current() == 1
    assert exp.run_once(increase=True) == 1 and exp.round_limit() == 2
    assert exp.run(rounds=2) == 0
    assert exp.run(rounds=1, increase=True) == 1 and exp.round_current() == 3 and exp.round_limit() == 3
    exp.set_training_args({**TRAINING_ARGS, "num_updates": 3})
    exp.set_round_limit(4)
    exp.run()
    assert exp.training_replies()[3]["bob"]["steps"] == 3.0
    exp.close()
    assert list((exp.experimentation_path() / "tensorboard").glob("events.out.tfevents.*"))



def test_setters_apply_from_the_next_round(pods: list[RunningPod], modeller: Modeller, tmp_path: Path) -> None:
    exp = experiment(modeller, tmp_path, round_limit=None)
    exp.run_once(increase=True)
    assert "global_accuracy" not in exp.training_replies()[0]["alice"]
    exp.set_test_metric("accuracy")
    exp.set_model_args(exp.model_args())  # same shapes: the global model carries over
    trained = exp.aggregated_params()[0]["params"]
    for key, value in exp.training_plan().get_params().items():
        np.testing.assert_array_equal(value, trained[key])
    exp.set_save_breakpoints(True)
    exp.set_tensorboard(True)
    exp.run_once(increase=True)
    assert "global_accuracy" in exp.training_replies()[1]["alice"]
    assert exp.save_breakpoints() and exp.tensorboard()
    assert list((exp.experimentation_path() / "breakpoints").glob("breakpoint_*"))
    exp.set_training_plan_class("mlp")  # another architecture: the next round starts from its own weights
    exp.set_model_args({**exp.model_args(), "hidden": [4]})
    exp.run_once(increase=True)
    assert set(exp.aggregated_params()[2]["params"]) != set(trained)
    exp.close()


PLAN_SOURCE = '''
import torch
from fedpod.training import DataManager, TorchTrainingPlan


class TinyPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return torch.nn.Linear(2, 1)

    def training_data(self):
        frame = self.dataset.to_pandas()
        features = torch.tensor(frame[["age", "bmi"]].to_numpy() / 100.0, dtype=torch.float32)
        return DataManager(features, torch.tensor(frame["outcome"].to_numpy(), dtype=torch.float32))

    def training_step(self, data, target):
        return torch.nn.functional.binary_cross_entropy_with_logits(self.model()(data).squeeze(-1), target)
'''


def test_custom_plan_runs_only_after_approval(pods: list[RunningPod], modeller: Modeller, tmp_path: Path) -> None:
    plan_file = tmp_path / "tiny_plan.py"
    plan_file.write_text(PLAN_SOURCE)
    exp = experiment(modeller, tmp_path, training_plan_class="TinyPlan", training_plan_path=plan_file,
                     model_args={}, nodes=["alice"])
    with pytest.raises(RoundFailed, match=r"awaiting approval on pod alice \(hash [0-9a-f]{64}\)") as refused:
        exp.run_once()
    assert exp.round_current() == 0
    fedpod = str(Path(sys.executable).parent / "fedpod")
    config = str(pods[0].config_path)
    said = str(refused.value)  # the command to run, whole; no advice to lower min_pods (issue 7, item 5)
    assert f"`fedpod plan approve {__import__('hashlib').sha256(PLAN_SOURCE.encode()).hexdigest()[:12]} " \
           f"--config {pods[0].config_path.resolve()}`" in said
    assert "min_pods" not in refused.value.hint and "awaits its custodians' approval on alice" in refused.value.hint
    listing = subprocess.run([fedpod, "plan", "list", "--config", config], capture_output=True, text=True, check=True)
    assert "TinyPlan" in listing.stdout and "pending" in listing.stdout
    sha = __import__("hashlib").sha256(PLAN_SOURCE.encode()).hexdigest()
    shown = subprocess.run([fedpod, "plan", "show", sha[:12], "--config", config], capture_output=True, text=True,
                           check=True)
    assert "class TinyPlan" in shown.stdout
    subprocess.run([fedpod, "plan", "approve", sha[:12], "--config", config], check=True, capture_output=True)
    assert exp.run_once() == 1
    assert set(exp.training_replies()[0]) == {"alice"}
    from fedpod.governance.audit import AuditLog

    assert AuditLog.verify(pods[0].audit_path).ok



def test_heartbeats_continue_while_a_pod_trains(pods: list[RunningPod], modeller: Modeller, tmp_path: Path,
                                               broker: EmbeddedBroker) -> None:
    from fedpod.governance.plans import PlanRegistry

    source = PLAN_SOURCE.replace("    def training_step(self, data, target):\n",
                                 "    def training_step(self, data, target):\n        __import__('time').sleep(0.05)\n")
    plan_file = tmp_path / "slow_plan.py"
    plan_file.write_text(source)
    registry = PlanRegistry(pods[0].config_path.parent / "storage" / "plans")
    registry.decide(registry.submit(source, "TinyPlan", "test")[0], "approved")
    exp = experiment(modeller, tmp_path, training_plan_class="TinyPlan", training_plan_path=plan_file,
                     model_args={}, nodes=["alice"], training_args={"num_updates": 60})
    with heartbeats(broker, pods[0]) as beats:
        started = time.monotonic()
        exp.run_once()
        finished = time.monotonic()
        during = [b for b in beats if started < b < finished]
    assert finished - started > 3.0  # 60 steps of 50 ms
    gaps = [b - a for a, b in itertools.pairwise([started, *during, finished])]
    assert max(gaps) < 1.0, gaps  # heartbeats every 0.2 s

def test_a_failing_pod_is_named_and_min_pods_decides_the_round(pods: list[RunningPod], modeller: Modeller,
                                                              tmp_path: Path) -> None:
    exp = experiment(modeller, tmp_path, min_pods=2, training_args={**TRAINING_ARGS, "num_updates": 2})
    exp.run_once()
    targets = exp._targets()
    before = {k: v.copy() for k, v in exp.aggregated_params()[0]["params"].items()}
    pods[2].stop()
    exp._targets = lambda: targets  # type: ignore[method-assign]  # keep the dead pod selected
    assert exp.run_once() == 1
    failed = exp.training_replies()[1]["charlie"]
    assert "charlie" in failed["error"]
    exp.set_min_pods(3)
    with pytest.raises(RoundFailed, match=r"2 of 3 pods replied, 3 needed.*charlie"):
        exp.run_once()
    assert exp.round_current() == 2
    assert not all(np.array_equal(before[k], exp.aggregated_params()[1]["params"][k]) for k in before)


def test_training_error_at_a_pod_reaches_the_modeller_with_the_pod_name(pods: list[RunningPod], modeller: Modeller,
                                                                        tmp_path: Path) -> None:
    exp = experiment(modeller, tmp_path, model_args={"target": "no_such_column", "features": FEATURES})
    with pytest.raises(RoundFailed, match=r"alice: .*no_such_column"):
        exp.run_once()


RESUME_SCRIPT = textwrap.dedent('''
    import json
    import sys
    import time
    from pathlib import Path

    from fedpod.aggregation import FedAdam
    from fedpod.modeller.experiment import Experiment

    settings = json.loads(sys.argv[1])
    exp = Experiment(tags=["ehr"], training_plan_class="TinyPlan", training_plan_path=settings["plan"], model_args={},
                     training_args=settings["training_args"], round_limit=4, save_breakpoints=True,
                     broker=settings["broker"], keystore=Path(settings["keystore"]), aggregator=FedAdam(lr=0.05))
    exp.run(rounds=2)
    print("two rounds done", flush=True)
    time.sleep(600)
''')


def test_breakpoint_resume_after_killing_the_modeller_matches_an_uninterrupted_run(
        pods: list[RunningPod], modeller: Modeller, tmp_path: Path, broker: EmbeddedBroker, keystore: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom plan class, the modeller killed after two rounds (in its own working directory,
    experiments under ./experiments), resumed with `Experiment.load_breakpoint()` and no argument,
    reconnecting to the broker the breakpoint names; the same final weights as an uninterrupted
    run. Issue 7, items 2 and 11b/c: such a breakpoint could not be loaded (the class had no file
    to read its source from), and one read from another directory pointed at the wrong folder."""
    from fedpod.aggregation import FedAdam
    from fedpod.governance.plans import PlanRegistry

    plan_file = tmp_path / "tiny_plan.py"
    plan_file.write_text(PLAN_SOURCE)
    for pod in pods:
        registry = PlanRegistry(pod.config_path.parent / "storage" / "plans")
        registry.decide(registry.submit(PLAN_SOURCE, "TinyPlan", "test")[0], "approved")
    uninterrupted = experiment(modeller, tmp_path / "a", training_plan_class="TinyPlan", training_plan_path=plan_file,
                               model_args={}, round_limit=4, aggregator=FedAdam(lr=0.05))
    uninterrupted.run()
    settings = {"plan": str(plan_file), "training_args": TRAINING_ARGS, "broker": broker.url,
                "keystore": str(keystore)}
    import json

    workdir = tmp_path / "modeller-workdir"
    workdir.mkdir()
    log = tmp_path / "modeller.log"
    process = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, json.dumps(settings)], stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, cwd=workdir,
                               env={**os.environ, "PYTHONPATH": os.getcwd(), "FEDPOD_BROKER": "nats://127.0.0.1:9"})
    try:
        wait_until(lambda: "two rounds done" in log.read_text() or process.poll() is not None, 120, "two rounds")
        assert process.poll() is None, log.read_text()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    monkeypatch.chdir(tmp_path)  # elsewhere: the breakpoint's folder is absolute
    elsewhere = Experiment.load_breakpoint(workdir / "experiments", keystore=keystore)
    assert sorted(elsewhere.aggregated_params()) == [0, 1]
    elsewhere.close()
    monkeypatch.chdir(workdir)
    resumed = Experiment.load_breakpoint(keystore=keystore)  # the latest breakpoint of the latest experiment
    assert resumed.round_current() == 2 and sorted(resumed.training_replies()) == [0, 1]
    assert resumed.training_plan().__class__.__name__ == "TinyPlan"
    resumed.run()
    resumed.close()
    assert resumed.round_current() == 4
    final, expected = resumed.aggregated_params()[3]["params"], uninterrupted.aggregated_params()[3]["params"]
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key], rtol=1e-6, atol=1e-7)


def test_scaffold_state_survives_a_pod_restart(pods: list[RunningPod], modeller: Modeller, tmp_path: Path) -> None:
    """A pod keeps its Scaffold control variate on disk: restarted between rounds, it goes on
    exactly as if it had never stopped (same final weights as an uninterrupted run)."""
    from fedpod.aggregation import Scaffold

    model_args = standardisation(modeller)
    uninterrupted = experiment(modeller, tmp_path / "a", model_args=model_args, aggregator=Scaffold())
    uninterrupted.run()
    interrupted = experiment(modeller, tmp_path / "b", model_args=model_args, aggregator=Scaffold())
    interrupted.run_once()
    bob = pods[1]
    state_files = sorted((bob.config_path.parent / "storage" / "training-state").glob("*.safetensors"))
    assert len(state_files) == 2  # one per experiment, named by a hash, never by the modeller's ids
    bob.stop()
    bob.process, bob.log = start_pod_process(bob.config_path)
    interrupted.run()
    assert interrupted.round_current() == 3
    final, expected = interrupted.aggregated_params()[2]["params"], uninterrupted.aggregated_params()[2]["params"]
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key], rtol=1e-6, atol=1e-7)


def test_unknown_training_args_fail_before_any_pod_is_asked(modeller: Modeller, tmp_path: Path) -> None:
    from fedpod.errors import ConfigError

    with pytest.raises(ConfigError, match="valid keys"):
        Experiment(tags=["ehr"], training_plan_class="mlp", model_args={"n_features": 3, "target": "y"},
                   training_args={"epochs": 1, "learning_rate": 0.1}, modeller=modeller)
    with pytest.raises(ConfigError, match="num_updates"):
        from fedpod.aggregation import Scaffold

        Experiment(tags=["ehr"], training_plan_class="mlp", model_args={"n_features": 3, "target": "y"},
                   training_args={"epochs": 1}, aggregator=Scaffold(), modeller=modeller)


def test_a_ten_class_built_in_model_trains_over_pods(pod_factory: PodFactory, modeller: Modeller,
                                                     modeller_identity: Identity, tmp_path: Path) -> None:
    """Issue 7, item 11e: a 10-class target over three pods, softmax logistic regression, macro F1."""
    from tests.unit.test_training_local import ten_classes

    for index, name in enumerate(PODS):
        csv = tmp_path / f"{name}.csv"
        ten_classes(1500, seed=index).to_csv(csv, index=False)
        pod_factory(name, [DatasetSpec(name="digits", kind="csv", path=str(csv), tags=["digits"])], [modeller_identity])
    exp = Experiment(tags=["digits"], training_plan_class="logistic_regression",
                     model_args={"target": "digit", "features": ["a", "b", "c", "d"], "n_classes": 10},
                     training_args={"num_updates": 100, "optimizer_args": {"lr": 0.05}, "random_seed": 1,
                                    "test_ratio": 0.2, "test_metric": "f1", "test_on_global_updates": True},
                     round_limit=4, modeller=modeller, experiments_root=tmp_path / "experiments")
    exp.run()
    last = exp.training_replies()[3]
    assert all(last[pod]["global_f1"] > 0.6 for pod in PODS), last
    assert exp.training_plan().predict_scores(np.zeros((2, 4), dtype=np.float32)).shape == (2, 10)


def test_each_round_reports_what_every_pod_is_doing(pods: list[RunningPod], modeller: Modeller,
                                                    tmp_path: Path) -> None:
    """Issue 7, item 9: a live per-pod status (here: its record), not only a table at the end. The
    first round shows the pods preparing (importing PyTorch), which used to look like a hang."""
    exp = experiment(modeller, tmp_path, round_limit=2)
    exp.run()
    progress = exp.round_progress()
    assert sorted(progress) == [0, 1]
    for round_number in (0, 1):
        for pod in PODS:
            phases = [phase for phase, _ in progress[round_number][pod]]
            assert phases[0] == "waiting" and "sending model" in phases and phases[-1] == "done", phases
            times = [at for _, at in progress[round_number][pod]]
            assert times == sorted(times)
    assert any("preparing" in [phase for phase, _ in progress[0][pod]] for pod in PODS), progress[0]


def test_pods_whose_columns_come_in_another_order_are_refused_not_averaged(
        pod_factory: PodFactory, modeller: Modeller, data: list[Path], tmp_path: Path) -> None:
    """Without `features` (and without the standardisation that names them), a built-in model
    reads each pod's numeric columns in that pod's order; the digests differ and the round stops."""
    frame = pd.read_csv(data[1])
    reordered = tmp_path / "reordered.csv"
    frame[list(reversed(frame.columns))].to_csv(reordered, index=False)
    for name, csv in (("alice", data[0]), ("bob", reordered)):
        pod_factory(name, [DatasetSpec(name=DATASET, kind="csv", path=str(csv), tags=["ehr"])],
                    [modeller.identity])
    exp = experiment(modeller, tmp_path, model_args={"target": "outcome", "n_features": len(FEATURES)},
                     standardize=False, round_limit=1)
    with pytest.raises(RoundFailed, match=r"different feature lists \((alice|bob) built features"):
        exp.run_once()
    assert exp.round_current() == 0
    exp.close()
    named = experiment(modeller, tmp_path, model_args={"target": "outcome", "features": FEATURES},
                       standardize=False, round_limit=1)
    assert named.run_once() == 1  # named features are read by name, in one order, everywhere
    named.close()


MLP = {"target": "outcome", "features": FEATURES, "hidden": [1000, 1000]}  # ~1M parameters: several chunks
MLP_TRAINING = {"num_updates": 2, "loader_args": {"batch_size": 32}, "random_seed": 7}


def test_a_round_sends_the_model_once_for_all_its_pods(pods: list[RunningPod], modeller: Modeller,
                                                        tmp_path: Path) -> None:
    """Issue 11, item 4: the round's model is cast — sealed once, sent once over the modeller's
    link, fanned out by NATS — instead of once per pod."""
    exp = experiment(modeller, tmp_path, training_plan_class="mlp", model_args=MLP, training_args=MLP_TRAINING,
                     round_limit=2, standardize=False)
    size = sum(v.nbytes for v in exp.training_plan().get_params().values())
    sent_before = modeller.traffic()[0]
    assert exp.run() == 2
    sent = modeller.traffic()[0] - sent_before
    assert 2 * size < sent < 2 * size * 1.25, f"{sent:,} bytes sent for two rounds of a {size:,}-byte model"
    assert set(exp.training_replies()[1]) == set(PODS)


def test_a_pod_that_lacks_the_cast_model_is_sent_it_directly(pods: list[RunningPod], modeller: Modeller,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cast every pod seemed to acknowledge (acknowledgements can be forged by anyone who sees
    the subject) but none received: each pod says so, and gets the model in its request."""
    from fedpod.governance.audit import AuditLog
    from fedpod.modeller.client import AsyncModeller

    async def lost(self: AsyncModeller, targets: list[Any], tensors: Any) -> tuple[str, set[str]]:
        return "a-cast-that-never-came", {target.fingerprint for target in targets}

    monkeypatch.setattr(AsyncModeller, "cast_model", lost)
    exp = experiment(modeller, tmp_path, training_plan_class="mlp", model_args=MLP, training_args=MLP_TRAINING,
                     round_limit=1, standardize=False)
    assert exp.run() == 1
    assert set(exp.training_replies()[0]) == set(PODS)
    failures = [e for e in AuditLog(pods[0].audit_path).entries() if e["event"] == "task-failed"]
    assert [e["error"] for e in failures] == ["CastMissing"]
