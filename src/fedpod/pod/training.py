"""The pod's side of federated training: build the plan, inject the dataset, run one round.

Runs in a worker thread (the pod's event loop keeps its heartbeats). Built-in plans need no
approval; a custom plan's source is compiled only if its SHA-256 was approved on this pod.
Per-experiment state that a method keeps at the pod (Scaffold's own control variate) lives
in memory for the pod's lifetime.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpod.aggregation.base import Params
from fedpod.aggregation.secure.fixedpoint import flat_update
from fedpod.algorithms.sql.engine import SqlEngine
from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.local import run_evaluation, run_local_round
from fedpod.algorithms.training.plans import DatasetHandle, TrainingPlan
from fedpod.algorithms.training.privacy import Mechanism, PrivacyRound, Spent
from fedpod.data.datasets import DatasetSpec, quote_identifier
from fedpod.errors import ConfigError, FedpodError, PlanNotApproved
from fedpod.governance.plans import PlanRegistry
from fedpod.governance.privacy_budget import Budget, PrivacyLedger
from fedpod.security.digest import bulk_digest
from fedpod.wire.messages import CONFIG_PREFIX, EXTRA_PREFIX, MASKED, TrainRequest, TrainResult
from fedpod.wire.tensors import decode_groups, encode_parts, write_tensors

if TYPE_CHECKING:
    from fedpod.governance.policy import DatasetPolicy
    from fedpod.pod.secure_aggregation import SecAggSessions

Masker = Callable[[np.ndarray, int], tuple[np.ndarray, int]]  # (flat update, samples) -> (masked, clipped)
REMEMBERED_PLANS = 32  # approved plans kept compiled (`TrainingRunner.plan_class`)


def resolve_device(setting: str, plan: TrainingPlan) -> str:
    """Where `plan` trains: for a PyTorch plan, the `device` setting, `auto` picking CUDA when
    this machine has it; anything else runs on the CPU. A plan that is not PyTorch never
    makes the pod import torch (it would cost every pod some 200 MB)."""
    torch_plan = sys.modules.get("fedpod.algorithms.training.torch_plan")
    if torch_plan is None or not isinstance(plan, torch_plan.TorchTrainingPlan):
        return "cpu"
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TrainingRunner:
    """Runs training rounds for one pod. What a pod must remember between the rounds of an
    experiment (Scaffold's own control variate) is kept in `state_dir` as safetensors, so a
    pod that restarts mid-experiment goes on where it was instead of from zero."""

    def __init__(self, engine: SqlEngine, datasets: dict[str, DatasetSpec], base: Path, plans: PlanRegistry,
                 device: str, pod_name: str, state_dir: Path, config_path: Path) -> None:
        self.config_path = config_path
        self.engine = engine
        self.datasets = datasets
        self.base = base
        self.plans = plans
        self.device_setting = device
        self.pod_name = pod_name
        self.state_dir = state_dir
        self._state: dict[tuple[str, str, str], dict[str, Params]] = {}  # (modeller, experiment, dataset)
        self._lock = threading.Lock()
        # approved plans as classes, by (source hash, class name): compiling and running the source
        # again every round was 8% of a pod's round (10 pods, a small model); whether the plan is
        # still approved is read from the registry every round all the same
        self._plan_classes: dict[tuple[str, str], type[TrainingPlan]] = {}

    def _state_file(self, key: tuple[str, str, str]) -> Path:
        # The ids come from the modeller: hashed, never used as a path.
        return self.state_dir / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:32]}.safetensors"

    def _load_state(self, key: tuple[str, str, str]) -> dict[str, Params]:
        path = self._state_file(key)
        return decode_groups(path.read_bytes()) if path.exists() else {}

    def _save_state(self, key: tuple[str, str, str], state: dict[str, Params]) -> None:
        write_tensors(self._state_file(key), encode_parts(state))  # a pod killed while writing keeps the last

    def plan_class(self, request: TrainRequest, requester: str) -> tuple[type[TrainingPlan], str | None]:
        spec = request.plan
        if spec.kind == "builtin":
            from fedpod.algorithms.training.registry import builtin_plan  # torch and sklearn load only for them

            return builtin_plan(spec.name), None
        if not spec.source:
            raise PlanNotApproved("custom plan without source")
        sha, status = self.plans.submit(spec.source, spec.name, requester)
        if status != "approved":
            state = "rejected" if status == "rejected" else "awaiting approval"
            raise PlanNotApproved(f"training plan {spec.name} is {state} on pod {self.pod_name} (hash {sha})",
                                  hint=f"the custodian of pod {self.pod_name} runs `fedpod plan approve {sha[:12]} "
                                       f"--config {self.config_path}` (after `fedpod plan show {sha[:12]}`)")
        with self._lock:
            known = self._plan_classes.get((sha, spec.name))
        if known is not None:
            return known, sha
        namespace: dict[str, Any] = {"__name__": f"fedpod_plan_{sha[:12]}"}
        exec(compile(spec.source, f"<training plan {sha[:12]}>", "exec"), namespace)  # approved source only
        plan_class = namespace.get(spec.name)
        if not (isinstance(plan_class, type) and issubclass(plan_class, TrainingPlan)):
            raise FedpodError(f"approved source defines no TrainingPlan named {spec.name}")
        with self._lock:
            if len(self._plan_classes) >= REMEMBERED_PLANS:
                self._plan_classes.pop(next(iter(self._plan_classes)))
            self._plan_classes[(sha, spec.name)] = plan_class
        return plan_class, sha

    def dataset_handle(self, name: str, released: list[str] | None = None) -> DatasetHandle:
        """The dataset as a plan sees it: only the `released` columns (the policy's column
        rules), when given."""
        def loader(table: str) -> tuple[dict[str, str], Callable[[], Any]]:
            schema, _ = self.engine.catalog.schemas[table]
            columns = {c: t for c, t in schema.items() if released is None or c in released}
            selected = ", ".join(quote_identifier(c) for c in columns) or "*"
            return columns, lambda: self.engine.run(f"SELECT {selected} FROM {quote_identifier(table)}",
                                                    name).to_pandas()

        columns, load = loader(name)
        static = self.datasets[name].static_table
        return DatasetHandle(name, columns, load, loader(static)[1] if static else None)

    def run(self, request: TrainRequest, requester: str, phase: Callable[[str], None] = lambda _: None,
            released: list[str] | None = None, masker: Masker | None = None,
            privacy: PrivacyRound | None = None, min_rows: int = 1) -> TrainResult:
        """`phase` hears "preparing" (imports, plan and data: the first round pays PyTorch's
        import) and then "training". `released`: the columns the policy lets the plan read.
        `min_rows`: the dataset's `min_group_size`, the fewest rows a model update or a test
        metric may come from (`algorithms.training.local.split`).
        `masker`: under secure aggregation, turns the flat update (new minus global parameters,
        in name order) and the sample count into the masked vector, the only thing sent.
        `privacy`: how the pod privatises a round with `dp_args` (`algorithms.training.privacy`)."""
        started = time.perf_counter()
        phase("preparing")
        plan_class, _ = self.plan_class(request, requester)
        args = TrainingArgs.parse(request.training_args)
        plan = plan_class()
        spec = self.datasets[request.dataset]
        plan.dataset = self.dataset_handle(request.dataset, released)
        plan.dataset_path = spec.resolved_path(self.base) if spec.path else None
        plan.post_init(dict(request.model_args), args)
        groups = decode_groups(request.tensors, movable=True)  # the received model is this round's alone
        round_config = dict(request.round_config)
        for group, arrays in groups.items():
            if group.startswith(CONFIG_PREFIX):
                round_config[group[len(CONFIG_PREFIX):]] = arrays
        key = (requester, request.experiment_id, request.dataset)
        with self._lock:
            state = self._state.get(key)
            if state is None:
                state = self._state[key] = self._load_state(key)
        device = resolve_device(self.device_setting, plan)
        phase("evaluating" if request.evaluate_only else "training")
        if request.evaluate_only:  # the scores alone go back: the model is the modeller's own
            result = run_evaluation(plan, groups.get("params", {}), args, min_rows)
            tensors, samples, metrics = [], result.num_samples, result.metrics
        else:
            # the received model becomes the plan's, unless secure aggregation needs it after training
            result = run_local_round(plan, groups.get("params", {}), args, round_config, device=device, state=state,
                                     privacy=privacy, hand_over=request.secagg is None, min_rows=min_rows)
            if state:
                self._save_state(key, state)
            if request.secagg is None:
                tensors = encode_parts({"params": result.params,
                                         **{f"{EXTRA_PREFIX}{k}": v for k, v in result.extra.items()}})
                samples, metrics = result.num_samples, result.metrics
            else:
                if masker is None or result.extra:
                    raise ConfigError("secure aggregation carries the model update only (no aggregator extras)")
                masked, clipped = masker(flat_update(result.params, groups.get("params", {})), result.num_samples)
                tensors, samples = encode_parts({MASKED: {"y": masked}}), 0
                metrics = result.metrics | {"secagg_clipped": float(clipped)}
        return TrainResult(task_id=request.task_id, round=request.round, dataset=request.dataset, num_samples=samples,
                           metrics=metrics, seconds=time.perf_counter() - started, device=device, tensors=tensors,
                           feature_layout=result.feature_layout)


def describe_training(result: TrainResult) -> dict[str, Any]:
    """What the audit log records about a returned model update, or an evaluation's scores."""
    return {"returned": "model update" if result.tensors else "scores", "num_samples": result.num_samples,
            "metrics": result.metrics,
            "result_blake3": bulk_digest(result.tensors).hex(), "device": result.device,
            "seconds": round(result.seconds, 4)}


def privacy_round(request: TrainRequest, requester: str, name: str, limits: DatasetPolicy,
                  secagg: Callable[[], SecAggSessions], ledger: Callable[[], PrivacyLedger]) -> PrivacyRound | None:
    """How this pod privatises a round with `dp_args`, and the ledger it charges (as `name`). Under
    secure aggregation the pod adds its share of the aggregate's noise, and counts on no more than
    the threshold's shares being summed; without it, all of the noise."""
    dp = TrainingArgs.parse(request.training_args).dp_args
    if dp is None or request.evaluate_only:
        return None
    shares, threshold = (1, 1) if request.secagg is None else secagg().noise_shares(request.secagg, requester)
    budget = Budget.of(limits)

    def charge(mechanism: Mechanism, delta: float) -> Spent:
        return ledger().charge(dataset=request.dataset, modeller=requester, name=name,
                               experiment=request.experiment_id, budget=budget, delta=delta, mechanism=mechanism)

    return PrivacyRound(dp, shares, threshold, charge)
