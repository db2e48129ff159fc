"""The pod's half of secure aggregation across messages: one session per modeller and round,
from the key step to the unmasking, held in memory only (a pod that restarts mid-round has
dropped out, which the protocol recovers from).

Bounded for hostile input: only a modeller the policy lets train on the dataset opens sessions,
at most `MAX_SESSIONS` at a time each, forgotten after `SESSION_TTL_S`; a session unmasks once,
and only after this pod sent its masked update in it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from fedpod.aggregation.secure.fixedpoint import encode
from fedpod.aggregation.secure.protocol import Y_BYTES, PodSession, PublicKeys, Settings, make_plan
from fedpod.errors import SecAggError
from fedpod.wire.messages import Purpose, SecAggMasking, SecAggReply, SecAggRequest

MAX_SESSIONS = 4  # per modeller: a round needs one per dataset it trains on here
SESSION_TTL_S = 900.0
SETTING_NAMES = ("num_shares", "reconstruction_threshold", "clipping_range", "quantization_range")


@dataclass
class _Session:
    protocol: PodSession
    dataset: str
    purpose: Purpose
    opened: float
    masked: bool = False


def _whole(value: float | int | None) -> int | None:
    return None if value is None else int(value)


def settings_from_wire(values: dict[str, float | int | None]) -> Settings:
    unknown = set(values) - set(SETTING_NAMES)
    if unknown:
        raise SecAggError(f"unknown secure aggregation settings: {', '.join(sorted(unknown))}")
    try:
        return Settings(num_shares=_whole(values.get("num_shares")),
                        reconstruction_threshold=_whole(values.get("reconstruction_threshold")),
                        clipping_range=float(values.get("clipping_range") or Settings.clipping_range),
                        quantization_range=_whole(values.get("quantization_range")) or Settings.quantization_range)
    except (TypeError, ValueError) as exc:
        raise SecAggError(f"invalid secure aggregation settings: {exc}") from exc


class SecAggSessions:
    def __init__(self, pod: str) -> None:
        self.pod = pod
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._lock = threading.Lock()

    def answer(self, request: SecAggRequest, modeller: str) -> SecAggReply:
        """Steps 1, 2 and 4 for `modeller` (a fingerprint the caller has checked)."""
        key = (modeller, request.session)
        with self._lock:
            self._forget_expired()
            if request.step == "keys":
                return self._open(key, request)
            session = self._sessions.get(key)
            if session is None or session.dataset != request.dataset:
                raise SecAggError(f"no secure aggregation session {request.session[:8]} on {request.dataset} here "
                                  "(expired, or this pod restarted): it counts as dropped")
            if request.step == "shares":
                keys = {pod: PublicKeys(*(bytes(k) for k in value)) for pod, value in request.keys.items()
                        if len(value) == 3}
                return SecAggReply(task_id=request.task_id, step="shares", sealed=session.protocol.share(keys))
            if not session.masked:
                raise SecAggError("unmasking asked before this pod sent its masked update")
            del self._sessions[key]  # answered once, then forgotten
        answer = session.protocol.unmask(set(request.survivors), set(request.dropped))
        shares = {owner: (kind, x, y.to_bytes(Y_BYTES, "big")) for owner, (kind, x, y) in answer.items()}
        return SecAggReply(task_id=request.task_id, step="unmask", shares=shares)

    def _open(self, key: tuple[str, str], request: SecAggRequest) -> SecAggReply:
        if key in self._sessions:
            raise SecAggError(f"secure aggregation session {request.session[:8]} is already open")
        if sum(1 for modeller, _ in self._sessions if modeller == key[0]) >= MAX_SESSIONS:
            raise SecAggError(f"this modeller already has {MAX_SESSIONS} secure aggregation sessions open here",
                              hint="finish or abandon a round first; sessions expire after 15 minutes")
        plan = make_plan(request.participants, bytes.fromhex(request.session), settings_from_wire(request.settings))
        protocol = PodSession(plan, f"{self.pod}/{request.dataset}")  # participants are dataset identifiers
        self._sessions[key] = _Session(protocol, request.dataset, request.purpose, time.monotonic())
        keys = protocol.advertise()
        return SecAggReply(task_id=request.task_id, step="keys", keys=[keys.seal_key, keys.mask_key, keys.commitment])

    def noise_shares(self, masking: SecAggMasking, modeller: str) -> tuple[int, int]:
        """(pods in the session, the fewest whose sum the modeller can unmask): how a central-DP
        pod sizes its share of the noise, and what it counts on when accounting."""
        with self._lock:
            session = self._sessions.get((modeller, masking.session))
            if session is None:
                raise SecAggError(f"no open secure aggregation session {masking.session[:8]} to add noise in")
            plan = session.protocol.plan
            return len(plan.participants), plan.threshold

    def mask(self, masking: SecAggMasking, modeller: str, dataset: str, update: np.ndarray,
             samples: int) -> tuple[np.ndarray, int]:
        """Step 3 of a training round: the encoded, sample-weighted update, masked; and how many
        values were clipped."""
        session = self._take(masking, modeller, dataset, "train")
        encoded, clipped = encode(update, samples, session.protocol.plan.quantisation)
        return session.protocol.mask(encoded, {owner: bytes(box) for owner, box in masking.sealed.items()}), clipped

    def mask_encoded(self, masking: SecAggMasking, modeller: str, dataset: str, encoded: np.ndarray,
                     purpose: Purpose) -> np.ndarray:
        """Step 3 for a vector already in the ring (SQL partials), masked."""
        session = self._take(masking, modeller, dataset, purpose)
        return session.protocol.mask(encoded, {owner: bytes(box) for owner, box in masking.sealed.items()})

    def _take(self, masking: SecAggMasking, modeller: str, dataset: str, purpose: Purpose) -> _Session:
        """The open session to mask in, once: for this modeller, dataset and purpose."""
        with self._lock:
            session = self._sessions.get((modeller, masking.session))
            if session is None or session.dataset != dataset or session.purpose != purpose or session.masked:
                raise SecAggError(f"no open secure aggregation session {masking.session[:8]} for {purpose} on "
                                  f"{dataset} to mask in")
            session.masked = True
            return session

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if now - s.opened > SESSION_TTL_S]:
            del self._sessions[key]
