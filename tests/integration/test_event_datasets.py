"""Event datasets at pods (issue 9, item 2): an events table and a static table per pod, both
queried by their names through federated SQL, exactly as on the pooled tables."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.data.journeys import generate_journeys, write_journeys
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory

pytestmark = pytest.mark.integration
QUERIES = [
    "SELECT category, COUNT(*) AS n, AVG(value) AS mean_value FROM ehr GROUP BY category ORDER BY category",
    "SELECT gender, COUNT(*) AS n, AVG(diabetes_next_year) AS rate FROM ehr_static GROUP BY gender ORDER BY gender",
]


def test_events_and_static_tables_answer_federated_sql_exactly(pod_factory: PodFactory, broker: EmbeddedBroker,
                                                               modeller_identity: Identity, keystore: Path,
                                                               tmp_path: Path) -> None:
    folders = write_journeys(generate_journeys(2, 400, seed=8), tmp_path / "data", "parquet")
    for folder in folders:
        pod_factory(folder.name, [DatasetSpec(name="ehr", type="events", path=str(folder / "events.parquet"),
                                              static=str(folder / "patients.parquet"), tags=["journeys"])],
                    [modeller_identity])
    pooled = duckdb.connect()
    for table, file in (("ehr", "events.parquet"), ("ehr_static", "patients.parquet")):
        pooled.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet(?)", [[str(f / file) for f in folders]])
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=30) as modeller:
        [target, _] = modeller.datasets(tags=["journeys"])
        assert target.dataset.kind == "events" and "gender" in target.dataset.tables["ehr_static"]
        for query in QUERIES:
            merged = modeller.sql(query, tags=["journeys"], aggregate=True)
            assert isinstance(merged, pd.DataFrame)
            expected = pooled.sql(query).df()
            pd.testing.assert_frame_equal(merged.reset_index(drop=True), expected, check_dtype=False, rtol=1e-9)


def test_the_vocabulary_is_agreed_across_pods_and_local_codes_are_mapped_first(
        pod_factory: PodFactory, broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path,
        tmp_path: Path) -> None:
    from fedpod.data.journeys import LABS, LOCALLY_CODED
    from fedpod.journeys import top_codes
    from fedpod.modeller.vocabulary import federated_vocabulary

    centres = generate_journeys(2, 600, seed=9)  # alice codes labs in LOINC; bob some under local codes
    folders = write_journeys(centres, tmp_path / "data", "parquet")
    local_to_loinc = {LABS[i].local_code: LABS[i].code for i in LOCALLY_CODED}
    for folder, mapping in zip(folders, ({}, local_to_loinc), strict=True):
        pod_factory(folder.name, [DatasetSpec(name="ehr", type="events", path=str(folder / "events.parquet"),
                                              static=str(folder / "patients.parquet"), code_map=mapping)],
                    [modeller_identity])
    per_pod = [top_codes(c.events, 30) for c in centres]
    assert per_pod[0] != per_pod[1]  # the tutorial's way: feature j means different codes at each pod
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=30) as modeller:
        vocabulary = federated_vocabulary(modeller, 30, table="ehr", datasets=["alice/ehr", "bob/ehr"])
    assert len(vocabulary.codes) == 30 and vocabulary.datasets == ["alice/ehr", "bob/ehr"]
    pooled = pd.concat([c.events for c in centres])
    pooled["code"] = pooled["code"].replace(local_to_loinc)
    expected = top_codes(pooled, 30)
    assert vocabulary.codes == expected  # exactly the pooled ranking (every top code is frequent at both pods)
    assert vocabulary.counts[vocabulary.codes.index("2345-7")] == int((pooled["code"] == "2345-7").sum())
    assert not set(local_to_loinc) & set(vocabulary.codes)  # mapped before counting


@pytest.mark.parametrize("model", ["journey_mlp", "journey_gru"])
def test_journey_models_train_federatedly_on_an_agreed_vocabulary(
        pod_factory: PodFactory, broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path,
        tmp_path: Path, model: str) -> None:
    from fedpod.modeller.experiment import Experiment
    from fedpod.modeller.vocabulary import federated_vocabulary

    folders = write_journeys(generate_journeys(3, 1500, seed=10), tmp_path / "data", "parquet")
    for folder in folders:
        pod_factory(folder.name, [DatasetSpec(name="ehr", type="events", path=str(folder / "events.parquet"),
                                              static=str(folder / "patients.parquet"), tags=["journeys"])],
                    [modeller_identity])
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=60) as modeller:
        experiment = Experiment(
            tags=["journeys"], training_plan_class=model, modeller=modeller, round_limit=4,
            model_args={"target": "diabetes_next_year", "bin_size": "180D", "max_bins": 8, "anchor": "index_date",
                        "top_k": 40},
            training_args={"num_updates": 40, "loader_args": {"batch_size": 64}, "optimizer_args": {"lr": 0.01},
                           "test_ratio": 0.3, "test_metric": "auc", "test_on_global_updates": True, "random_seed": 3},
            experiments_root=tmp_path / "experiments")
        experiment.run()
        agreed = federated_vocabulary(modeller, 40, table="ehr", tags=["journeys"])
        assert experiment.model_args()["codes"] == agreed.codes  # every pod built the same features
        last = experiment.training_replies()[3]
        assert set(last) == {"alice", "bob", "charlie"}
        assert all(0.0 <= reply["global_auc"] <= 1.0 for reply in last.values()), last
        experiment.close()


TUTORIAL_PLAN = '''
import torch
from fedpod.journeys import target, to_tensor, top_codes
from fedpod.training import DataManager, TorchTrainingPlan


class JourneyNet(TorchTrainingPlan):
    """Written the way Fed-BioMed's TanaT tutorial writes its plan, with fedpod's tensor."""

    def init_model(self, model_args):
        return torch.nn.Sequential(torch.nn.Linear(model_args["width"], 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_data(self):
        events, static = self.dataset.to_pandas(), self.dataset.static()
        # the tutorial's way: each pod picks its own top codes; fedpod's: the agreed codes
        codes = top_codes(events, self.model_args["width"]) if self.model_args.get("own_codes") \\
            else self.model_args["codes"]
        tensor = to_tensor(events, static, codes=codes, bin_size="180D", max_bins=8, anchor="index_date").tensor
        features = torch.log1p(torch.tensor(tensor)).mean(dim=1)
        labels = torch.tensor(target(static, "diabetes_next_year"), dtype=torch.float32)
        return DataManager(features, labels, batch_size=64)

    def training_step(self, data, target):
        return torch.nn.functional.binary_cross_entropy_with_logits(self.model()(data).squeeze(-1), target)
'''


def test_a_tutorial_style_custom_plan_trains_after_approval_and_per_pod_vocabularies_are_refused(
        pod_factory: PodFactory, broker: EmbeddedBroker, modeller_identity: Identity, keystore: Path,
        tmp_path: Path) -> None:
    import hashlib
    import subprocess
    import sys

    from fedpod.modeller.experiment import Experiment, RoundFailed
    from fedpod.modeller.vocabulary import federated_vocabulary

    centres = generate_journeys(2, 800, seed=11)  # bob's local codes make the two pods' top codes differ
    folders = write_journeys(centres, tmp_path / "data", "parquet")
    pods = [pod_factory(folder.name, [DatasetSpec(name="ehr", type="events", path=str(folder / "events.parquet"),
                                                  static=str(folder / "patients.parquet"), tags=["journeys"])],
                        [modeller_identity]) for folder in folders]
    plan_file = tmp_path / "journey_plan.py"
    plan_file.write_text(TUTORIAL_PLAN)
    fedpod = str(Path(sys.executable).parent / "fedpod")
    digest = hashlib.sha256(TUTORIAL_PLAN.encode()).hexdigest()[:12]
    training = {"num_updates": 10, "optimizer_args": {"lr": 0.01}, "random_seed": 2, "test_ratio": 0.25,
                "test_metric": "auc", "test_on_global_updates": True}
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=60) as modeller:
        codes = federated_vocabulary(modeller, 20, table="ehr", tags=["journeys"]).codes
        agreed = Experiment(tags=["journeys"], training_plan_class="JourneyNet", training_plan_path=plan_file,
                            model_args={"width": 20, "codes": codes}, training_args=training, round_limit=2,
                            modeller=modeller, experiments_root=tmp_path / "experiments")
        with pytest.raises(RoundFailed, match="awaiting approval"):
            agreed.run_once()
        for pod in pods:  # each custodian reads the source it was sent and approves that exact text
            subprocess.run([fedpod, "plan", "approve", digest, "--config", str(pod.config_path)], check=True,
                           capture_output=True)
        assert agreed.run() == 2
        assert set(agreed.training_replies()[1]) == {"alice", "bob"}
        agreed.close()

        own = Experiment(tags=["journeys"], training_plan_class="JourneyNet", training_plan_path=plan_file,
                         model_args={"width": 20, "own_codes": True}, training_args=training, round_limit=1,
                         modeller=modeller, experiments_root=tmp_path / "experiments")
        with pytest.raises(RoundFailed, match=r"different feature lists \(alice built features [0-9a-f]{16}; "
                                              r"bob built features [0-9a-f]{16}\)") as refused:
            own.run_once()
        assert "federated_vocabulary" in (refused.value.hint or "") and own.round_current() == 0
        own.close()


def test_a_journey_model_trains_from_a_task_file(pod_factory: PodFactory, broker: EmbeddedBroker,
                                                 modeller_identity: Identity, keystore: Path, tmp_path: Path) -> None:
    from rich.console import Console

    from fedpod.modeller.training_task import run_training_task
    from fedpod.tasks.yaml_front import load_task

    folders = write_journeys(generate_journeys(2, 800, seed=12), tmp_path / "data", "parquet")
    for folder in folders:
        pod_factory(folder.name, [DatasetSpec(name="ehr", type="events", path=str(folder / "events.parquet"),
                                              static=str(folder / "patients.parquet"))], [modeller_identity])
    task_file = tmp_path / "journeys.yaml"
    task_file.write_text('''
pods:
  identifiers: [alice/ehr, bob/ehr]
task:
  protocol: {name: bitfount.FederatedAveraging, arguments: {steps_between_parameter_updates: 20}}
  algorithm:
    name: bitfount.FederatedModelTraining
    model:
      bitfount_model: {model_ref: journey_gru}
      bin_size: 180D
      max_bins: 6
      anchor: index_date
      top_k: 25
      hidden_size: 16
    hyperparameters: {steps: 40, batch_size: 64, learning_rate: 0.01}
  data_structure:
    assign: {target: diabetes_next_year}
''')
    task = load_task(task_file)
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=60) as modeller:
        experiment = run_training_task(task, modeller, tmp_path / "runs", Console(quiet=True))
        assert experiment.round_current() == 2 and len(experiment.model_args()["codes"]) == 25
        assert set(experiment.training_replies()[1]) == {"alice", "bob"}
        experiment.close()
