"""A pod's memory is mostly its imports: `fedpod pod start` and an array-only plan must not pull
in the modeller's or the frameworks' libraries (10 pods went from 4.9 to 1.7 GiB this way), and an
idle pod holds no SQL machinery — DuckDB, sqlglot, numpy, pyarrow — until its first task (an idle
pod went from ~130 to ~57 MiB: benchmarks/pods), nor the rest of the command line (rich, the
custodian's commands: ~3 MiB more)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "sklearn", "pandas", "pyarrow", "matplotlib"]
TASK_ONLY = ["duckdb", "sqlglot", "numpy"]


def loaded_after(statement: str, watched: list[str] = HEAVY) -> list[str]:
    probe = f"import sys\n{statement}\nprint(__import__('json').dumps([m for m in {watched!r} if m in sys.modules]))"
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return list(json.loads(output.strip().splitlines()[-1]))


def test_the_pod_command_and_runtime_load_no_heavy_library() -> None:
    assert loaded_after("import fedpod.cli.app, fedpod.pod.service, fedpod.pod.training, fedpod.wire.tensors") == []


def test_an_idle_pod_loads_no_sql_machinery() -> None:
    assert loaded_after("import fedpod.cli.app, fedpod.pod.service", HEAVY + TASK_ONLY) == []


def test_the_pod_start_command_loads_no_other_command() -> None:
    statement = "import fedpod.cli.entry, fedpod.cli.pod_start, fedpod.pod.service"
    assert loaded_after(statement, ["rich", "fedpod.cli.app", "fedpod.cli.governance"]) == []


def test_an_array_only_plan_loads_no_framework() -> None:
    statement = ("from fedpod.training import DataManager, TrainingPlan\n"
                 "import numpy as np\n"
                 "DataManager(np.zeros((2, 2)), np.zeros(2)).arrays()")
    assert loaded_after(statement) == []


def test_framework_bases_still_load_on_demand() -> None:
    assert "torch" in loaded_after("from fedpod.training import TorchTrainingPlan")
    assert "sklearn" in loaded_after("from fedpod.training import SKLearnTrainingPlan")


def test_a_pod_set_to_auto_device_resolves_a_non_torch_plan_without_torch() -> None:
    statement = ("from fedpod.pod.training import resolve_device\n"
                 "from fedpod.training import TrainingPlan\n"
                 "assert resolve_device('auto', TrainingPlan()) == 'cpu'\n"
                 "from fedpod.algorithms.training.local import seed_everything\n"
                 "seed_everything(7)")
    assert loaded_after(statement) == []
