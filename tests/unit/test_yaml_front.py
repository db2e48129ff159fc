from __future__ import annotations

from pathlib import Path

import pytest

from fedpod.errors import ConfigError
from fedpod.tasks.yaml_front import load_task

EXAMPLES = Path(__file__).parents[2] / "examples"
BITFOUNT_EXAMPLE = (EXAMPLES / "bitfount-sql.yaml").read_text()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(text)
    return path


def test_bitfount_example_compiles_unchanged(tmp_path: Path) -> None:
    task = load_task(write(tmp_path, BITFOUNT_EXAMPLE))
    assert task.targets.identifiers == ["alice/ehr-records-2025", "bob/ehr-records-2025", "charlie/ehr-records-2025"]
    assert task.query == "SELECT * FROM `ehr-records-2025` LIMIT 10"
    assert not task.aggregate and task.table == "ehr-records-2025"


def test_aggregator_section_asks_for_one_global_result(tmp_path: Path) -> None:
    text = BITFOUNT_EXAMPLE.replace("  data_structure:", "  aggregator: {secure: false}\n  data_structure:")
    assert load_task(write(tmp_path, text)).aggregate


def test_secure_aggregation_of_sql_carries_its_settings(tmp_path: Path) -> None:
    secure = "  aggregator: {secure: true, num_shares: 3}\n  data_structure:"
    text = BITFOUNT_EXAMPLE.replace("  data_structure:", secure)
    task = load_task(write(tmp_path, text))
    assert task.aggregate and task.secagg == {"num_shares": 3}
    text = BITFOUNT_EXAMPLE.replace("  data_structure:", "  aggregator: {num_shares: 3}\n  data_structure:")
    with pytest.raises(ConfigError, match="without `secure: true`"):
        load_task(write(tmp_path, text))


def test_unknown_protocol_lists_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="supported: FederatedAveraging, ResultsOnly"):
        load_task(write(tmp_path, BITFOUNT_EXAMPLE.replace("bitfount.ResultsOnly", "bitfount.Nope")))


def test_results_can_only_be_saved_at_the_modeller(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="save_location"):
        load_task(write(tmp_path, BITFOUNT_EXAMPLE.replace('["Modeller"]', '["Worker"]')))


def test_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key `extra` at the top level"):
        load_task(write(tmp_path, BITFOUNT_EXAMPLE + "\nextra: 1\n"))


@pytest.mark.parametrize("original,misspelled,path,nearest", [
    ("save_location", "save_locaton", "task.protocol.arguments", "save_location"),
    ("table_config", "table_confg", "task.data_structure", "table_config"),
    ("identifiers", "identifers", "pods", "identifiers"),
    ("    arguments:\n      query", "    argument:\n      query", "task.algorithm", "arguments"),
])
def test_a_misspelled_key_anywhere_is_named_with_its_place_and_the_nearest_valid_key(
        tmp_path: Path, original: str, misspelled: str, path: str, nearest: str) -> None:
    """Issue 7, item 3: unknown keys were ignored (save_locaton) or led to a message about another key."""
    assert original in BITFOUNT_EXAMPLE
    with pytest.raises(ConfigError) as info:
        load_task(write(tmp_path, BITFOUNT_EXAMPLE.replace(original, misspelled, 1)))
    said = str(info.value)
    assert f"unknown key `{misspelled.split(':')[0].strip()}` at {path}" in said
    assert f"did you mean `{nearest}`?" in said and "task.yaml" in said


def test_training_keys_are_strict_too(tmp_path: Path) -> None:
    for original, misspelled, path in (("batch_size", "batchsize", "task.algorithm.hyperparameters"),
                                       ("{model_ref:", "{model_rf:", "task.algorithm.model.bitfount_model"),
                                       ("assign:", "asign:", "task.data_structure")):
        with pytest.raises(ConfigError, match=f"unknown key `{misspelled.strip('{:')}` at {path}"):
            load_task(write(tmp_path, TRAINING_EXAMPLE.replace(original, misspelled, 1)))
    both = TRAINING_EXAMPLE.replace("steps_between_parameter_updates: 20",
                                    "steps_between_parameter_updates: 20\n      epochs_between_parameter_updates: 1")
    with pytest.raises(ConfigError, match="mixing steps"):
        load_task(write(tmp_path, both))
    aggregator = TRAINING_EXAMPLE.replace("    secure: False",
                                          "    secure: False\n    name: trimmed_mean\n    betta: 0.2")
    with pytest.raises(ConfigError, match=r"unknown argument `betta` for aggregator 'trimmed_mean'.*`beta`"):
        load_task(write(tmp_path, aggregator))
    steps_for_sql = BITFOUNT_EXAMPLE.replace('save_location: ["Modeller"]',
                                             'save_location: ["Modeller"]\n      steps_between_parameter_updates: 2')
    with pytest.raises(ConfigError, match=r"belong.*to FederatedAveraging, not ResultsOnly"):
        load_task(write(tmp_path, steps_for_sql))


TRAINING_EXAMPLE = (EXAMPLES / "bitfount-training.yaml").read_text()


def test_bitfount_training_example_compiles_into_rounds_of_local_steps(tmp_path: Path) -> None:
    from fedpod.tasks.model import TrainingTask

    task = load_task(write(tmp_path, TRAINING_EXAMPLE))
    assert isinstance(task, TrainingTask)
    assert task.plan == "logistic_regression" and task.plan_path is None
    assert task.rounds == 5 and task.training_args["num_updates"] == 20
    assert task.training_args["loader_args"] == {"batch_size": 32}
    assert task.training_args["optimizer_args"] == {"lr": 0.05}
    assert task.model_args == {"target": "outcome"} and task.schema_requirements == "full"


def test_mixing_steps_and_epochs_is_an_error(tmp_path: Path) -> None:
    text = TRAINING_EXAMPLE.replace("{steps: 100,", "{epochs: 2, steps: 100,")
    with pytest.raises(ConfigError, match="mixing steps"):
        load_task(write(tmp_path, text))


def test_epochs_between_updates_give_rounds_of_epochs(tmp_path: Path) -> None:
    text = (TRAINING_EXAMPLE.replace("steps_between_parameter_updates: 20", "epochs_between_parameter_updates: 1")
            .replace("{steps: 100,", "{epochs: 3,"))
    task = load_task(write(tmp_path, text))
    assert task.rounds == 3 and task.training_args["epochs"] == 1  # type: ignore[union-attr]


def test_secure_training_aggregation_carries_its_settings_and_refuses_them_alone(tmp_path: Path) -> None:
    task = load_task(write(tmp_path, TRAINING_EXAMPLE.replace("secure: False", "secure: True\n    num_shares: 5")))
    assert task.secagg == {"num_shares": 5} and task.aggregator == {"name": "fedavg"}  # type: ignore[union-attr]
    plain = load_task(write(tmp_path, TRAINING_EXAMPLE))
    assert plain.secagg is None  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="num_shares set without `secure: true`"):
        load_task(write(tmp_path, TRAINING_EXAMPLE.replace("secure: False", "secure: False\n    num_shares: 5")))


def test_custom_plan_reference_resolves_relative_to_the_task_file(tmp_path: Path) -> None:
    text = TRAINING_EXAMPLE.replace("model_ref: logistic_regression", "model_ref: plans/mine.py:MyPlan")
    task = load_task(write(tmp_path, text))
    assert task.plan == "MyPlan" and task.plan_path == str(tmp_path / "plans" / "mine.py")  # type: ignore[union-attr]
