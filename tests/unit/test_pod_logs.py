from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedpod.pod import logs


def test_the_pod_log_rolls_over_at_its_size_and_keeps_a_bounded_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "ROTATE_BYTES", 2_000)
    path = logs.configure(tmp_path, "info")
    logger = logging.getLogger("fedpod.pod.service")
    try:
        for index in range(400):
            logger.info("train task %08d from modeller (abcdef) on data: allowed", index)
    finally:
        for handler in logging.getLogger("fedpod").handlers:
            handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["pod.log", "pod.log.1", "pod.log.2", "pod.log.3", "pod.log.4"]
    line = len(path.read_text().splitlines()[0]) + 1
    assert all((tmp_path / name).stat().st_size < 2_000 + line for name in files)
    assert "00000399" in path.read_text().splitlines()[-1]
