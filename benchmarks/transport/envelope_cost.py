"""What sealing the metadata costs per message: today's envelope against the previous one, whose
header (sender name and keys, type, task id) travelled signed but in plaintext.

The previous envelope is the project's own code at `PLAINTEXT_HEADER_COMMIT`, loaded from git
history (so this needs a git checkout), not a re-creation of it. Both seal and open the same
messages in this process: a 1 KB task for one pod, and a heartbeat (the old one a signed
plaintext broadcast; today's sealed for the accepted modellers, 10 here).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from fedpod.security import envelope
from fedpod.security.identity import Identity

PLAINTEXT_HEADER_COMMIT = "ac67d0e"
ROOT = Path(__file__).parents[2]
REPEATS, LOOPS = 7, 300


def previous_envelope() -> ModuleType | None:
    """The envelope module as it was at PLAINTEXT_HEADER_COMMIT; None outside a git checkout."""
    try:
        source = subprocess.run(["git", "show", f"{PLAINTEXT_HEADER_COMMIT}:src/fedpod/security/envelope.py"],
                                cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="fedpod-envelope-v1-")) / "envelope_v1.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("envelope_v1", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["envelope_v1"] = module  # pydantic resolves the module's annotations through it
    spec.loader.exec_module(module)
    return module


def microseconds(operation: Callable[[], object]) -> float:
    """Median over REPEATS of the mean time of LOOPS calls."""
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(LOOPS):
            operation()
        samples.append((time.perf_counter() - started) / LOOPS * 1e6)
    return statistics.median(samples)


def costs(module: ModuleType, sender: Identity, recipients: list[Identity], payload: bytes, *,
          broadcast: bool) -> tuple[int, float, float]:
    """(frame bytes, seal µs, open µs) of one message with `module`'s envelope. `broadcast`: the
    old module's signed plaintext broadcast; today's announcing envelope sealed for `recipients`."""
    publics = [r.public for r in recipients]
    if module is envelope:
        def seal() -> bytes:
            return envelope.seal_bytes(sender, "heartbeat" if broadcast else "task", payload, recipients=publics,
                                       task_id="" if broadcast else "0123456789abcdef", announce=broadcast)
    else:
        def seal() -> bytes:
            return bytes(module.seal_bytes(sender, "heartbeat" if broadcast else "task", payload,
                                           recipients=None if broadcast else publics,
                                           task_id="" if broadcast else "0123456789abcdef"))
    frame = seal()

    def open_() -> object:
        return module.open_envelope(frame, recipients[0], module.ReplayGuard())

    return len(frame), microseconds(seal), microseconds(open_)


def table() -> list[str]:
    old = previous_envelope()
    sender = Identity.generate("stmarys")
    one, ten = [Identity.generate("modeller")], [Identity.generate(f"modeller{i}") for i in range(10)]
    task, beat = os.urandom(1024), os.urandom(80)
    lines = [
        "## What sealed metadata costs per message",
        "",
        f"Seal and open in one process, median of {REPEATS} x {LOOPS} calls; \"before\" is the envelope at "
        f"{PLAINTEXT_HEADER_COMMIT} (header signed, not encrypted; heartbeats signed plaintext), loaded from git.",
        "",
        "| message | before: bytes | now: bytes | before: seal + open (µs) | now: seal + open (µs) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, recipients, payload, broadcast in (("1 KB task, one pod", one, task, False),
                                                  ("heartbeat, 10 accepted modellers", ten, beat, True)):
        size, seal_us, open_us = costs(envelope, sender, recipients, payload, broadcast=broadcast)
        if old is None:
            before = ["n/a (no git history)"] * 2
        else:
            old_size, old_seal, old_open = costs(old, sender, recipients, payload, broadcast=broadcast)
            before = [f"{old_size:,}", f"{old_seal:.0f} + {old_open:.0f}"]
        lines.append(f"| {label} | {before[0]} | {size:,} | {before[1]} | {seal_us:.0f} + {open_us:.0f} |")
    return lines
