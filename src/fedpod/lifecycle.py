"""Child processes (the embedded nats-server, local pods) must not outlive the process that
started them, even when it is killed without a chance to clean up."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for subprocess.Popen: on Linux, the child gets SIGTERM when its parent
    dies (prctl PR_SET_PDEATHSIG). Elsewhere a no-op; normal shutdown still stops children."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
