"""Where a pod trains: PyTorch plans follow the pod's `device` setting (`auto`: CUDA when the
machine has it); other plans run on the CPU. CI has no GPU, so CUDA's presence is simulated
by torch's own query; a run on a CUDA machine is recorded in the issue notes."""

from __future__ import annotations

import pytest
import torch

from fedpod.algorithms.training.registry import builtin_plan
from fedpod.pod.training import resolve_device
from fedpod.training import TrainingPlan


@pytest.mark.parametrize(("setting", "cuda", "expected"), [
    ("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cuda", True, "cuda")])
def test_a_torch_plan_follows_the_setting(monkeypatch: pytest.MonkeyPatch, setting: str, cuda: bool,
                                          expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(setting, builtin_plan("mlp")()) == expected


def test_other_plans_train_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", builtin_plan("sgd_classifier")()) == "cpu"
    assert resolve_device("auto", TrainingPlan()) == "cpu"
