"""Turning a modeller's training plan into what travels to pods: a built-in name, or source.

A custom plan class travels as source (its module's text when it comes from a file, or the
class's own text behind a fixed header of imports plus its `init_dependencies()`), so that
its SHA-256 is stable and a custodian approves exactly what will run.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

from fedpod.algorithms.training.plans import TrainingPlan
from fedpod.errors import ConfigError
from fedpod.wire.messages import PlanSpec

SOURCE_ATTRIBUTE = "__fedpod_source__"
HEADER = """import numpy as np
import pandas as pd
import torch
from fedpod.training import DataManager, SKLearnTrainingPlan, TorchTrainingPlan
"""


def plan_spec(plan_class: type[TrainingPlan] | str,
              plan_path: Path | None = None) -> tuple[PlanSpec, type[TrainingPlan]]:
    # The built-ins need PyTorch and scikit-learn: import them only when a built-in is asked for.
    if isinstance(plan_class, str) and plan_path is None:
        from fedpod.algorithms.training.registry import builtin_plan

        return PlanSpec(kind="builtin", name=plan_class.lower()), builtin_plan(plan_class)
    if isinstance(plan_class, str):
        source = plan_path.read_text() if plan_path and plan_path.exists() else None
        if source is None:
            raise ConfigError(f"training_plan_path {plan_path} does not exist")
        return PlanSpec(kind="custom", name=plan_class, source=source), load_plan_class(source, plan_class)
    if plan_class.__module__ == "fedpod.algorithms.training.builtin":
        from fedpod.algorithms.training.registry import BUILTIN_PLANS

        name = next((name for name, cls in BUILTIN_PLANS.items() if cls is plan_class), None)
        if name is not None:
            return PlanSpec(kind="builtin", name=name), plan_class
    kept = plan_class.__dict__.get(SOURCE_ATTRIBUTE)
    if isinstance(kept, str):  # rebuilt from source (a breakpoint): no file to read it from, and no need
        return PlanSpec(kind="custom", name=plan_class.__name__, source=kept), plan_class
    try:
        body = inspect.getsource(plan_class)
    except (OSError, TypeError) as exc:
        raise ConfigError(f"cannot read the source of {plan_class.__name__}",
                          hint="define it in a file and pass training_plan_path") from exc
    dependencies = "\n".join(plan_class().init_dependencies())
    source = f"{HEADER}{dependencies}\n\n{inspect.cleandoc(body) if body.startswith(' ') else body}"
    return PlanSpec(kind="custom", name=plan_class.__name__, source=source), plan_class


def load_plan_class(source: str, name: str) -> type[TrainingPlan]:
    """Load a plan class from source at the modeller (its own code, e.g. from a breakpoint)."""
    spec = importlib.util.spec_from_loader(f"fedpod_modeller_plan_{name}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"<training plan {name}>", "exec"), module.__dict__)
    plan_class = getattr(module, name, None)
    if not (isinstance(plan_class, type) and issubclass(plan_class, TrainingPlan)):
        raise ConfigError(f"the training plan source defines no TrainingPlan named {name}")
    setattr(plan_class, SOURCE_ATTRIBUTE, source)  # the exact text, so that its hash (its approval) holds
    return plan_class
