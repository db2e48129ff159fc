"""What a pod tells its custodian as it works: one line per task received (who, which dataset,
what kind, the decision), one when it ends (how long, what left the pod), refusals and plans
awaiting approval as warnings. To the console, and to `<storage>/pod.log`, rotated (5 files of 5 MB),
so a pod that ran for months keeps a bounded history beside its audit log. The audit log stays
the record; this is the view.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOG_FILE = "pod.log"
ROTATE_BYTES = 5 * 1024 * 1024
KEPT_FILES = 5
FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
LEVELS = ("debug", "info", "warning", "error")


class _RotatedFile(logging.handlers.RotatingFileHandler):
    """Rolls over once the file has reached its size, judged from the stream's position. The
    standard check stats the path twice and formats each record a second time to measure it,
    which cost a pod more than the line itself on every task (py-spy); a file may now end one
    line past `maxBytes`."""

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        return self.stream is not None and self.stream.tell() >= self.maxBytes


def configure(storage: Path, level: str = "info") -> Path:
    """Send fedpod's log records to stderr and the rotated file; returns the file's path."""
    if level.lower() not in LEVELS:
        from fedpod.errors import ConfigError

        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    storage.mkdir(parents=True, exist_ok=True)
    path = storage / LOG_FILE
    logger = logging.getLogger("fedpod")
    logger.setLevel(level.upper())
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    rotated = _RotatedFile(path, maxBytes=ROTATE_BYTES, backupCount=KEPT_FILES - 1,
                           encoding="utf-8")
    rotated.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(console)
    logger.addHandler(rotated)
    logger.propagate = False
    return path
