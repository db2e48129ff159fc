"""An experiment's metrics.csv grows by each round's rows, and takes a metric first reported late."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedpod.modeller.results import append_metrics


def test_rounds_are_appended_and_a_new_metric_rewrites_the_file_once(tmp_path: Path) -> None:
    replies: dict[int, dict[str, dict[str, object]]] = {}
    for round_number in range(3):
        replies[round_number] = {"alice": {"num_samples": 10, "loss": 0.5}, "bob": {"error": "lost"}}
        append_metrics(tmp_path, round_number, replies[round_number], lambda: replies)
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 1 + 6
    replies[3] = {"alice": {"num_samples": 10, "loss": 0.4, "global_auc": 0.8}, "bob": {"num_samples": 5}}
    append_metrics(tmp_path, 3, replies[3], lambda: replies)
    frame = pd.read_csv(tmp_path / "metrics.csv")
    assert list(frame.columns) == ["round", "pod", "num_samples", "loss", "error", "global_auc"]
    assert frame["round"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert frame["global_auc"].isna().sum() == 7 and frame.loc[6, "global_auc"] == 0.8
