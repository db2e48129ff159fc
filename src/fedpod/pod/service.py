"""The pod service: connects out to the broker, answers discovery, runs tasks, keeps the audit log.

Every inbound message is verified before anything else looks at it; every task goes through
`governance.policy.decide` and is written to the audit log with its decision and what was
returned. A task the policy does not cover opens an access request (`governance.requests`)
whose id the refusal names, so the custodian can grant exactly that. What strangers send
(bad envelopes, tasks from keys nobody knows) is counted and summarised in the audit log once
per window (`governance.rejections`), never written one entry per message and never raised:
the pod keeps serving. Audit writes happen in a writer
thread, so a burst of them never stalls the event loop. Tasks run in worker threads (bounded
by `max_concurrent_tasks`) so heartbeats never wait on a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fedpod import __version__
from fedpod.channel import Letter, SecureChannel
from fedpod.data.catalog import Catalog, read_catalog
from fedpod.data.datasets import round_count
from fedpod.errors import CastMissing, EnvelopeRejected, FedpodError, PlanNotApproved
from fedpod.governance.audit import AuditLog, AuditWriter
from fedpod.governance.plans import PlanRegistry
from fedpod.governance.policy import CUSTOM_PLAN, DatasetPolicy, Decision, Request, decide
from fedpod.governance.policy_log import record_policy
from fedpod.governance.rejections import RejectionTally, truncated
from fedpod.governance.requests import AccessRequests
from fedpod.pod.casts import ModelCasts
from fedpod.pod.config import PodConfig
from fedpod.pod.memory_cap import duckdb_limit
from fedpod.pod.status import PID_FILE, mark_running
from fedpod.security.envelope import Opened
from fedpod.security.identity import Identity, PublicIdentity
from fedpod.security.replay import DurableReplayGuard
from fedpod.transport import subjects
from fedpod.transport.bus import Bus
from fedpod.wire.codec import DecodeError, unpack
from fedpod.wire.messages import (
    AccessRequestState,
    AccessStatus,
    AccessStatusQuery,
    DatasetAdvert,
    Discover,
    Heartbeat,
    ModelCast,
    PodAdvert,
    QuantileCountsAlgorithm,
    SecAggReply,
    SecAggRequest,
    SqlQueryAlgorithm,
    TaskFailure,
    TaskRequest,
    TaskResult,
    TrainRequest,
    TrainResult,
)

REQUESTS: dict[str, type[TaskRequest] | type[TrainRequest]] = {TaskRequest.TYPE: TaskRequest,
                                                                TrainRequest.TYPE: TrainRequest}


def describe_request(request: TaskRequest | TrainRequest, *, denied: bool = False) -> dict[str, Any]:
    """What the audit log records about a request. A denied request's text was chosen by
    someone the pod does not trust: only its hash and first characters are kept."""
    if isinstance(request, TaskRequest):
        algorithm = request.algorithm
        query = algorithm.query
        described: dict[str, Any] = {"mode": algorithm.mode} if isinstance(algorithm, SqlQueryAlgorithm) else {
            "mode": "quantile-step", "thresholds": sum(len(t) for t in algorithm.thresholds)} \
            if isinstance(algorithm, QuantileCountsAlgorithm) else {"mode": "noisy", "epsilon": algorithm.epsilon}
        if request.secagg is not None:
            described["secure_aggregation"] = True
        return {**described, "query": truncated(query) if denied else query,
                "query_sha256": hashlib.sha256(query.encode()).hexdigest()}
    plan = request.plan
    arguments = json.dumps(request.training_args, sort_keys=True, default=str)
    return {"experiment": request.experiment_id[:128], "round": request.round, "plan": plan.name[:128],
            "plan_kind": plan.kind, "plan_sha256": hashlib.sha256(plan.source.encode()).hexdigest() if plan.source
            else None, "training_args": truncated(arguments) if denied else request.training_args}


def what_left(returned: dict[str, Any]) -> str:
    """The console's words for what a completed task sent back (its audit entry has the hashes)."""
    if "returned_rows" in returned:
        return f"{returned['returned_rows']:,} row(s) of {', '.join(returned['returned_columns'])[:200]}"
    what = "scores" if returned["returned"] == "scores" else "a model update"
    return f"{what} from {returned['num_samples']:,} samples"


if TYPE_CHECKING:
    from fedpod.algorithms.sql.engine import SqlEngine
    from fedpod.governance.privacy_budget import PrivacyLedger
    from fedpod.pod.secure_aggregation import SecAggSessions
    from fedpod.pod.sql_tasks import SqlTasks
    from fedpod.pod.training import TrainingRunner

T = TypeVar("T")

log = logging.getLogger(__name__)
MIN_BEAT_GAP_S = 0.25
RATE_WINDOW_S = 3600.0
REQUESTABLE_RULES = ("modeller", "grants", "expires")  # refusals a custodian can lift by granting


class Lazy(Generic[T]):
    """Built once, on first use, by whichever thread asks first: what a pod holds only once it
    has work of that kind (an idle pod is mostly its imports)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value

    @property
    def built(self) -> T | None:
        return self._value


class Pod:
    def __init__(self, config: PodConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path.resolve()
        self.base = self.config_path.parent
        self.identity = Identity.load(self._resolve(config.identity))
        storage = self._resolve(config.storage)
        storage.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(storage / "audit.jsonl")
        self.journal: AuditWriter | None = None
        self.tally = RejectionTally(time.monotonic())
        self.catalog: Catalog | None = None  # what the datasets hold, read at start
        self.plans = PlanRegistry(storage / "plans")
        self.requests = AccessRequests(storage / "access-requests.json")
        self.engine = Lazy(self._load_engine)
        self.secagg = Lazy(self._secagg_sessions)
        self.privacy = Lazy(self._privacy_ledger)
        self.sql = Lazy(self._sql_tasks)
        self.trainer = Lazy(self._training_runner)
        self.casts = ModelCasts()
        self._recent: dict[tuple[str, str], deque[float]] = {}  # (modeller, dataset) -> its allowed tasks' times
        self.channel: SecureChannel | None = None
        self.started = time.monotonic()
        self.running_tasks = 0
        self._modeller_keys: dict[str, PublicIdentity] = {}  # accepted modellers seen: heartbeats are sealed for them
        self._pinged = asyncio.Event()  # a discovery ping or a task's new phase: beat soon
        self._discovery_ping = False  # ...and beat even if the phases are those the last beat told
        self._config_mtime = self._config_changed_at()
        # task id -> what is being done with it (told in heartbeats), and since when the pod holds it
        self._phases: dict[str, tuple[str, float]] = {}
        self._unacknowledged: set[str] = set()  # tasks whose modeller has not yet heard that they arrived
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(config.max_concurrent_tasks)

    def _resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.base / path

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def advert(self, requester: PublicIdentity | None = None) -> PodAdvert:
        """What discovery tells `requester`: everything if the pod accepts it (or `discovery:
        open`); otherwise a notice that it is not accepted, with the datasets' names only under
        `discovery: names` — schemas and row counts are for accepted modellers."""
        catalog = self._catalog
        full = requester is None or self.config.discovery == "open" or self._accepts(requester.fingerprint)
        datasets = []
        for spec in self.config.datasets:
            identifier = f"{self.config.name}/{spec.name}"
            if full:
                columns, rows = catalog.schemas[spec.name]
                datasets.append(DatasetAdvert(identifier=identifier, name=spec.name, tags=spec.tags, kind=spec.kind,
                                              columns=columns, rows_rounded=round_count(rows),
                                              description=spec.description,
                                              tables={t: catalog.schemas[t][0] for t in spec.tables[1:]}))
            elif self.config.discovery == "names":
                datasets.append(DatasetAdvert(identifier=identifier, name=spec.name))
        notice = None if full else (f"modeller {requester.name!r} ({requester.fingerprint}) is not in pod "
                                    f"{self.config.name}'s accepted modellers") if requester else None
        return PodAdvert(pod=self.config.name, fingerprint=self.fingerprint, datasets=datasets, version=__version__,
                         heartbeat_s=self.config.heartbeat_s, notice=notice)

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.catalog = await asyncio.to_thread(read_catalog, self.config.datasets, self.base)
        bus = await Bus.connect(self.config.broker.options(self.base), name=f"pod-{self.config.name}",
                                reconnect_forever=True, login=self.identity)
        guard = DurableReplayGuard(self._resolve(self.config.storage) / "replay-nonces.bin", self._accepts)
        self.channel = SecureChannel(bus, self.identity, accept_transfers_from=self._accepts, guard=guard)
        self.journal = AuditWriter(self.audit, self.identity)
        pid_file = self._resolve(self.config.storage) / PID_FILE
        await self.journal.record_durably("pod-started", pod=self.config.name, fingerprint=self.fingerprint,
                                          datasets=[d.name for d in self.config.datasets])
        self._record_policy()
        self.journal.checkpoint()
        try:
            await self.channel.listen_inbox(self._on_message, self._on_rejected)
            await bus.subscribe(subjects.DISCOVER, self._on_ping)
            mark_running(self._resolve(self.config.storage))  # serving: `fedpod pod status --wait` returns
            if ready is not None:
                ready.set()
            log.info("pod %s (%s) serving %d dataset(s)", self.config.name, self.fingerprint, len(self.config.datasets))
            await self._heartbeats(stop)
        finally:
            await bus.close()
            self._summarise_rejections(force=True)
            self.journal.record("pod-stopped", pod=self.config.name, rejected=dict(self.tally.total),
                                ignored_chunks=bus.ignored_chunks, resends=bus.resends)
            self.journal.checkpoint()
            self.journal.close()
            guard.close()
            pid_file.unlink(missing_ok=True)
            if (engine := self.engine.built) is not None:
                engine.close()

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        """Heartbeats, and on the same clock the minute's rejection summary and the audit checkpoint.

        A heartbeat is sealed for the accepted modellers this pod has heard from (only they
        learn its name, load and uptime) and shows the pod's public keys, so that any modeller
        can address a sealed discovery request to it. A discovery ping brings the next beat
        forward — at most one every MIN_BEAT_GAP_S, whoever pings. So does a task's change of
        phase, but only for tasks held at least MIN_BEAT_GAP_S, and only if their phases differ
        from what the last beat told: a quick task tells its modeller by its reply. A task is
        told only once acknowledged (a task done within MIN_BEAT_GAP_S answers on that
        acknowledgement): a modeller that hears a task's phase has heard it arrive. Each beat
        costs the modeller a signature check and a key exchange; at 100 pods, a beat per pod per
        round took a fifth of the modeller's event loop (py-spy)."""
        assert self.channel is not None
        checkpointed = time.monotonic()
        told: dict[str, str] | None = None  # the lasting tasks' phases the last beat told
        beaten = float("-inf")
        while not stop.is_set():
            if time.monotonic() - checkpointed >= self.config.audit_checkpoint_s:
                self._journal.checkpoint()
                checkpointed = time.monotonic()
            now = time.monotonic()
            held = {task: value for task, value in list(self._phases.items()) if task not in self._unacknowledged}
            phases = {task: phase for task, (phase, _) in held.items()}
            lasting = {task: phase for task, (phase, since) in held.items() if now - since >= MIN_BEAT_GAP_S}
            if self._discovery_ping or lasting != told or now - beaten >= self.config.heartbeat_s:
                self._discovery_ping = False
                told, beaten = lasting, now
                beat = Heartbeat(pod=self.config.name, fingerprint=self.fingerprint, ts=time.time(),
                                 running_tasks=self.running_tasks, uptime_s=beaten - self.started, phases=phases)
                with contextlib.suppress(FedpodError):
                    await self.channel.announce(subjects.heartbeat(self.fingerprint), beat,
                                                [k for fp, k in self._modeller_keys.items() if self._accepts(fp)])
            self._reload_if_changed()
            if self.requests.unflushed:
                await asyncio.to_thread(self.requests.flush)
            self._summarise_rejections()
            self._pinged.clear()
            stopped = asyncio.ensure_future(stop.wait())
            pinged = asyncio.ensure_future(self._pinged.wait())
            until_due = max(0.0, self.config.heartbeat_s - (time.monotonic() - beaten))
            await asyncio.wait({stopped, pinged}, timeout=until_due, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            pinged.cancel()
            if pinged.done() and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=MIN_BEAT_GAP_S)

    async def _on_ping(self, payload: object, ack: object, vouched_by: object) -> None:
        """A discovery ping (its content, whoever sent it, is ignored): beat now."""
        self._discovery_ping = True
        self._pinged.set()

    def _config_changed_at(self) -> int:
        try:
            return self.config_path.stat().st_mtime_ns
        except OSError:
            return 0

    def _reload_if_changed(self) -> None:
        """Apply an edited pod config without a restart — who is accepted (`fedpod pod allow` /
        `revoke`), discovery and result limits — at the next heartbeat. Datasets are loaded at
        start: a changed list is reported, and served after a restart."""
        changed_at = self._config_changed_at()
        if changed_at == self._config_mtime:
            return
        self._config_mtime = changed_at
        try:
            fresh = PodConfig.load(self.config_path)
        except FedpodError as exc:
            log.warning("pod config %s changed but does not load (%s): the running settings stay", self.config_path,
                        exc)
            self._journal.record("config-invalid", error=str(exc)[:2000], kept="the running settings")
            return
        live = ("policies", "discovery", "max_result_rows", "max_result_bytes")
        changed = [field for field in live if getattr(fresh, field) != getattr(self.config, field)]
        if changed:
            self.config = self.config.model_copy(update={field: getattr(fresh, field) for field in live})
            self._journal.record("config-reloaded", changed=changed)
            self._record_policy()
            log.info("pod config reloaded: %s now apply", ", ".join(changed))
        if [d.name for d in fresh.datasets] != [d.name for d in self.config.datasets]:
            log.warning("the datasets in %s changed: restart the pod to serve them", self.config_path)

    @property
    def _journal(self) -> AuditWriter:
        assert self.journal is not None, "the pod is not running"
        return self.journal

    def _summarise_rejections(self, *, force: bool = False) -> None:
        summary = self.tally.summary(time.monotonic(), force=force)
        if summary is not None:
            self._journal.record("rejections", **summary)

    def _record_policy(self) -> None:
        """Audit a policy change (with old and new values) unless its tool did already — edits
        made while the pod ran, and those made while it was stopped."""
        record_policy(self._resolve(self.config.storage), self.config.policies, self.audit, "pod config file")

    def _accepts(self, fingerprint: str) -> bool:
        return self.config.policies.knows(fingerprint)

    def _refused(self, reason: str, detail: str) -> None:
        """Count a refusal; only the first of each reason in a window reaches the log."""
        if self.tally.note(reason, detail):
            log.warning("refused (%s): %s; further ones this minute are only counted", reason, detail)

    async def _on_rejected(self, exc: EnvelopeRejected) -> None:
        self._refused(exc.reason, exc.message)

    async def _on_discover(self, opened: Opened, trusted: bool) -> None:
        assert self.channel is not None
        sender = opened.sender
        await opened.acknowledge()
        if not trusted and not self.tally.denial(sender.fingerprint, "discovery", auditable=False)[1]:
            return
        with contextlib.suppress(FedpodError):
            await self.channel.send(sender, self.advert(sender), timeout_s=5.0)

    async def _on_access_status(self, opened: Opened, trusted: bool) -> None:
        """Tell a modeller (known or not: strangers are who have requests) its own requests and
        grants — never anyone else's."""
        assert self.channel is not None
        sender = opened.sender
        await opened.acknowledge()
        if not trusted and not self.tally.denial(sender.fingerprint, "access-status", auditable=False)[1]:
            return
        today = dt.datetime.now(dt.UTC).date()
        states = [AccessRequestState.model_validate(entry) for entry in self.requests.of(sender.fingerprint)]
        granted = {d.name: sorted(kinds) for d in self.config.datasets
                   if (kinds := self.config.policies.kinds_for(sender.fingerprint, d.name, today))}
        with contextlib.suppress(FedpodError):
            await self.channel.send(sender, AccessStatus(pod=self.config.name, requests=states[-50:],
                                                         granted=granted), task_id=opened.header.task, timeout_s=5.0)

    async def _on_message(self, opened: Opened) -> None:
        request_type = REQUESTS.get(opened.header.type)
        trusted = self._accepts(opened.sender.fingerprint)
        if trusted:
            self._modeller_keys[opened.sender.fingerprint] = opened.sender
        if opened.header.type == Discover.TYPE:
            await self._on_discover(opened, trusted)
            return
        if opened.header.type == AccessStatusQuery.TYPE:
            await self._on_access_status(opened, trusted)
            return
        if opened.header.type == SecAggRequest.TYPE:
            await self._on_secagg(opened, trusted)
            return
        if opened.header.type == ModelCast.TYPE:
            await self._on_model_cast(opened, trusted)
            return
        if request_type is None:
            if trusted:
                self._journal.record("message-ignored", sender=opened.sender.fingerprint, type=opened.header.type[:64])
            else:
                self._refused("unexpected-message", f"{opened.header.type[:64]!r} from {opened.sender.fingerprint}")
            return
        try:
            request = unpack(opened.payload, request_type)
        except DecodeError as exc:
            if not trusted:
                self._refused("malformed-task", f"from {opened.sender.fingerprint}: {exc}")
                return
            self._journal.record("task-malformed", sender=opened.sender.fingerprint, error=str(exc)[:500])
            await self._reply(opened, TaskFailure(task_id=opened.header.task or "?", kind="DecodeError",
                                                  message=str(exc)))
            return
        await self._handle_task(opened, request)

    async def _on_model_cast(self, opened: Opened, trusted: bool) -> None:
        """A round's model, sent once to every pod of the round (`pod.casts`): kept for the
        TrainRequest that names it. Only an accepted modeller's is kept."""
        sender = opened.sender
        if not trusted:
            self._refused("cast-stranger", f"from {sender.fingerprint}")
            return
        try:
            cast = unpack(opened.payload, ModelCast)
        except DecodeError as exc:
            self._journal.record("task-malformed", sender=sender.fingerprint, error=str(exc)[:500])
            return
        self.casts.keep(sender.fingerprint, cast.cast_id, cast.tensors)
        await opened.acknowledge()

    async def _on_secagg(self, opened: Opened, trusted: bool) -> None:
        """Steps 1, 2 and 4 of secure aggregation, for a modeller the policy grants the session's
        purpose on the dataset (`train`, or `sql_aggregate` for secure SQL sums; step 3 rides on
        the TrainRequest or TaskRequest); the unmasking is audited, once per round."""
        sender = opened.sender
        if not trusted:
            self._refused("secagg-stranger", f"from {sender.fingerprint}")
            return
        await opened.acknowledge()
        try:
            request = unpack(opened.payload, SecAggRequest)
        except DecodeError as exc:
            await self._reply(opened, TaskFailure(task_id=opened.header.task or "?", kind="DecodeError",
                                                  message=str(exc)), attempts=1)
            return
        today = dt.datetime.now(dt.UTC).date()
        served = self.catalog is not None and request.dataset in self.catalog.tables
        kind = request.purpose
        if not served or kind not in self.config.policies.kinds_for(sender.fingerprint, request.dataset, today):
            await self._reply(opened, TaskFailure(
                task_id=request.task_id, dataset=request.dataset[:128], kind="AccessDenied", rule="grant",
                message=f"secure aggregation on {request.dataset[:128]!r} needs the `{kind}` kind at pod "
                        f"{self.config.name}"), attempts=1)
            return
        try:
            reply = await asyncio.to_thread(lambda: self.secagg().answer(request, sender.fingerprint))
        except FedpodError as exc:
            await self._reply(opened, TaskFailure(task_id=request.task_id, dataset=request.dataset,
                                                  kind=type(exc).__name__, message=exc.message, hint=exc.hint))
            return
        if request.step == "unmask":
            revealed = [kind for kind, _, _ in reply.shares.values()]
            self._journal.record("secagg-unmasked", session=request.session, dataset=request.dataset,
                                 requester=sender.name[:64], self_mask_shares=revealed.count("self"),
                                 mask_key_shares=revealed.count("key"), dropped=sorted(request.dropped)[:64])
        await self._reply(opened, reply)

    def _measure(self, request: TaskRequest | TrainRequest, sender: PublicIdentity) -> Request:
        """What `decide` needs to know about a task, judged by the pod from the task itself (a
        query's kind from its SQL, never from the mode its sender claims)."""
        catalog = self._catalog
        served = request.dataset in catalog.tables
        columns = catalog.columns_of(request.dataset) if served else []
        times = self._recent.get((sender.fingerprint, request.dataset), deque())
        now = time.monotonic()
        while times and now - times[0] > RATE_WINDOW_S:
            times.popleft()
        common: dict[str, Any] = {"pod": self.config.name, "requester": sender.name[:64],
                                  "fingerprint": sender.fingerprint, "dataset": request.dataset[:128],
                                  "at": dt.datetime.now(dt.UTC), "served": served, "recent_tasks": len(times)}
        if isinstance(request, TaskRequest):
            from fedpod.pod.sql_tasks import query_shape  # sqlglot: on the first SQL task, not at start

            query = query_shape(request.algorithm, columns)
            return Request(kind=query.kind, columns=query.columns, extremes=query.extremes, **common)
        plan = request.plan
        return Request(kind="evaluate" if request.evaluate_only else "train",
                       model=plan.name if plan.kind == "builtin" else CUSTOM_PLAN,
                       secure_aggregation=request.secagg is not None,
                       differentially_private=request.training_args.get("dp_args") is not None, **common)

    async def _handle_task(self, opened: Opened, request: TaskRequest | TrainRequest) -> None:
        sender = opened.sender
        self._reload_if_changed()  # a stat: an approval given a moment ago applies to this very task
        # in a worker thread: judging SQL parses it (hostile text, and the first SQL task imports
        # sqlglot and DuckDB), which on the event loop stalled 100 pods' heartbeats for seconds
        measured = await asyncio.to_thread(self._measure, request, sender) if isinstance(request, TaskRequest) \
            else self._measure(request, sender)  # a training task's judgement parses nothing
        decision = decide(self.config.policies, measured)
        received = {"task": request.task_id, "requester": sender.name[:64], "requester_fingerprint": sender.fingerprint,
                    "dataset": request.dataset[:128], "kind": measured.kind, "rule": decision.rule,
                    "reasons": [v.reason for v in decision.violations]}
        who = f"{sender.name[:64]} ({sender.fingerprint})"
        if not decision.allowed:
            await self._refuse(opened, request, measured, decision, received, who)
            return
        self._recent.setdefault((sender.fingerprint, request.dataset), deque()).append(time.monotonic())
        limits = decision.limits
        commit = self._journal.commit("task-received", **received, **describe_request(request), decision="allow",
                                      principal=decision.principal, min_group_size=limits.min_group_size,
                                      max_rows=limits.max_rows)
        # signed in the same batch, while the task runs: the reply carries it to the modeller, a
        # witness (queued apart, after the entry was durable, it cost the audit thread a wake per task)
        self._journal.checkpoint()
        await asyncio.wrap_future(commit.written)  # in the log before it runs; the fsync overlaps the task
        log.info("%s task %s from %s on %s: allowed", measured.kind, request.task_id[:8], who, request.dataset)
        started = time.perf_counter()
        durable = asyncio.wrap_future(commit.durable)
        self._unacknowledged.add(request.task_id)  # heartbeats tell its phases once it is acknowledged
        self._set_phase(request.task_id, "queued")
        running = asyncio.ensure_future(self._run_task(opened, request, measured, limits, who, started, durable))
        running.add_done_callback(lambda task: task.cancelled() or task.exception())  # raised below, or moot
        try:
            await durable
            # only now does the modeller hear that the task arrived; a task done within
            # MIN_BEAT_GAP_S answers on this very acknowledgement (see `fedpod.channel`)
            await asyncio.wait({running}, timeout=MIN_BEAT_GAP_S)
            await opened.acknowledge()
            self._unacknowledged.discard(request.task_id)
            await running
        finally:
            if not running.done():  # the entry could not be made durable: nothing is released
                running.cancel()
            self._phases.pop(request.task_id, None)
            self._unacknowledged.discard(request.task_id)

    async def _refuse(self, opened: Opened, request: TaskRequest | TrainRequest, measured: Request,
                      decision: Decision, received: dict[str, Any], who: str) -> None:
        """Answer a refusal at once, naming the rule and what to ask the custodian for. A refusal
        a grant would lift opens (or counts against) an access request, whose id it names."""
        sender = opened.sender
        remedy, request_id = decision.remedy, None
        if decision.rule in REQUESTABLE_RULES:
            entry = self.requests.note(sender.name, sender.fingerprint, measured.dataset, measured.kind)
            if entry is None:
                self._refused("access-requests-full", f"{sender.fingerprint} on {measured.dataset}")
                remedy += f"; pod {self.config.name}'s queue of access requests is full: contact its custodian"
            elif entry["status"] == "denied":
                remedy = (f"access request {entry['id']} was denied by the custodian of pod {self.config.name} on "
                          f"{entry['decided']}: contact them")
            else:
                request_id = entry["id"]
                remedy = (f"access request {request_id} is pending at pod {self.config.name}: ask its custodian to "
                          f"approve it (`fedpod access approve {request_id} --kinds {measured.kind}`, or on the "
                          "pod's page)")
        audit, answer = self.tally.denial(sender.fingerprint, decision.rule or "")
        answer = answer or self._accepts(sender.fingerprint)  # a known key is always told why, never left to time out
        if audit:  # as bounded as the audit log: a flood of refusals is summarised, not printed
            log.warning("REFUSED %s task %s from %s on %s: %s [rule: %s]", measured.kind, request.task_id[:8], who,
                        measured.dataset, decision.reason, decision.rule)
            await self._journal.record_durably("task-received", **received, **describe_request(request, denied=True),
                                               decision="deny", request_id=request_id)
        if answer:
            await self._reply(opened, TaskFailure(
                task_id=request.task_id, dataset=request.dataset, kind="AccessDenied", rule=decision.rule,
                message=f"{decision.reason} [rule: {decision.rule}]", hint=remedy, request_id=request_id), attempts=1)

    def _set_phase(self, task_id: str, phase: str) -> None:
        """Called from worker threads too. For a task held at least MIN_BEAT_GAP_S, the next
        heartbeat, brought forward, tells the modeller; a quicker task's change would not bring
        a beat forward (see `_heartbeats`), so it does not wake the loop either."""
        since = self._phases.get(task_id, ("", time.monotonic()))[1]
        self._phases[task_id] = (phase, since)
        if self._loop is not None and time.monotonic() - since >= MIN_BEAT_GAP_S:
            self._loop.call_soon_threadsafe(self._pinged.set)

    async def _run_task(self, opened: Opened, request: TaskRequest | TrainRequest, measured: Request,
                        limits: DatasetPolicy, who: str, started: float, durable: Awaitable[object]) -> None:
        """Run the task and reply; nothing leaves the pod, a result or a failure, before its
        `task-received` entry is `durable`."""
        sender, kind = opened.sender, measured.kind
        async with self._slots:
            self.running_tasks += 1
            self._set_phase(request.task_id, "running")
            try:
                outcome = await asyncio.to_thread(self._execute, request, sender.fingerprint, measured, limits)
            except Exception as exc:  # a task never kills the pod, and its requester always hears back
                if not isinstance(exc, FedpodError):
                    log.exception("task %s failed unexpectedly", request.task_id)
                message, hint = reported_failure(exc)
                self._journal.record("task-failed", task=request.task_id, dataset=request.dataset,
                                     error=type(exc).__name__, message=message)
                if isinstance(exc, PlanNotApproved):
                    log.warning("PLAN AWAITS APPROVAL for task %s from %s: %s; %s", request.task_id[:8], who,
                                message, hint)
                else:
                    log.warning("%s task %s failed after %.2fs: %s: %s", kind, request.task_id[:8],
                                time.perf_counter() - started, type(exc).__name__, message)
                await durable
                await self._reply(opened, TaskFailure(task_id=request.task_id, dataset=request.dataset,
                                                      kind=type(exc).__name__, message=message, hint=hint))
                return
            finally:
                self.running_tasks -= 1
        result, returned = outcome
        self._set_phase(request.task_id, "replying")
        self._journal.record("task-completed", task=request.task_id, dataset=request.dataset, **returned)
        log.info("%s task %s done in %.2fs: %s left the pod", kind, request.task_id[:8], time.perf_counter() - started,
                 what_left(returned))
        assert self.channel is not None
        await durable
        letter = await self.channel.seal(opened.sender, result.model_copy(
            update={"audit_checkpoint": self._journal.latest_checkpoint}), task_id=request.task_id)
        del result, outcome  # the plaintext (a trained model's memory) is freed while its ciphertext is sent
        await self._deliver(letter, answering=opened)

    def _execute(self, request: TaskRequest | TrainRequest, requester: str, measured: Request,
                 limits: DatasetPolicy) -> tuple[TaskResult | TrainResult, dict[str, Any]]:
        """Run a task in a worker thread, within the dataset's disclosure limits; returns the
        reply to send and what the audit log records about it (described from the result in
        hand, never decoded again)."""
        if isinstance(request, TaskRequest):
            return self.sql().run(request, requester, measured.kind, limits, self.config)
        from fedpod.pod.training import describe_training, privacy_round

        if request.model_cast:
            tensors = self.casts.take(requester, request.model_cast)
            if tensors is None:
                raise CastMissing(f"the round's model (cast {request.model_cast[:64]}) did not arrive at pod "
                                  f"{self.config.name}, or was already used", where=f"dataset {request.dataset}",
                                  hint="the modeller sends the request again with the model in it")
            request = request.model_copy(update={"tensors": tensors, "model_cast": ""})
        self._set_phase(request.task_id, "preparing")
        released = [c for c in self._catalog.columns_of(request.dataset) if limits.columns.permits(c)]
        masking = request.secagg
        masker = None if masking is None else (
            lambda update, samples: self.secagg().mask(masking, requester, request.dataset, update, samples))
        name = self.config.policies.name_of(requester) or requester
        privacy = privacy_round(request, requester, name, limits, self.secagg, self.privacy)
        trained = self.trainer().run(request, requester, lambda phase: self._set_phase(request.task_id, phase),
                                     released, masker, privacy, limits.min_group_size)
        return trained, describe_training(trained)

    @property
    def _catalog(self) -> Catalog:
        assert self.catalog is not None, "the pod is not running"
        return self.catalog

    def _load_engine(self) -> SqlEngine:
        """The pod's DuckDB, loaded on its first SQL or training task (see `data.catalog`)."""
        from fedpod.algorithms.sql.engine import SqlEngine

        return SqlEngine(self.config.datasets, self.base, memory_limit=duckdb_limit(self.config))

    def _secagg_sessions(self) -> SecAggSessions:
        from fedpod.pod.secure_aggregation import SecAggSessions

        return SecAggSessions(self.config.name)

    def _privacy_ledger(self) -> PrivacyLedger:
        from fedpod.governance.privacy_budget import PrivacyLedger

        return PrivacyLedger(self._resolve(self.config.storage) / "privacy-budget.jsonl",
                             lambda event, **details: self._journal.record(event, **details))

    def _sql_tasks(self) -> SqlTasks:
        from fedpod.governance.differencing import CohortLedger
        from fedpod.pod.sql_tasks import SqlTasks

        return SqlTasks(self.engine(), CohortLedger(self._resolve(self.config.storage) / "cohorts.jsonl"),
                        self.secagg, self.privacy)

    def _training_runner(self) -> TrainingRunner:
        """PyTorch and scikit-learn take seconds to import, which a pod that only answers SQL
        should not pay at start-up."""
        from fedpod.pod.training import TrainingRunner

        return TrainingRunner(self.engine(), {d.name: d for d in self.config.datasets}, self.base, self.plans,
                              self.config.device, self.config.name,
                              self._resolve(self.config.storage) / "training-state", self.config_path)

    async def _reply(self, opened: Opened, message: TaskResult | TrainResult | SecAggReply | TaskFailure,
                     attempts: int = 3) -> None:
        assert self.channel is not None
        await self._deliver(await self.channel.seal(opened.sender, message, task_id=message.task_id), attempts,
                            answering=opened)

    async def _deliver(self, letter: Letter, attempts: int = 3, *, answering: Opened | None = None) -> None:
        """Deliver a reply: on the acknowledgement of the request it `answer`s if that is not yet
        sent, else on its own, retrying with backoff: a modeller that was briefly disconnected
        (broker restart, slow-consumer cut) still gets a result that took long to compute.
        Refusals are sent once: a stranger's flood must not pile up retrying tasks."""
        assert self.channel is not None
        if answering is not None and await self.channel.answer(answering, letter):
            return
        for attempt in range(attempts):
            try:
                await self.channel.deliver(letter)
                return
            except FedpodError as exc:
                if attempt == attempts - 1:
                    to = letter.recipient.fingerprint
                    if attempts > 1:
                        self._journal.record("reply-undelivered", task=letter.task_id, to=to, error=str(exc))
                    else:
                        self._refused("reply-undelivered", f"to {to}: {exc}")
                    return
                await asyncio.sleep(1.0 * 2**attempt)


def reported_failure(exc: Exception) -> tuple[str, str | None]:
    """What the requester hears of a failed task. fedpod's own errors are written to say nothing
    of the data; another library's may quote it (pandas' `could not convert string to float:
    'HIV positive'`, from a text column named as a feature), so only its kind leaves the pod."""
    if isinstance(exc, FedpodError):
        return exc.message, exc.hint
    return (f"the task failed with {type(exc).__name__}; the pod does not send its message, which may quote the "
            "data", "the pod's custodian can read the message in the pod's log")
