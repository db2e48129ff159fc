"""How every benchmark states its machine and publishes its table (beside itself, and on stdout)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}")


def publish(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines))
    print("\n".join(lines))
