"""The TanaT tutorial reproduced (issue 9, item 6): examples/journeys/run.py end to end, as a
user runs it — stage A on one centre, stage B over three pods as processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).parents[2] / "examples" / "journeys" / "run.py"


def test_the_journeys_tutorial_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path / "out"), "--patients", "1200"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    said = result.stdout
    assert "tensor (400, 8, 30) (patients x time bins x codes)" in said and "epoch 4: loss" in said
    assert "vocabulary agreed over the three pods: 30 codes" in said and "round 5: mean loss" in said
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["stage_b"]["per_centre_auc"]) == {"alice", "bob", "charlie"}
    assert summary["stage_b"]["holdout_auc"]["federated"] > 0.6
    assert (tmp_path / "out" / "losses.png").stat().st_size > 10_000
