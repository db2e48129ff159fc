from __future__ import annotations

import json
from pathlib import Path

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
