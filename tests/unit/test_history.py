"""An experiment's rounds: all of them on disk, only the latest in memory, a torn last line skipped."""

from __future__ import annotations

from pathlib import Path

from fedpod.modeller.history import FILE_NAME, RoundHistory, RoundRecord, read_rounds


def record(number: int) -> RoundRecord:
    return RoundRecord(number, 0.5 + number, {"alice": {"num_samples": 10, "loss": 1.0 / (number + 1)},
                                              "bob": {"dataset": "", "error": "lost"}},
                       {"alice": [("waiting", 0.0), ("done", 0.25)], "bob": [("waiting", 0.0), ("failed", 6.0)]})


def test_every_round_is_answered_from_the_file_once_memory_holds_only_the_latest(tmp_path: Path) -> None:
    history = RoundHistory(tmp_path, kept=2)
    for number in range(5):
        history.add(record(number))
    assert history.records() == [record(n) for n in range(5)]
    assert history.latest() == record(4)
    (tmp_path / FILE_NAME).unlink()
    assert history.records() == []  # the five rounds were not held in memory


def test_a_short_experiment_is_answered_from_memory(tmp_path: Path) -> None:
    history = RoundHistory(tmp_path, kept=10)
    for number in range(3):
        history.add(record(number))
    (tmp_path / FILE_NAME).unlink()
    assert history.replies() == {n: record(n).replies for n in range(3)}


def test_a_line_cut_short_by_a_killed_modeller_is_not_a_round(tmp_path: Path) -> None:
    history = RoundHistory(tmp_path)
    for number in range(2):
        history.add(record(number))
    with (tmp_path / FILE_NAME).open("a") as out:
        out.write(record(2).line()[:40])
    assert [r.number for r in read_rounds(tmp_path)] == [0, 1]


def test_a_new_experiment_in_a_used_folder_starts_a_new_record_and_a_resumed_one_keeps_its_rounds(
        tmp_path: Path) -> None:
    first = RoundHistory(tmp_path)
    for number in range(3):
        first.add(record(number))
    again = RoundHistory(tmp_path)
    again.add(record(0))
    assert [r.number for r in read_rounds(tmp_path)] == [0]
    resumed = RoundHistory(tmp_path)
    resumed.restore(read_rounds(tmp_path))
    resumed.add(record(1))
    assert read_rounds(tmp_path) == [record(0), record(1)]
