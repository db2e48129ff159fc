from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedpod.errors import ConfigError
from fedpod.pod import memory_cap
from fedpod.pod.config import PodConfig


def config(**settings: object) -> PodConfig:
    return PodConfig.model_validate({"name": "alice", "identity": "keys/alice.key", **settings})


def test_the_cap_is_half_the_machine_a_size_or_none_and_duckdb_gets_half_of_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_cap, "machine_memory", lambda: 16 * 2**30)
    monkeypatch.setattr(memory_cap, "may_use_cuda", lambda device: device == "cuda")
    assert memory_cap.cap_bytes(config()) == 8 * 2**30
    assert memory_cap.duckdb_limit(config()) == "4096MiB"
    assert memory_cap.cap_bytes(config(max_memory="2GiB", device="cpu")) == 2 * 2**30
    assert memory_cap.cap_bytes(config(max_memory="none")) is None
    assert memory_cap.cap_bytes(config(device="cuda")) is None  # CUDA's own mappings: not tried under a cap
    assert "may train on CUDA" in memory_cap.cap_process(config(device="cuda"))


def test_a_cap_too_small_to_run_a_pod_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pod.yaml").write_text("name: alice\nidentity: keys/alice.key\nmax_memory: 64MB\n")
    with pytest.raises(ConfigError, match=r"field max_memory in .*: Value error, 64\.0MB is below 512 MiB"):
        PodConfig.load(tmp_path / "pod.yaml")


def test_under_the_cap_an_allocation_beyond_it_fails_and_the_process_goes_on() -> None:
    """In a child process: the cap is the process's own."""
    child = subprocess.run([sys.executable, "-c", """
import numpy as np
from fedpod.pod.config import PodConfig
from fedpod.pod.memory_cap import cap_process
print(cap_process(PodConfig(name="alice", identity="k", max_memory="1GiB", device="cpu")))
try:
    np.ones(2**28)  # 2 GiB
except MemoryError:
    print("refused")
print(int(np.ones(2**20).sum()))
"""], capture_output=True, text=True, timeout=60)
    assert child.stdout.splitlines()[1:] == ["refused", str(2**20)], child.stdout + child.stderr
    assert "memory capped at 1.0 GiB (max_memory: 1.1GB)" in child.stdout
