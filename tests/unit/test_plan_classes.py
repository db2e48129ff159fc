"""A pod compiles an approved plan's source once, and still asks its registry every round."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpod.algorithms.sql.engine import SqlEngine
from fedpod.errors import PlanNotApproved
from fedpod.governance.plans import PlanRegistry
from fedpod.pod.training import TrainingRunner
from fedpod.wire.messages import PlanSpec, TrainRequest

SOURCE = '''
from fedpod.algorithms.training.plans import TrainingPlan


class Counted(TrainingPlan):
    pass
'''


def request(round_number: int) -> TrainRequest:
    return TrainRequest(task_id=f"t{round_number}", experiment_id="e", round=round_number, dataset="data",
                        plan=PlanSpec(kind="custom", name="Counted", source=SOURCE), tensors=[])


def test_an_approved_plan_is_compiled_once_and_its_approval_read_every_round(tmp_path: Path) -> None:
    registry = PlanRegistry(tmp_path / "plans")
    engine = SqlEngine([], tmp_path)
    runner = TrainingRunner(engine, {}, tmp_path, registry, "cpu", "alice", tmp_path / "state", tmp_path / "pod.yaml")
    with pytest.raises(PlanNotApproved, match="awaiting approval"):
        runner.plan_class(request(0), "modeller")
    sha, _ = registry.submit(SOURCE, "Counted", "modeller")
    registry.decide(sha, "approved")
    first, _ = runner.plan_class(request(1), "modeller")
    second, _ = runner.plan_class(request(2), "modeller")
    assert first is second  # running the source again would have made a new class
    assert first.__module__ == f"fedpod_plan_{sha[:12]}"
    registry.decide(sha, "rejected")  # the custodian changes their mind: the next round is refused
    with pytest.raises(PlanNotApproved, match="rejected"):
        runner.plan_class(request(3), "modeller")
    engine.close()
