"""An experiment's record of its rounds: in full on disk, in memory only for the latest ones.

Every completed round appends one JSON line to `rounds.jsonl` in the experiment folder: its
number, seconds, each pod's reply (samples, loss, validation metrics, timings, or the error) and
each pod's phases. The file is the record `Experiment.training_replies()`, `round_progress()`
and `round_seconds()` read; the last `KEPT_ROUNDS` rounds are also held in memory, so an
experiment of a few rounds never touches the disk to answer, and one of many thousands
(benchmarks/soak runs 17,000) keeps a flat resident size: holding every round cost the modeller
about 7 KiB of memory a round.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEPT_ROUNDS = 100
FILE_NAME = "rounds.jsonl"

Replies = dict[str, dict[str, Any]]  # pod -> its reply or {"dataset": "", "error": ...}
Phases = dict[str, list[tuple[str, float]]]  # pod -> (phase, seconds from the round's start)


@dataclass(frozen=True)
class RoundRecord:
    number: int
    seconds: float
    replies: Replies
    progress: Phases

    def line(self) -> str:
        return json.dumps({"round": self.number, "seconds": self.seconds, "replies": self.replies,
                           "progress": self.progress}) + "\n"

    @classmethod
    def parse(cls, line: str) -> RoundRecord:
        fields = json.loads(line)
        progress = {pod: [(str(phase), float(at)) for phase, at in steps] for pod, steps in fields["progress"].items()}
        return cls(int(fields["round"]), float(fields["seconds"]), fields["replies"], progress)


def read_rounds(folder: Path) -> list[RoundRecord]:
    """The rounds recorded in `folder`, in order. A last line cut short (the modeller killed
    while writing it) is not a round: it is skipped."""
    path = folder / FILE_NAME
    if not path.exists():
        return []
    records: dict[int, RoundRecord] = {}
    with path.open() as lines:
        for line in lines:
            try:
                record = RoundRecord.parse(line)
            except (ValueError, KeyError, TypeError):
                continue
            records[record.number] = record
    return [records[number] for number in sorted(records)]


class RoundHistory:
    def __init__(self, folder: Path, kept: int = KEPT_ROUNDS) -> None:
        self.folder = folder
        self._kept = kept
        self._recent: OrderedDict[int, RoundRecord] = OrderedDict()
        self._all_in_memory = True
        self._started = False  # the file is rewritten at the first round: a new experiment starts a new record

    def add(self, record: RoundRecord) -> None:
        if not self._started:
            self.restore([])
        with (self.folder / FILE_NAME).open("a") as out:
            out.write(record.line())
        self._remember(record)

    def restore(self, records: Iterable[RoundRecord]) -> None:
        """Start the record over with `records` (a resumed breakpoint: the rounds before it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._recent.clear()
        self._all_in_memory = True
        staged = self.folder / f"{FILE_NAME}.new"
        with staged.open("w") as out:
            for record in records:
                out.write(record.line())
                self._remember(record)
        os.replace(staged, self.folder / FILE_NAME)
        self._started = True

    def _remember(self, record: RoundRecord) -> None:
        self._recent[record.number] = record
        while len(self._recent) > self._kept:
            self._recent.popitem(last=False)
            self._all_in_memory = False

    def latest(self) -> RoundRecord:
        return next(reversed(self._recent.values()))

    def records(self) -> list[RoundRecord]:
        return list(self._recent.values()) if self._all_in_memory else read_rounds(self.folder)

    def replies(self) -> dict[int, Replies]:
        return {record.number: record.replies for record in self.records()}
