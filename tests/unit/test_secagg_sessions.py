"""The pod's secure-aggregation sessions under hostile or confused requests (issue 10): bounded
per modeller, one unmasking per session and only after masking, nothing for unknown sessions,
and settings checked before anything is made."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedpod.errors import SecAggError
from fedpod.pod import secure_aggregation
from fedpod.pod.secure_aggregation import MAX_SESSIONS, SecAggSessions
from fedpod.wire.messages import SecAggMasking, SecAggRequest

PODS = ["alice/ehr", "bob/ehr", "carol/ehr"]


def keys_request(session: str, **overrides: object) -> SecAggRequest:
    fields: dict[str, object] = {"task_id": "t", "session": session, "dataset": "ehr", "step": "keys",
                                 "participants": PODS, "settings": {}}
    return SecAggRequest(**{**fields, **overrides})  # type: ignore[arg-type]


def test_sessions_are_bounded_per_modeller_and_forgotten_after_their_time(monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = SecAggSessions("alice")
    opened = [os.urandom(16).hex() for _ in range(MAX_SESSIONS)]
    for session in opened:
        assert len(sessions.answer(keys_request(session), "LAB").keys) == 3
    with pytest.raises(SecAggError, match=f"already has {MAX_SESSIONS} secure aggregation sessions"):
        sessions.answer(keys_request(os.urandom(16).hex()), "LAB")
    assert sessions.answer(keys_request(os.urandom(16).hex()), "OTHER").step == "keys"  # another modeller's own
    with pytest.raises(SecAggError, match="already open"):
        sessions.answer(keys_request(opened[0]), "LAB")
    now = secure_aggregation.time.monotonic()
    monkeypatch.setattr(secure_aggregation.time, "monotonic", lambda: now + secure_aggregation.SESSION_TTL_S + 1)
    assert sessions.answer(keys_request(os.urandom(16).hex()), "LAB").step == "keys"  # the old ones expired


def test_no_unmasking_before_masking_nor_twice_nor_for_an_unknown_session() -> None:
    sessions = SecAggSessions("alice")
    session = os.urandom(16).hex()
    with pytest.raises(SecAggError, match="no secure aggregation session"):
        sessions.answer(keys_request(session, step="unmask", survivors=PODS), "LAB")
    sessions.answer(keys_request(session), "LAB")
    with pytest.raises(SecAggError, match="before this pod sent its masked update"):
        sessions.answer(keys_request(session, step="unmask", survivors=PODS), "LAB")
    with pytest.raises(SecAggError, match="no secure aggregation session"):  # the session is the modeller's own
        sessions.answer(keys_request(session, step="shares"), "MALLORY")
    with pytest.raises(SecAggError, match="no open secure aggregation session"):
        sessions.mask(SecAggMasking(session=session), "LAB", "other-dataset", np.zeros(3), 5)


def test_settings_and_participants_are_checked_before_a_session_opens() -> None:
    sessions = SecAggSessions("alice")
    with pytest.raises(SecAggError, match="unknown secure aggregation settings: num_sharez"):
        sessions.answer(keys_request(os.urandom(16).hex(), settings={"num_sharez": 3}), "LAB")
    with pytest.raises(SecAggError, match="alice/ehr is not among this round's pods"):
        sessions.answer(keys_request(os.urandom(16).hex(), participants=["bob/ehr", "carol/ehr"]), "LAB")
    with pytest.raises(SecAggError, match="above half"):
        sessions.answer(keys_request(os.urandom(16).hex(), settings={"reconstruction_threshold": 1}), "LAB")
