"""One training round under secure aggregation, as the modeller runs it: the four steps of
`fedpod.aggregation.secure.protocol` over the pods' channels. The modeller sees the
sample-weighted mean of the survivors' updates and the total sample count, never one pod's
update; each pod's validation metrics still come back in the clear (they are the pod's own
report, under its policy).

A pod that fails or is lost at any step has dropped out: the round goes on while every share
group keeps its threshold, and fails naming the pods lost otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from fedpod.aggregation.secure.protocol import Y_BYTES, ModellerSession, PublicKeys, Settings, make_plan
from fedpod.errors import ConfigError, SecAggError
from fedpod.modeller.discovery import Target
from fedpod.wire.messages import MASKED, Purpose, SecAggMasking, SecAggReply, SecAggRequest, TrainResult
from fedpod.wire.tensors import decode_groups

Exchange = Callable[[Target, Callable[[str], SecAggRequest]], Awaitable[SecAggReply]]
Train = Callable[[Target, SecAggMasking], Awaitable[TrainResult]]
R = TypeVar("R")
Contribute = Callable[[Target, SecAggMasking], Awaitable[tuple[R, "np.ndarray | None"]]]  # a reply, its masked vector
Answers = dict[str, dict[str, tuple[str, int, int]]]


@dataclass
class SecureOutcome:
    mean_update: np.ndarray
    total_samples: int
    results: dict[str, TrainResult]  # by identifier: the survivors' replies (metrics; no update in them)
    dropped: dict[str, str] = field(default_factory=dict)  # identifier -> why


@dataclass
class SecureSum(Generic[R]):
    total: np.ndarray  # the survivors' encoded vectors summed in the ring of 2^64
    results: dict[str, R]  # by identifier: the survivors' replies
    dropped: dict[str, str] = field(default_factory=dict)


def secagg_settings(secagg: bool | dict[str, Any]) -> Settings | None:
    """`secagg=True` (defaults) or a dict of Flower's SecAgg+ names; False: plain aggregation."""
    if secagg is False:
        return None
    values = {} if secagg is True else dict(secagg)
    try:
        return Settings(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid secure aggregation settings: {exc}",
                          hint="num_shares, reconstruction_threshold, clipping_range, quantization_range") from exc


def settings_to_wire(settings: Settings) -> dict[str, float | int | None]:
    return {"num_shares": settings.num_shares, "reconstruction_threshold": settings.reconstruction_threshold,
            "clipping_range": settings.clipping_range, "quantization_range": settings.quantization_range}


async def secure_round(selected: list[Target], settings: Settings, exchange: Exchange, train: Train) -> SecureOutcome:
    """A training round: SecAggError when it cannot complete securely, naming every pod lost and why."""
    async def contribute(target: Target, masking: SecAggMasking) -> tuple[TrainResult, np.ndarray | None]:
        result = await train(target, masking)
        return result, decode_groups(result.tensors).get(MASKED, {}).get("y")

    dropped: dict[str, str] = {}
    with _naming_losses(dropped):
        session, answers, results = await _steps(selected, settings, exchange, contribute, dropped, "train")
        mean, total = session.finish(answers)
    return SecureOutcome(mean, total, results, dropped)


async def secure_sum(selected: list[Target], settings: Settings, exchange: Exchange,
                     contribute: Contribute[R], purpose: Purpose) -> SecureSum[R]:
    """The survivors' vectors (each pod's `contribute`, masked) summed, and nothing else learnt."""
    dropped: dict[str, str] = {}
    with _naming_losses(dropped):
        session, answers, results = await _steps(selected, settings, exchange, contribute, dropped, purpose)
        return SecureSum(session.unmasked_sum(answers), results, dropped)


@contextlib.contextmanager
def _naming_losses(dropped: dict[str, str]) -> Iterator[None]:
    try:
        yield
    except SecAggError as exc:
        lost = "; ".join(f"{identifier}: {why}" for identifier, why in sorted(dropped.items()))
        raise SecAggError(exc.message + (f" — lost: {lost}" if lost else ""), hint=exc.hint) from exc


async def _steps(selected: list[Target], settings: Settings, exchange: Exchange, contribute: Contribute[R],
                 dropped: dict[str, str], purpose: Purpose) -> tuple[ModellerSession, Answers, dict[str, R]]:
    session = os.urandom(16).hex()
    by_id = {t.identifier: t for t in selected}
    plan = make_plan(list(by_id), bytes.fromhex(session), settings)
    modeller = ModellerSession(plan)

    async def ask(targets: list[str], **fields: object) -> dict[str, SecAggReply]:
        async def one(identifier: str) -> SecAggReply:
            target = by_id[identifier]
            return await exchange(target, lambda task_id: SecAggRequest(
                task_id=task_id, session=session, dataset=target.dataset.name, purpose=purpose, **fields))

        outcomes = await asyncio.gather(*(one(i) for i in targets), return_exceptions=True)
        answered = {}
        for identifier, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, SecAggReply):
                answered[identifier] = outcome
            else:
                dropped.setdefault(identifier, f"{fields.get('step')} step: {outcome}")
        return answered

    replies = await ask(list(by_id), step="keys", participants=list(plan.participants),
                        settings=settings_to_wire(settings))
    keys = modeller.accept_keys({i: PublicKeys(*(bytes(k) for k in r.keys)) for i, r in replies.items()
                                 if len(r.keys) == 3})
    wire_keys = {i: [k.seal_key, k.mask_key, k.commitment] for i, k in keys.items()}
    replies = await ask(sorted(keys), step="shares", keys=wire_keys)
    routed = modeller.route_shares({i: {h: bytes(b) for h, b in r.sealed.items()} for i, r in replies.items()})

    sharers = sorted(routed)
    contributed = await asyncio.gather(*(contribute(by_id[i], SecAggMasking(session=session, sealed=routed[i]))
                                         for i in sharers), return_exceptions=True)
    results: dict[str, R] = {}
    masked: dict[str, np.ndarray] = {}
    for identifier, outcome in zip(sharers, contributed, strict=True):
        if isinstance(outcome, tuple):
            result, vector = outcome
            if vector is not None and vector.dtype == np.uint64 and vector.ndim == 1:
                results[identifier], masked[identifier] = result, vector
                continue
            dropped.setdefault(identifier, "masking step: its reply carried no masked vector")
            continue
        dropped.setdefault(identifier, f"{'training' if purpose == 'train' else 'query'} step: {outcome}")
    survivors, lost = modeller.accept_masked(masked)
    replies = await ask(sorted(survivors), step="unmask", survivors=sorted(survivors), dropped=sorted(lost))
    answers = {i: {owner: (kind, int(x), int.from_bytes(bytes(y), "big")) for owner, (kind, x, y) in r.shares.items()
                   if len(bytes(y)) == Y_BYTES}
               for i, r in replies.items()}
    return modeller, answers, results
