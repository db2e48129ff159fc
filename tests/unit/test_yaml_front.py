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


def test_secure_aggregation_is_a_clear_error_not_ignored(tmp_path: Path) -> None:
    text = BITFOUNT_EXAMPLE.replace("  data_structure:", "  aggregator: {secure: true}\n  data_structure:")
    with pytest.raises(ConfigError, match="secure aggregation"):
        load_task(write(tmp_path, text))


def test_unknown_protocol_lists_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="supported: ResultsOnly"):
        load_task(write(tmp_path, BITFOUNT_EXAMPLE.replace("bitfount.ResultsOnly", "bitfount.Nope")))


def test_results_can_only_be_saved_at_the_modeller(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="save_location"):
        load_task(write(tmp_path, BITFOUNT_EXAMPLE.replace('["Modeller"]', '["Worker"]')))


def test_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid task file"):
        load_task(write(tmp_path, BITFOUNT_EXAMPLE + "\nextra: 1\n"))
