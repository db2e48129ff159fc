from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpod.errors import ConfigError
from fedpod.governance.audit import AuditLog


def _log(tmp_path: Path, n: int = 5) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append("task-received", task=f"t{i}", decision="allow")
    return log.path


def test_untouched_log_verifies(tmp_path: Path) -> None:
    result = AuditLog.verify(_log(tmp_path))
    assert result.ok and result.entries == 5


def test_log_continues_its_chain_after_reopening(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    AuditLog(path).append("pod-started")
    assert AuditLog.verify(path).entries == 3


def test_edited_entry_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["decision"] = "deny"
    lines[2] = json.dumps(entry, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    result = AuditLog.verify(path)
    assert not result.ok and "line 3" in (result.problem or "")


def test_deleted_entry_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    result = AuditLog.verify(path)
    assert not result.ok and "line 2" in (result.problem or "")


def test_two_writers_keep_one_unbroken_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    pod, cli = AuditLog(path), AuditLog(path)
    for i in range(10):
        (pod if i % 3 else cli).append("event", i=i)
    result = AuditLog.verify(path)
    assert result.ok and result.entries == 10


# --- anchored checkpoints ---------------------------------------------------------------------

from fedpod.governance.audit import _entry_hash, checkpoints_path, read_checkpoints  # noqa: E402
from fedpod.security.identity import Identity  # noqa: E402

POD = Identity.generate("alice")


def _anchored(tmp_path: Path, n: int = 5) -> Path:
    path = _log(tmp_path, n)
    AuditLog(path).checkpoint(POD)
    return path


def _recompute(lines: list[str]) -> list[str]:
    """What someone who rewrites the log does: recompute every hash so the chain verifies."""
    previous, out = "0" * 64, []
    for line in lines:
        entry = json.loads(line)
        entry["prev"] = previous
        entry["hash"] = _entry_hash(entry)
        previous = entry["hash"]
        out.append(json.dumps(entry, sort_keys=True))
    return out


def test_an_anchored_log_verifies_against_its_checkpoint(tmp_path: Path) -> None:
    result = AuditLog.verify(_anchored(tmp_path), signer=POD.public)
    assert result.ok and result.entries == 5 and result.checkpoints == 1 and result.note is None


def test_without_a_checkpoint_the_result_says_what_cannot_be_detected(tmp_path: Path) -> None:
    result = AuditLog.verify(_log(tmp_path))
    assert result.ok and "cannot be detected" in (result.note or "")


def test_deleting_the_newest_entries_is_detected(tmp_path: Path) -> None:
    path = _anchored(tmp_path)
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")
    result = AuditLog.verify(path)
    assert not result.ok and "truncated to 3 entries" in (result.problem or "") and "vouches for 5" in result.problem


def test_an_emptied_or_deleted_log_is_detected(tmp_path: Path) -> None:
    path = _anchored(tmp_path)
    path.write_text("")
    assert "log empty" in (AuditLog.verify(path).problem or "")
    path.unlink()
    assert "log missing" in (AuditLog.verify(path).problem or "")


def test_a_rewritten_chain_with_recomputed_hashes_is_detected(tmp_path: Path) -> None:
    path = _anchored(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["decision"] = "deny"
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(_recompute(lines)) + "\n")
    assert AuditLog.verify(path, checkpoints=[]).ok  # the chain alone cannot tell
    result = AuditLog.verify(path)
    assert not result.ok and "rewritten" in (result.problem or "")


def test_an_altered_or_foreign_checkpoint_is_detected(tmp_path: Path) -> None:
    path = _anchored(tmp_path)
    checkpoint = read_checkpoints(checkpoints_path(path))[0]
    assert "does not verify" in (AuditLog.verify(path, [{**checkpoint, "entries": 4}]).problem or "")
    other = Identity.generate("mallory")
    AuditLog(path).checkpoint(other)
    assert "not by the pod" in (AuditLog.verify(path, signer=POD.public).problem or "")


def test_a_witnessed_checkpoint_exposes_a_custodian_who_rewrote_and_re_signed(tmp_path: Path) -> None:
    path = _anchored(tmp_path)
    witnessed = read_checkpoints(checkpoints_path(path))
    lines = path.read_text().splitlines()[:2]  # drop three entries, then re-sign with the pod's own key
    path.write_text("\n".join(_recompute(lines)) + "\n")
    checkpoints_path(path).unlink()
    AuditLog(path).checkpoint(POD)
    assert AuditLog.verify(path, signer=POD.public).ok  # everything local agrees...
    result = AuditLog.verify(path, read_checkpoints(checkpoints_path(path)) + witnessed, POD.public)
    assert not result.ok and "vouches for 5" in (result.problem or "")  # ...but not with what the modeller kept


def test_discovery_by_strangers_does_not_spend_the_audit_budget_for_denied_tasks() -> None:
    from fedpod.governance.rejections import AUDITED_PER_WINDOW, RejectionTally

    tally = RejectionTally(started=0.0)
    for index in range(100):
        assert tally.denial(f"stranger{index}", "discovery", auditable=False) == (False, True)
    assert tally.denial("newcomer", "modellers") == (True, True)  # still audited in full
    for index in range(AUDITED_PER_WINDOW + 5):
        tally.denial(f"rotating{index}", "modellers")
    summary = tally.summary(61.0)
    assert summary is not None and summary["counts"]["denied-unaudited"] == 100 + 6


def test_a_reviewer_filters_the_log_and_sees_each_tasks_whole_story(tmp_path: Path) -> None:
    """Issue 8, item 5: `fedpod audit show/export` rows — by dataset, modeller, decision and time;
    a completed task is found by its requester although its entry does not name it."""
    from fedpod.governance.audit_view import parse_since, rows

    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("pod-started", pod="alice")
    log.append("task-received", task="t1", requester="ann", requester_fingerprint="AAAA-AAAA-AAAA-AAAA",
               dataset="ehr", kind="sql", decision="allow", query="SELECT 1")
    log.append("task-completed", task="t1", dataset="ehr", returned_rows=1)
    log.append("task-received", task="t2", requester="bob", requester_fingerprint="BBBB-BBBB-BBBB-BBBB",
               dataset="labs", kind="sql", decision="deny")
    entries = log.entries()
    assert [r["event"] for r in rows(entries, modeller="ann")] == ["task-received", "task-completed"]
    assert [r["task"] for r in rows(entries, modeller="BBBB-BBBB-BBBB-BBBB")] == ["t2"]
    assert [r["task"] for r in rows(entries, decision="deny")] == ["t2"]
    assert [r["event"] for r in rows(entries, dataset="ehr")] == ["task-received", "task-completed"]
    assert rows(entries, since=parse_since("1h")) == rows(entries) and rows(entries, since=9e12) == []
    completed = rows(entries, modeller="ann")[1]
    assert completed["requester"] == "ann" and '"returned_rows": 1' in completed["details"]
    with pytest.raises(ConfigError, match="neither a duration"):
        parse_since("yesterday-ish")


def test_reordered_entries_are_detected_with_the_line(tmp_path: Path) -> None:
    """Issue 8, item 5: edit, delete and truncate are tested above; reordering two entries too."""
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")
    result = AuditLog.verify(path)
    assert not result.ok and "line 2" in (result.problem or ""), result.problem


def test_only_entries_someone_waits_for_are_fsynced_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync costs milliseconds: a task's own entries are written at once and fsynced with the
    next durable one (or within SYNC_EVERY_S); a `task-received` a pod waits for is written, then
    fsynced, before it resolves."""
    import os

    from fedpod.governance.audit import AuditWriter

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = AuditLog(tmp_path / "audit.jsonl")
    writer = AuditWriter(log, Identity.generate("pod"))
    writer.SYNC_EVERY_S = 3600.0  # no timed fsync during the test
    writer._synced = float("inf")
    for i in range(20):
        writer.record("task-completed", task=str(i))
    writer.checkpoint()
    commit = writer.commit("task-received", task="t")
    written = commit.written.result(timeout=10)
    assert commit.durable.result(timeout=10) == written
    assert written["seq"] == 21 and len(synced) == 1  # the durable batch's one fsync, nothing before it
    assert AuditLog.verify(log.path).ok
    writer.close()
    assert len(synced) >= 2  # closing fsyncs what was written without waiting (the checkpoint)
    assert len(read_checkpoints(checkpoints_path(log.path))) == 1


def test_after_a_durable_write_the_entries_that_follow_wait_for_the_timed_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod's tasks each commit one durable `task-received`; their `task-completed` entries
    then wait for the timed sync. Once a second had passed since the last timed sync, every
    batch was fsynced: two fsyncs a task, the second on the way to the reply."""
    import os
    import time

    from fedpod.governance.audit import AuditWriter

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    writer = AuditWriter(AuditLog(tmp_path / "audit.jsonl"))
    writer.SYNC_EVERY_S = 0.2
    time.sleep(0.3)  # the timed sync is due
    for task in range(5):
        writer.commit("task-received", task=str(task)).durable.result(timeout=10)
        writer.record("task-completed", task=str(task))
        time.sleep(0.01)
    assert len(synced) <= 5 + 1  # one per durable entry, at most one timed sync among them
    writer.close()


def test_a_writer_chains_onto_what_another_process_wrote_since_and_checkpoints_that_head(tmp_path: Path) -> None:
    """A pod's log remembers the entry it wrote last, to skip reading it back: an append by the
    CLI in between, or the file moved aside, must still be read from the file."""
    path = tmp_path / "audit.jsonl"
    pod, cli = AuditLog(path), AuditLog(path)
    pod.append("task-received", task="t1")
    cli.append("plan-approved", plan="p")
    checkpoint = pod.checkpoint(POD)
    assert checkpoint["entries"] == 2 and checkpoint["head"] == json.loads(path.read_text().splitlines()[-1])["hash"]
    pod.append("task-completed", task="t1")
    assert AuditLog.verify(path).ok and AuditLog.verify(path).entries == 3
    path.rename(tmp_path / "archived.jsonl")
    pod.append("pod-started")
    assert [e["seq"] for e in AuditLog(path).entries()] == [1] and AuditLog.verify(path, checkpoints=[]).ok
