"""The pod service: connects out to the broker, answers discovery, runs tasks, keeps the audit log.

Every inbound message is verified before anything else looks at it; every task goes through
`governance.access.decide` and is written to the audit log with its decision and what was
returned. A bad message is counted and audited, never raised: the pod keeps serving. Tasks
run in worker threads (bounded by `max_concurrent_tasks`) so heartbeats never wait on a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpod import __version__
from fedpod.algorithms.sql.engine import SqlEngine
from fedpod.channel import SecureChannel
from fedpod.data.datasets import round_count
from fedpod.errors import EnvelopeRejected, FedpodError, ResultTooLarge
from fedpod.governance.access import AccessRequest, decide
from fedpod.governance.audit import AuditLog
from fedpod.governance.plans import PlanRegistry
from fedpod.pod.config import PodConfig
from fedpod.security.envelope import Opened
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.bus import Bus
from fedpod.wire.codec import DecodeError, table_to_bytes, unpack
from fedpod.wire.messages import (
    DatasetAdvert,
    Discover,
    Heartbeat,
    PodAdvert,
    TaskFailure,
    TaskRequest,
    TaskResult,
    TrainRequest,
    TrainResult,
)
from fedpod.wire.tensors import digest

REQUESTS: dict[str, type[TaskRequest] | type[TrainRequest]] = {TaskRequest.TYPE: TaskRequest,
                                                                TrainRequest.TYPE: TrainRequest}


def describe_request(request: TaskRequest | TrainRequest) -> dict[str, Any]:
    """What the audit log records about a request."""
    if isinstance(request, TaskRequest):
        query = request.algorithm.query
        return {"mode": request.algorithm.mode, "query": query,
                "query_sha256": hashlib.sha256(query.encode()).hexdigest()}
    plan = request.plan
    return {"experiment": request.experiment_id, "round": request.round, "plan": plan.name, "plan_kind": plan.kind,
            "plan_sha256": hashlib.sha256(plan.source.encode()).hexdigest() if plan.source else None,
            "training_args": request.training_args}


def describe_training(result: TrainResult) -> dict[str, Any]:
    """What the audit log records about a returned model update."""
    return {"returned": "model update", "num_samples": result.num_samples, "metrics": result.metrics,
            "result_sha256": digest(result.tensors), "device": result.device,
            "seconds": round(result.seconds, 4)}


if TYPE_CHECKING:
    from fedpod.pod.training import TrainingRunner

log = logging.getLogger(__name__)


class Pod:
    def __init__(self, config: PodConfig, config_path: Path) -> None:
        self.config = config
        self.base = config_path.parent.resolve()
        self.identity = Identity.load(self._resolve(config.identity))
        storage = self._resolve(config.storage)
        storage.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(storage / "audit.jsonl")
        self.engine: SqlEngine | None = None
        self._trainer: TrainingRunner | None = None
        self._trainer_lock = threading.Lock()
        self.plans = PlanRegistry(storage / "plans")
        self.channel: SecureChannel | None = None
        self.started = time.monotonic()
        self.running_tasks = 0
        self._slots = asyncio.Semaphore(config.max_concurrent_tasks)

    def _resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.base / path

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def advert(self) -> PodAdvert:
        assert self.engine is not None
        datasets = []
        for spec in self.config.datasets:
            columns, rows = self.engine.schemas[spec.name]
            datasets.append(DatasetAdvert(identifier=f"{self.config.name}/{spec.name}", name=spec.name,
                                          tags=spec.tags, kind=spec.kind, columns=columns,
                                          rows_rounded=round_count(rows), description=spec.description))
        return PodAdvert(pod=self.config.name, fingerprint=self.fingerprint, datasets=datasets, version=__version__)

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        self.engine = await asyncio.to_thread(SqlEngine, self.config.datasets, self.base)
        bus = await Bus.connect(self.config.broker.options(self.base), name=f"pod-{self.config.name}",
                                reconnect_forever=True, login=self.identity)
        accepted = {m.fingerprint for m in self.config.access.modellers}
        self.channel = SecureChannel(bus, self.identity, accept_transfers_from=accepted.__contains__)
        self.audit.append("pod-started", pod=self.config.name, fingerprint=self.fingerprint,
                          datasets=[d.name for d in self.config.datasets])
        try:
            await self.channel.listen_inbox(self._on_message, self._on_rejected)
            await self.channel.listen(subjects.DISCOVER, self._on_discover, self._on_rejected)
            if ready is not None:
                ready.set()
            log.info("pod %s (%s) serving %d dataset(s)", self.config.name, self.fingerprint, len(self.config.datasets))
            await self._heartbeats(stop)
        finally:
            self.audit.append("pod-stopped", pod=self.config.name, rejected=dict(self.channel.rejections))
            await bus.close()
            self.engine.close()

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        assert self.channel is not None
        while not stop.is_set():
            beat = Heartbeat(pod=self.config.name, fingerprint=self.fingerprint, ts=time.time(),
                             running_tasks=self.running_tasks, uptime_s=time.monotonic() - self.started)
            with contextlib.suppress(FedpodError):
                await self.channel.broadcast(subjects.heartbeat(self.fingerprint), beat)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.heartbeat_s)

    async def _on_rejected(self, exc: EnvelopeRejected) -> None:
        log.warning("rejected envelope: %s", exc)
        self.audit.append("envelope-rejected", reason=exc.reason, detail=exc.message)

    async def _on_discover(self, opened: Opened) -> None:
        if opened.header.type != Discover.TYPE:
            return
        assert self.channel is not None
        with contextlib.suppress(FedpodError):
            await self.channel.send(opened.sender, self.advert(), timeout_s=5.0)

    async def _on_message(self, opened: Opened) -> None:
        request_type = REQUESTS.get(opened.header.type)
        if request_type is None:
            self.audit.append("message-ignored", sender=opened.sender.fingerprint, type=opened.header.type)
            return
        try:
            request = unpack(opened.payload, request_type)
        except DecodeError as exc:
            self.audit.append("task-malformed", sender=opened.sender.fingerprint, error=str(exc))
            await self._reply(opened, TaskFailure(task_id=opened.header.task or "?", kind="DecodeError",
                                                  message=str(exc)))
            return
        await self._handle_task(opened, request)

    async def _handle_task(self, opened: Opened, request: TaskRequest | TrainRequest) -> None:
        assert self.engine is not None
        sender = opened.sender
        kind = "sql" if isinstance(request, TaskRequest) else "train"
        decision = decide(self.config.access, AccessRequest(sender.name, sender.fingerprint, request.dataset, kind),
                          set(self.engine.datasets))
        self.audit.append("task-received", task=request.task_id, requester=sender.name,
                          requester_fingerprint=sender.fingerprint, dataset=request.dataset, kind=kind,
                          **describe_request(request), decision="allow" if decision.allowed else "deny",
                          reasons=decision.reasons)
        if not decision.allowed:
            await self._reply(opened, TaskFailure(
                task_id=request.task_id, dataset=request.dataset, kind="AccessDenied",
                message=f"{'; '.join(decision.reasons)} [rule: {decision.rule}]",
                hint=f"ask the custodian of pod {self.config.name} to accept fingerprint {sender.fingerprint}"))
            return
        async with self._slots:
            self.running_tasks += 1
            try:
                outcome = await asyncio.to_thread(self._execute, request, sender.fingerprint)
            except Exception as exc:  # a task never kills the pod, and its requester always hears back
                if not isinstance(exc, FedpodError):
                    log.exception("task %s failed unexpectedly", request.task_id)
                message = exc.message if isinstance(exc, FedpodError) else str(exc)
                hint = exc.hint if isinstance(exc, FedpodError) else "see the pod's log"
                self.audit.append("task-failed", task=request.task_id, dataset=request.dataset,
                                  error=type(exc).__name__, message=message)
                await self._reply(opened, TaskFailure(task_id=request.task_id, dataset=request.dataset,
                                                      kind=type(exc).__name__, message=message, hint=hint))
                return
            finally:
                self.running_tasks -= 1
        result, returned = outcome
        self.audit.append("task-completed", task=request.task_id, dataset=request.dataset, **returned)
        await self._reply(opened, result)

    def _execute(self, request: TaskRequest | TrainRequest,
                 requester: str) -> tuple[TaskResult | TrainResult, dict[str, Any]]:
        """Run a task in a worker thread; returns the reply to send and what the audit log
        records about it (described from the result in hand, never decoded again)."""
        assert self.engine is not None
        if isinstance(request, TrainRequest):
            trained = self.trainer().run(request, requester)
            return trained, describe_training(trained)
        started = time.perf_counter()
        table = self.engine.run(request.algorithm.query, request.dataset, timeout_s=self.config.sql_timeout_s,
                                max_rows=self.config.max_result_rows)
        payload = table_to_bytes(table)
        if len(payload) > self.config.max_result_bytes:
            raise ResultTooLarge(f"the result is {len(payload):,} bytes, over this pod's max_result_bytes "
                                 f"({self.config.max_result_bytes:,})", where=f"dataset {request.dataset}",
                                 hint="select fewer columns or rows, or aggregate")
        seconds = time.perf_counter() - started
        returned = {"returned_rows": table.num_rows, "returned_columns": table.column_names,
                    "result_sha256": hashlib.sha256(payload).hexdigest(), "seconds": round(seconds, 4)}
        return TaskResult(task_id=request.task_id, dataset=request.dataset, table=payload, seconds=seconds), returned

    def trainer(self) -> TrainingRunner:
        """Built on the first training task: PyTorch and scikit-learn take seconds to import,
        which a pod that only answers SQL should not pay at start-up."""
        with self._trainer_lock:
            if self._trainer is None:
                from fedpod.pod.training import TrainingRunner

                assert self.engine is not None
                self._trainer = TrainingRunner(self.engine, {d.name: d for d in self.config.datasets}, self.base,
                                               self.plans, self.config.device, self.config.name,
                                               self._resolve(self.config.storage) / "training-state")
            return self._trainer

    async def _reply(self, opened: Opened, message: TaskResult | TrainResult | TaskFailure) -> None:
        """Deliver a reply, retrying twice with backoff: a modeller that was briefly disconnected
        (broker restart, slow-consumer cut) still gets a result that took long to compute."""
        assert self.channel is not None
        for attempt in range(3):
            try:
                await self.channel.send(opened.sender, message, task_id=message.task_id)
                return
            except FedpodError as exc:
                if attempt == 2:
                    self.audit.append("reply-undelivered", task=message.task_id, to=opened.sender.fingerprint,
                                      error=str(exc))
                    return
                await asyncio.sleep(1.0 * 2**attempt)


async def serve(config_path: Path, stop: asyncio.Event | None = None) -> None:
    """Run a pod until `stop` is set (or SIGINT/SIGTERM when run from the CLI)."""
    pod = Pod(PodConfig.load(config_path), config_path)
    await pod.run(stop or asyncio.Event())
