"""The modeller client: discovery, sending tasks, collecting replies, merging SQL results.

`AsyncModeller` is the asyncio core; `Modeller` wraps it for scripts and notebooks by
running the event loop in a background thread, so `Modeller(...).sql(...)` is an ordinary
blocking call. Every wait has a deadline, and a missing pod is named in the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fedpod.channel import SecureChannel
from fedpod.errors import (
    AccessDenied,
    ConfigError,
    DatasetNotFound,
    EnvelopeRejected,
    FedpodError,
    PodLost,
    TaskFailed,
    TaskTimeout,
    TrustError,
)
from fedpod.modeller.discovery import Target, Targets, require, select_by_identifiers, select_by_tags
from fedpod.modeller.known_pods import KnownPods
from fedpod.modeller.witness import AuditWitness
from fedpod.security.envelope import Opened, announced_sender
from fedpod.security.identity import Identity, PublicIdentity, default_keystore
from fedpod.transport import subjects
from fedpod.transport.bus import Ack, BrokerOptions, Bus, Payload
from fedpod.wire.codec import DecodeError, table_from_bytes, unpack
from fedpod.wire.messages import (
    AccessStatus,
    AccessStatusQuery,
    BulkParts,
    DatasetAdvert,
    Discover,
    Heartbeat,
    ModelCast,
    NoisyAggregateAlgorithm,
    PodAdvert,
    QuantileCountsAlgorithm,
    SecAggMasking,
    SecAggReply,
    SqlQueryAlgorithm,
    TaskFailure,
    TaskRequest,
    TaskResult,
    WireMessage,
)

if TYPE_CHECKING:  # SQL's libraries load with the first query: a training-only modeller never needs them
    import pandas as pd

log = logging.getLogger(__name__)
T = TypeVar("T")
LOST_AFTER_BEATS = 3  # a pod silent for this many heartbeat intervals is declared lost...
LOST_AFTER_AT_LEAST_S = 5.0  # ...but never sooner than this (a loaded machine delays beats)
MAX_DISCOVERY_REQUESTS = 1000
ADVERT_REUSE_S = 60.0  # an advert is reused this long while its pod keeps beating (see `discover`)
R = TypeVar("R", bound=WireMessage)
Adverts = dict[str, tuple[PublicIdentity, PodAdvert]]


class AsyncModeller:
    def __init__(self, identity: Identity, broker: BrokerOptions, *, known_pods: Path | None = None,
                 timeout_s: float = 60.0, discovery_window_s: float = 1.0, witness: Path | None = None,
                 require_pinned: bool = False) -> None:
        self.identity = identity
        self.broker = broker
        self.timeout_s = timeout_s
        self.discovery_window_s = discovery_window_s
        self.known_pods = KnownPods(known_pods)
        self.require_pinned = require_pinned
        self.ignored_adverts: dict[str, str] = {}  # pod name -> why its advert was not used, last discovery
        self._claims: dict[str, set[str]] = {}
        self._heartbeat_s: dict[str, float] = {}  # pod fingerprint -> its advertised interval
        self._last_beat: dict[str, float] = {}  # pod fingerprint -> when its last heartbeat arrived (loop time)
        self.witness = AuditWitness(witness)
        self.channel: SecureChannel | None = None
        self._pending: dict[str, tuple[str, asyncio.Future[Opened]]] = {}  # task id -> (pod fingerprint, reply)
        self.ignored_replies = 0
        self._adverts: Adverts = {}
        self._advert_cache: dict[str, tuple[float, PublicIdentity, PodAdvert]] = {}  # pod -> (when, key, advert)
        self._advert_arrived = asyncio.Event()
        self._asked: set[str] | None = None  # pods sent a discovery request in the discovery under way
        self._requests: set[asyncio.Task[None]] = set()
        self._observers: dict[str, Callable[[str], None]] = {}  # task id -> who hears its phases

    async def connect(self) -> None:
        bus = await Bus.connect(self.broker, name=f"modeller-{self.identity.name}", login=self.identity)
        self.channel = SecureChannel(bus, self.identity, accept_transfers_from=self._awaits_reply_from)
        await self.channel.listen_inbox(self._on_message, self._on_rejected)
        await bus.subscribe(subjects.HEARTBEATS, self._on_heartbeat)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.bus.close()

    def _awaits_reply_from(self, fingerprint: str) -> bool:
        """Large messages are taken only from pods this modeller awaits a reply from."""
        return any(expected == fingerprint for expected, _ in self._pending.values())

    async def _on_rejected(self, exc: EnvelopeRejected) -> None:
        return None  # counted by the channel; a modeller has no audit log of its own

    async def _on_heartbeat(self, frame: Payload, ack: Ack, vouched_by: str | None) -> None:
        """Every pod's heartbeats, on one subscription. A pod this modeller has a task at is
        followed (liveness, task phases). During a discovery, every pod that announces itself gets
        a sealed discovery request (heartbeats show a pod's public keys; a ping makes every pod
        beat at once) — at most MAX_DISCOVERY_REQUESTS: on an open broker anyone can announce keys."""
        keys = announced_sender(frame)
        if keys is None:
            return
        pod = PublicIdentity("pod", *keys)
        if pod.fingerprint in self._last_beat:
            await self._beat(pod.fingerprint, frame)
        if self._asked is None or len(self._asked) >= MAX_DISCOVERY_REQUESTS or pod.fingerprint in self._asked:
            return
        self._asked.add(pod.fingerprint)
        request = asyncio.ensure_future(self._ask(pod))
        self._requests.add(request)
        request.add_done_callback(self._requests.discard)

    async def _ask(self, pod: PublicIdentity) -> None:
        with contextlib.suppress(FedpodError):
            await self._channel.send(pod, Discover(), timeout_s=5.0)

    async def _on_message(self, opened: Opened) -> None:
        if opened.header.type == PodAdvert.TYPE:
            try:
                advert = unpack(opened.payload, PodAdvert)
            except DecodeError:
                return
            if advert.fingerprint != opened.sender.fingerprint or advert.pod != opened.sender.name:
                return  # an advert must describe the pod that signed it
            self._consider(opened.sender, advert)
            return
        pending = self._pending.get(opened.header.task)
        if pending is None or pending[0] != opened.sender.fingerprint:
            # A task id is visible to the broker; only the pod the task went to may answer it.
            # Anyone else's "reply" is counted and ignored, never resolves or fails the task.
            self.ignored_replies += 1
            return
        if not pending[1].done():
            pending[1].set_result(opened)

    def _consider(self, sender: PublicIdentity, advert: PodAdvert) -> None:
        """Use an advert only if its key may speak for its name: the pinned key, or (first
        contact, unless require_pinned) the only key that claims the name."""
        name, fingerprint = advert.pod, sender.fingerprint
        pin = self.known_pods.pinned(name)
        if pin is not None and pin != fingerprint:
            self.ignored_adverts[name] = (f"answered with fingerprint {fingerprint}, but {pin} is pinned "
                                          "(an impostor, or the pod's keys changed)")
            return
        if pin is None and self.require_pinned:
            self.ignored_adverts[name] = f"is not pinned (it presented {fingerprint}); require_pinned refuses it"
            return
        claims = self._claims.setdefault(name, set())
        claims.add(fingerprint)
        if pin is None and len(claims) > 1:
            self._adverts.pop(name, None)
            self.ignored_adverts[name] = (f"was claimed by {len(claims)} keys on first contact "
                                          f"({', '.join(sorted(claims))}); pin the right one first")
            return
        self._adverts[name] = (sender, advert)
        if not advert.notice:
            self._advert_cache[name] = (asyncio.get_running_loop().time(), sender, advert)
        self._heartbeat_s[fingerprint] = advert.heartbeat_s
        self._advert_arrived.set()

    @property
    def _channel(self) -> SecureChannel:
        if self.channel is None:
            raise FedpodError("modeller is not connected", hint="use it as a context manager")
        return self.channel

    async def discover(self, *, identifiers: list[str] | None = None, window_s: float | None = None) -> Adverts:
        """Ask every pod for its advert. With identifiers, stop as soon as all owners answered —
        at once if they are all pinned; on first contact only after `discovery_window_s` more,
        so that a second key claiming the same name (an impostor racing the real pod) is seen
        rather than whichever answered first being pinned. Named pods whose adverts are recent
        (ADVERT_REUSE_S), pinned, and whose sealed heartbeats still arrive are not asked again:
        a discovery costs a heartbeat's round trip, which would dominate back-to-back queries."""
        reused = self._reusable_adverts({i.partition("/")[0] for i in identifiers or []})
        if reused is not None:
            self.ignored_adverts = {}
            return reused
        self._adverts, self._claims, self.ignored_adverts = {}, {}, {}
        self._asked = set()
        try:
            await self._channel.bus.publish(subjects.DISCOVER, b"")
            await self._collect_adverts(identifiers, window_s)
        finally:
            self._asked = None
        for pod, reason in self.ignored_adverts.items():
            log.warning("ignored the advert of pod %s: it %s", pod, reason)
        return dict(self._adverts)

    def _reusable_adverts(self, owners: set[str]) -> Adverts | None:
        """The cached adverts of `owners`, if every one is fresh, pinned and still beating."""
        if not owners:
            return None
        now, reused = asyncio.get_running_loop().time(), {}
        for owner in owners:
            cached = self._advert_cache.get(owner)
            if cached is None:
                return None
            when, pod, advert = cached
            interval = self._heartbeat_s.get(pod.fingerprint, 2.0)
            beat = self._last_beat.get(pod.fingerprint)
            if (now - when > ADVERT_REUSE_S or self.known_pods.pinned(owner) != pod.fingerprint or beat is None
                    or now - beat > max(3 * interval, 1.0)):
                return None
            reused[owner] = (pod, advert)
        return reused

    async def _collect_adverts(self, identifiers: list[str] | None, window_s: float | None) -> None:
        wanted = {i.partition("/")[0] for i in identifiers or []}
        window = window_s or (self.timeout_s if wanted else self.discovery_window_s)
        clock = asyncio.get_running_loop().time
        deadline = clock() + window
        while True:
            if wanted and wanted <= set(self._adverts):
                if all(self.known_pods.pinned(owner) for owner in wanted):
                    break
                deadline = min(deadline, clock() + self.discovery_window_s)
                wanted = set()  # now only collecting rival claims until the new deadline
            remaining = deadline - clock()
            if remaining <= 0:
                break
            self._advert_arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advert_arrived.wait(), timeout=remaining)

    async def resolve(self, datasets: list[str] | None = None, tags: list[str] | None = None, *,
                      min_datasets: int | None = None) -> Targets:
        """The targets of a task. Pins are checked (and first-contact pins made) for these pods
        only; a targeted pod whose advert was ignored fails the task with the reason. Every
        dataset asked for — by identifier, or remembered as carrying the tags — that will not
        take part is named (`MissingDatasets`), unless `min_datasets` of them do: then the
        targets carry the `missing` ones."""
        if bool(datasets) == bool(tags):
            raise FedpodError("name either datasets (owner/name identifiers) or tags, not both or neither")
        if datasets:
            adverts = await self.discover(identifiers=datasets, window_s=min(self.timeout_s, 10.0))
            for owner in dict.fromkeys(i.partition("/")[0] for i in datasets):
                if owner in self.ignored_adverts and owner not in adverts:
                    raise TrustError(f"pod {owner} {self.ignored_adverts[owner]}", where=f"pod {owner}",
                                     hint=f"check its fingerprint with its custodian; `fedpod known-pods add {owner} "
                                          "FINGERPRINT --replace` if its keys really changed")
            targets = select_by_identifiers(adverts, datasets)
        else:
            adverts = await self.discover()
            targets = select_by_tags(adverts, tags or [], expected=self.known_pods.expected(tags or []))
        for identifier in targets.missing:
            owner = identifier.partition("/")[0]
            if owner in self.ignored_adverts and owner not in adverts:
                targets.missing[identifier] = TrustError(f"pod {owner} {self.ignored_adverts[owner]}",
                                                         where=f"pod {owner}")
        for target in targets:
            self.known_pods.pin_on_first_use(target.pod.name, target.pod.fingerprint)
        for owner, (pod, advert) in adverts.items():
            if not advert.notice:
                self.known_pods.remember(owner, pod.fingerprint, {d.name: list(d.tags) for d in advert.datasets})
        return require(targets, min_datasets)

    async def exchange(self, target: Target, build: Callable[[str], WireMessage], reply_type: type[R],
                       on_phase: Callable[[str], None] | None = None) -> R:
        """Send one request (built for a fresh task id) to one pod and wait for its reply; a pod's
        failure is raised as TaskFailed naming the pod. `on_phase` hears "sending", "sent", then
        what the pod's heartbeats say it is doing ("queued", "preparing", "training", ...)."""
        task_id = os.urandom(8).hex()
        future: asyncio.Future[Opened] = asyncio.get_running_loop().create_future()
        self._pending[task_id] = (target.pod.fingerprint, future)
        tell = on_phase or (lambda _: None)
        if on_phase is not None:
            self._observers[task_id] = on_phase
        try:
            await self._watch(target.pod)
            tell("sending")
            await self._channel.send(target.pod, build(task_id), task_id=task_id, timeout_s=min(self.timeout_s, 30.0))
            tell("sent")
            opened = await self._reply_or_loss(future, target)
        finally:
            self._pending.pop(task_id, None)
            self._observers.pop(task_id, None)
        if opened.header.type == TaskFailure.TYPE:
            failure = unpack(opened.payload, TaskFailure)
            if failure.kind == "AccessDenied":  # a refusal is a refusal, whether at discovery or at the task
                denied = AccessDenied(failure.message, where=target.identifier, hint=failure.hint)
                denied.rule, denied.request_id = failure.rule, failure.request_id
                raise denied
            raise TaskFailed(failure.message, pod=target.pod.name, kind=failure.kind, hint=failure.hint)
        if opened.header.type != reply_type.TYPE:
            raise TaskFailed(f"unexpected reply type {opened.header.type!r}", pod=target.pod.name, kind="ProtocolError")
        reply = unpack(opened.payload, reply_type)
        self.witness.keep(target.pod, getattr(reply, "audit_checkpoint", None))
        return reply

    async def cast_model(self, pods: list[PublicIdentity], tensors: BulkParts) -> tuple[str, set[str]]:
        """Send a round's tensors once to every pod of the round (`SecureChannel.cast`) where that
        saves anything — several pods and more than one chunk. Returns the cast's id for their
        TrainRequests and the pods that have it; the others get the tensors in their request."""
        assert self.channel is not None
        size = sum(len(part) for part in tensors) if isinstance(tensors, list) else len(tensors)
        if len(pods) < 2 or size <= self.channel.bus.chunk_size:
            return "", set()
        cast_id = os.urandom(8).hex()
        for pod in pods:
            await self._watch(pod)
        try:
            received = await self.channel.cast(pods, ModelCast(cast_id=cast_id, tensors=tensors),
                                               timeout_s=self.timeout_s)
        except FedpodError as exc:
            log.info("casting the model failed (%s): each pod is sent it directly", exc)
            return "", set()
        missed = [pod.name for pod in pods if pod.fingerprint not in received]
        if missed:
            log.info("the model's cast did not reach %s: sent to them directly", ", ".join(missed))
        return cast_id, received

    def traffic(self) -> tuple[int, int]:
        """Bytes this modeller has sent and received over its broker connection so far."""
        assert self.channel is not None
        return self.channel.bus.traffic

    async def _watch(self, pod: PublicIdentity) -> None:
        """Follow a pod's heartbeats (see `_on_heartbeat`) from the first task sent to it on."""
        self._last_beat.setdefault(pod.fingerprint, asyncio.get_running_loop().time())

    async def _beat(self, fingerprint: str, frame: Payload) -> None:
        """A watched pod's heartbeat: it is alive, and says what it does with our tasks."""
        try:
            opened = await self._channel.open(frame)
        except EnvelopeRejected:
            return  # not sealed for us, forged or replayed: it proves nothing
        if opened.sender.fingerprint != fingerprint:
            return
        self._last_beat[fingerprint] = asyncio.get_running_loop().time()
        with contextlib.suppress(DecodeError):
            for task_id, phase in unpack(opened.payload, Heartbeat).phases.items():
                observer = self._observers.get(task_id)
                if observer is not None and self._pending.get(task_id, ("",))[0] == fingerprint:
                    observer(phase[:32])

    async def _reply_or_loss(self, future: asyncio.Future[Opened], target: Target) -> Opened:
        """Wait for the reply; fail as soon as the pod stops sending heartbeats (it died or was
        cut off), or at the timeout — naming the pod either way."""
        loop = asyncio.get_running_loop()
        interval = self._heartbeat_s.get(target.pod.fingerprint, 2.0)
        lost_after = max(LOST_AFTER_BEATS * interval, LOST_AFTER_AT_LEAST_S)
        deadline = loop.time() + self.timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TaskTimeout(f"pod {target.pod.name} did not answer within {self.timeout_s:.0f}s",
                                  where=target.identifier)
            done, _ = await asyncio.wait({future}, timeout=min(remaining, interval))
            if done:
                return future.result()
            silent = loop.time() - self._last_beat.get(target.pod.fingerprint, loop.time())
            if silent > lost_after:
                raise PodLost(f"pod {target.pod.name} stopped sending heartbeats {silent:.1f}s ago (one every "
                              f"{interval:g}s expected) while it held this task: declared lost",
                              where=target.identifier, hint="is the pod running? its custodian can see its log")

    async def _sql_result(self, target: Target,
                          algorithm: SqlQueryAlgorithm | QuantileCountsAlgorithm | NoisyAggregateAlgorithm
                          ) -> tuple[Any, dict[str, int | float]]:
        def build(task_id: str) -> TaskRequest:
            return TaskRequest(task_id=task_id, dataset=target.dataset.name, algorithm=algorithm)

        result = await self.exchange(target, build, TaskResult)
        return table_from_bytes(result.table), dict(result.disclosure)

    async def access_status(self, pods: list[str] | None = None) -> list[AccessStatus]:
        """What each pod (or the named ones) says about this modeller's access requests and
        grants: pods answer anyone about their own requests, and no one about others'."""
        adverts = await self.discover(identifiers=pods) if pods else await self.discover()
        chosen = [(pod, advert) for name, (pod, advert) in sorted(adverts.items()) if not pods or name in pods]
        missing = sorted(set(pods or []) - {advert.pod for _, advert in chosen})
        if missing:
            raise DatasetNotFound(f"pod(s) {', '.join(missing)} did not answer discovery",
                                  hint="are they running on this broker?")

        async def ask(pod: PublicIdentity, advert: PodAdvert) -> AccessStatus:
            target = Target(pod, DatasetAdvert(identifier=f"{advert.pod}/", name=""))
            return await self.exchange(target, lambda _: AccessStatusQuery(), AccessStatus)

        return list(await asyncio.gather(*(ask(pod, advert) for pod, advert in chosen)))

    async def sql(self, query: str, *, datasets: list[str] | None = None, tags: list[str] | None = None,
                  aggregate: bool = False, min_datasets: int | None = None,
                  dp: dict[str, Any] | None = None, secure: bool | dict[str, Any] = False) -> pd.DataFrame | SqlResults:
        """Run `query` on each dataset. With `aggregate=True`, one exact global result whose
        `attrs` name the datasets it covers (`datasets`) and any left out (`missing`);
        otherwise one DataFrame per dataset identifier (`.missing` on the mapping). A dataset
        that does not answer fails the query naming it — every one, with its reason — unless
        `min_datasets` answered. `dp={"epsilon": 1.0, "bounds": {"age": [0, 120]}}` (with
        `aggregate=True`): COUNT, SUM and AVG with Laplace noise added by each pod, which charges
        epsilon to its budget (`fedpod.algorithms.sql.noisy`). `secure=True` (or SecAgg+ settings):
        COUNT, SUM and AVG summed under secure aggregation, so that no pod's partials are seen
        (`fedpod.algorithms.sql.secure`); pods that drop out are named in `attrs["missing"]`."""
        from fedpod.algorithms.sql.federated import plan_merge
        from fedpod.algorithms.sql.quantiles import is_quantile_query
        from fedpod.modeller.sql import merge, output_names_for

        if aggregate and is_quantile_query(query):
            return await self._quantiles(query, await self.resolve(datasets, tags, min_datasets=min_datasets))
        if (dp is not None or secure is not False) and not aggregate:
            raise ConfigError("dp= and secure= need aggregate=True: they apply to the pods' partial aggregates")
        if secure is not False:
            if dp is not None:
                raise ConfigError("choose dp= or secure= for one query")
            return await self._secure_sql(query, await self.resolve(datasets, tags, min_datasets=min_datasets),
                                          secure, min_datasets)
        plan = plan_merge(query) if aggregate else None
        targets = await self.resolve(datasets, tags, min_datasets=min_datasets)
        names = output_names_for(query, targets, plan.partial_sql) if plan else []
        algorithm: SqlQueryAlgorithm | NoisyAggregateAlgorithm = SqlQueryAlgorithm(
            query=plan.partial_sql if plan else query, mode=plan.mode if plan else "rows")
        if dp is not None:
            unknown = sorted(set(dp) - {"epsilon", "bounds"})
            if unknown or "epsilon" not in dp:
                raise ConfigError(f"dp= takes epsilon and bounds (got {sorted(dp)})",
                                  hint='dp={"epsilon": 1.0, "bounds": {"age": [0, 120]}}')
            from fedpod.algorithms.sql.noisy import plan_noisy

            plan_noisy(query, {c: (lo, hi) for c, (lo, hi) in dp.get("bounds", {}).items()})  # fails here, not at pods
            algorithm = NoisyAggregateAlgorithm(query=query, epsilon=dp["epsilon"], bounds=dp.get("bounds", {}))
        outcomes = await asyncio.gather(*(self._sql_result(t, algorithm) for t in targets), return_exceptions=True)
        answered = Targets(missing=targets.missing)
        tables, disclosure = [], {}
        for target, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, FedpodError):
                answered.missing[target.identifier] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                answered.append(target)
                tables.append(outcome[0])
                if outcome[1]:
                    disclosure[target.identifier] = outcome[1]
        require(answered, min_datasets)
        if plan is None:
            frames = {t.identifier: table.to_pandas() for t, table in zip(answered, tables, strict=True)}
            for identifier, limits in disclosure.items():
                frames[identifier].attrs["disclosure"] = limits
            return SqlResults(frames, answered.reasons(), disclosure)
        if plan.mode == "partials" and not names:
            raise FedpodError("the pods accepted this modeller while the query ran, before it had their schema",
                              hint="run the query again")
        merged = merge(plan, tables, names, [t.identifier for t in answered])
        merged.attrs.update(datasets=[t.identifier for t in answered], missing=answered.reasons(),
                            disclosure=disclosure)
        return merged


    async def _secure_sql(self, query: str, targets: Targets, settings: Literal[True] | dict[str, Any],
                          min_datasets: int | None) -> pd.DataFrame:
        """An aggregate summed under secure aggregation: the steps of `modeller.secure_round`'s
        `secure_sum`, the pods' partials masked in their TaskResults."""
        import numpy as np

        from fedpod.algorithms.sql.secure import decode_sums, secure_partials
        from fedpod.modeller.secure_round import secagg_settings, secure_sum
        from fedpod.modeller.sql import merge, output_names_for

        plan, kinds = secure_partials(query)
        chosen = secagg_settings(settings)
        assert chosen is not None  # secure aggregation was asked for
        names = output_names_for(query, targets, plan.partial_sql)
        algorithm = SqlQueryAlgorithm(query=plan.partial_sql, mode="partials")

        async def contribute(target: Target, masking: SecAggMasking) -> tuple[TaskResult, np.ndarray | None]:
            result = await self.exchange(target, lambda task_id: TaskRequest(
                task_id=task_id, dataset=target.dataset.name, algorithm=algorithm, secagg=masking), TaskResult)
            table = table_from_bytes(result.table)
            masked = table.column("masked").to_numpy() if "masked" in table.column_names else None
            return result, None if masked is None else np.asarray(masked, dtype=np.uint64)

        summed = await secure_sum(list(targets), chosen, lambda t, build: self.exchange(t, build, SecAggReply),
                                  contribute, "sql_aggregate")
        answered = Targets(missing=dict(targets.missing))
        for target in targets:
            if target.identifier in summed.results:
                answered.append(target)
            else:
                answered.missing[target.identifier] = FedpodError(summed.dropped.get(target.identifier, "dropped"))
        require(answered, min_datasets)
        frame = merge(plan, [decode_sums(summed.total, kinds)], names)
        frame.attrs.update(datasets=[t.identifier for t in answered], missing=answered.reasons(), secure=True)
        return frame

    async def _quantiles(self, query: str, targets: Targets) -> pd.DataFrame:
        """An exact federated quantile query: steps of counts at thresholds, each merged across
        every dataset, until each quantile is pinned (`fedpod.algorithms.sql.quantiles`). Every
        dataset must answer every step: a quantile of fewer datasets than asked would be wrong."""
        import pandas as pd

        from fedpod.algorithms.sql.quantiles import QuantileSearch, merge_counts, plan_quantiles
        from fedpod.modeller.sql import output_names_for

        plan = plan_quantiles(query)
        search = QuantileSearch(plan)
        names = output_names_for(query, targets)
        thresholds: list[list[float]] | None = search.first_thresholds()
        withheld: dict[str, int] = {}
        while thresholds is not None:
            algorithm = QuantileCountsAlgorithm(query=query, thresholds=thresholds)
            outcomes = await asyncio.gather(*(self._sql_result(t, algorithm) for t in targets),
                                            return_exceptions=True)
            failed = {t.identifier: o for t, o in zip(targets, outcomes, strict=True) if isinstance(o, BaseException)}
            for error in failed.values():
                if not isinstance(error, FedpodError):
                    raise error
            if failed:
                reasons = "; ".join(f"{identifier}: {error}" for identifier, error in failed.items())
                raise FedpodError(f"quantile step {search.steps + 1}: {reasons}",
                                  hint="a quantile needs every dataset's counts at every step")
            answers = [o for o in outcomes if not isinstance(o, BaseException)]
            for target, (_, disclosure) in zip(targets, answers, strict=True):
                count = int(disclosure.get("withheld_counts", 0))
                if count:
                    withheld[target.identifier] = withheld.get(target.identifier, 0) + count
            search.absorb(merge_counts([table for table, _ in answers]))
            thresholds = search.next_thresholds()
        frame = pd.DataFrame([search.results()], columns=names or None, dtype="float64")
        frame.attrs.update(datasets=[t.identifier for t in targets], missing=targets.reasons(), steps=search.steps,
                           disclosure={k: {"withheld_counts": v} for k, v in withheld.items()})
        return frame


def broker_options(broker: str | BrokerOptions | None) -> BrokerOptions:
    """A URL, full options, or None: FEDPOD_BROKER / FEDPOD_CREDS as the CLI reads them."""
    if isinstance(broker, BrokerOptions):
        return broker
    environment = BrokerOptions.from_environment()
    return environment if broker is None else BrokerOptions(broker, creds=environment.creds)


class SqlResults(dict[str, "pd.DataFrame"]):
    """One DataFrame per dataset identifier; `missing` names the datasets asked for that did not
    answer (only ever non-empty when the caller accepted a quorum) and why; `disclosure`, what
    each pod's disclosure limits changed (rows capped, small groups suppressed)."""

    def __init__(self, frames: dict[str, pd.DataFrame], missing: dict[str, str],
                 disclosure: dict[str, dict[str, int | float]] | None = None) -> None:
        super().__init__(frames)
        self.missing = dict(missing)
        self.disclosure = dict(disclosure or {})


class Modeller:
    """Blocking facade over `AsyncModeller` for scripts and notebooks.

        with Modeller() as m:  # identity, keystore and broker found as the CLI finds them
            df = m.sql("SELECT sex, AVG(age) FROM `ehr` GROUP BY sex",
                       datasets=["alice/ehr", "bob/ehr"], aggregate=True)

    Defaults, as on the command line: `identity` from FEDPOD_IDENTITY (else "modeller"),
    `keystore` from FEDPOD_KEYSTORE (else $FEDPOD_HOME/keys), `broker` from FEDPOD_BROKER and
    FEDPOD_CREDS (else nats://127.0.0.1:4222).
    """

    def __init__(self, identity: Identity | str | None = None, *, broker: str | BrokerOptions | None = None,
                 keystore: Path | None = None, timeout_s: float = 60.0, known_pods: Path | None = None,
                 require_pinned: bool = False) -> None:
        store = keystore or default_keystore()
        name = identity if identity is not None else os.environ.get("FEDPOD_IDENTITY") or "modeller"
        self.identity = name if isinstance(name, Identity) else Identity.load(name, store)
        options = broker_options(broker)
        pins = known_pods if known_pods is not None else store.parent / "known_pods.json"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedpod-modeller", daemon=True)
        self._thread.start()
        self._core = self._call(self._make_core(options, pins, timeout_s, require_pinned))
        try:
            self._call(self._core.connect())
        except BaseException:
            self.close()
            raise

    async def _make_core(self, options: BrokerOptions, pins: Path, timeout_s: float,
                         require_pinned: bool) -> AsyncModeller:
        return AsyncModeller(self.identity, options, known_pods=pins, timeout_s=timeout_s,
                             witness=pins.parent / "witness", require_pinned=require_pinned)

    @property
    def broker(self) -> BrokerOptions:
        return self._core.broker

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def traffic(self) -> tuple[int, int]:
        """Bytes sent and received over the broker connection so far (for the benchmarks: a round's
        model is sent once to all pods, not once per pod)."""
        return self._call(self._traffic())

    async def _traffic(self) -> tuple[int, int]:
        return self._core.traffic()

    @property
    def ignored_adverts(self) -> dict[str, str]:
        """Pods whose adverts the last discovery did not use, with why (pin mismatch, unpinned, contested)."""
        return dict(self._core.ignored_adverts)

    def datasets(self, *, tags: list[str] | None = None, window_s: float | None = None) -> list[Target]:
        """Every advertised dataset (or those carrying all `tags`)."""
        adverts = self._call(self._core.discover(window_s=window_s))
        if tags:
            return select_by_tags(adverts, tags)
        return [Target(pod, d) for _, (pod, advert) in sorted(adverts.items()) for d in advert.datasets]

    def resolve(self, datasets: list[str] | None = None, tags: list[str] | None = None, *,
                min_datasets: int | None = None) -> Targets:
        """The pods and datasets a task addresses: `owner/name` identifiers, or tags (see
        `AsyncModeller.resolve` for what happens to those that do not answer)."""
        return self._call(self._core.resolve(datasets, tags, min_datasets=min_datasets))

    def sql(self, query: str, *, datasets: list[str] | None = None, tags: list[str] | None = None,
            aggregate: bool = False, min_datasets: int | None = None,
            dp: dict[str, Any] | None = None, secure: bool | dict[str, Any] = False) -> pd.DataFrame | SqlResults:
        return self._call(self._core.sql(query, datasets=datasets, tags=tags, aggregate=aggregate,
                                         min_datasets=min_datasets, dp=dp, secure=secure))

    def access_status(self, pods: list[str] | None = None) -> list[AccessStatus]:
        """This modeller's access requests and grants, as each pod (or the named ones) tells them."""
        return self._call(self._core.access_status(pods))

    def close(self) -> None:
        if self._loop.is_running():
            if hasattr(self, "_core"):
                with contextlib.suppress(Exception):
                    self._call(self._core.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> Modeller:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
