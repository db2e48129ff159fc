"""Whether a pod is running, from the custodian's shell: the pod keeps its process id in
`<storage>/pod.pid` while it runs, checked against /proc so that a stale file (a pod killed
hard) never names whatever process has that number now."""

from __future__ import annotations

import os
from pathlib import Path

PID_FILE = "pod.pid"


def mark_running(storage: Path) -> Path:
    path = storage / PID_FILE
    path.write_text(str(os.getpid()))
    return path


def running_pid(storage: Path) -> int | None:
    try:
        pid = int((storage / PID_FILE).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"fedpod" in command and b"pod" in command else None
