"""The pod's memory cap: a bound on what a modeller's task can make the pod allocate.

DuckDB's own `memory_limit` bounds its buffers (hash tables, sorts, joins), not the values its
functions make: `SELECT COUNT(*) FROM ehr WHERE len(range(age * 1000000)) > 0` asks for
gigabytes a row (two rows' `range(300000000)` took 14.8 GiB, measured), so one query of a
modeller granted aggregates could have the kernel kill processes on the pod's machine. A cap on
the pod process's data segment (RLIMIT_DATA: its heap and private writable mappings) makes such
an allocation fail instead — DuckDB's "Out of Memory Error", numpy's MemoryError — and the task
fails saying so while the pod goes on serving. DuckDB's `memory_limit` is set to half the cap,
so that its buffers spill or refuse before the cap is reached.

`max_memory: auto` caps a pod at half the machine's memory; `none` lifts the cap. No cap is set
where the pod may train on CUDA (`device: cuda`, or `auto` with an NVIDIA device present): CUDA's
driver maps memory of its own, which such a cap has not been tried with.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from fedpod.pod.config import PodConfig


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def may_use_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and any(Path("/dev").glob("nvidia[0-9]*")))


def cap_bytes(config: PodConfig) -> int | None:
    """The cap `config` asks for on this machine, or None."""
    if config.max_memory == "none" or may_use_cuda(config.device):
        return None
    return machine_memory() // 2 if config.max_memory == "auto" else int(config.max_memory)


def duckdb_limit(config: PodConfig) -> str | None:
    """DuckDB's `memory_limit` under the cap: half of it."""
    cap = cap_bytes(config)
    return None if cap is None else f"{cap // 2 // 2**20}MiB"


def cap_process(config: PodConfig) -> str:
    """Cap this process (never raising a limit already lower); says what was done, for the log."""
    cap = cap_bytes(config)
    if cap is None:
        why = "max_memory: none" if config.max_memory == "none" else "the pod may train on CUDA"
        return f"memory not capped ({why})"
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    asked = config.max_memory if isinstance(config.max_memory, str) else config.max_memory.human_readable(decimal=True)
    return (f"memory capped at {cap / 2**30:.1f} GiB (max_memory: {asked}), DuckDB's buffers at "
            f"{cap // 2 / 2**30:.1f} GiB: a task that asks for more fails, the pod does not")
