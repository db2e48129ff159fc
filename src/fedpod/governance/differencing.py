"""Protection against differencing: a pod refuses an aggregate whose cohort differs from one it
already released to the same modeller (on the same data) by 1 to `min_group_size - 1` rows.

Two answers over cohorts that differ by one person give that person's value by subtraction (AVG
over a ward, then over the ward but for one patient). Each released cohort — a cell of an
aggregate, or the rows one of its aggregates used within the cell — is kept as its size and the xor
of its row ids' 64-bit hashes, both computed in the answer's own scan (the hash is about a seventh
of a 1,000,000-row GROUP BY's time here), with the SQL and key values that select it again. A new
cohort of the same size and xor is the same cohort. Cohorts of different cells of one answer are
disjoint, so never compared. A new cohort is compared only with kept ones whose size is within the
threshold, and first by sketch: its `SKETCH` smallest row-id hashes, computed by selecting the
cohort again, only then, and kept. Two cohorts that differ by d rows have sketches that differ by
at most 2d hashes, so sketches differing by 2m or more prove a difference of at least m rows. Only
a pair whose sketches are close is compared exactly, by selecting both cohorts' row ids (the pod
holds the rows) — and the new one refused if it differs by fewer rows than the minimum. (Computing
every sketch in the answer's scan tripled the time of a federated GROUP BY over a million rows.)
A cohort selected again must be the rows the answer described, by size and xor: a sample,
random() or the clock in a query (`USING SAMPLE 97 PERCENT`, `WHERE NOT (id = 7 AND random() <
0.5)`) would otherwise release one cohort and have another compared, and such an answer is
refused whenever it needs comparing.

What it cannot catch: differences spread over three or more answers (A - B - C with each pair
far apart), answers given to two modellers who pool them, and anything before the pod's history began (the
ledger is kept per dataset version: a changed dataset starts a new one). The ledger holds at
most `MAX_COHORTS` cohorts per modeller and dataset; beyond, aggregates are refused until the
custodian clears it (deleting the ledger file), never silently forgetting the oldest.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpod.algorithms.sql.disclosure import HIDDEN, SKETCH, Release, kept_cells

if TYPE_CHECKING:
    import pyarrow as pa

MAX_COHORTS = 20_000
MAX_EXACT_CHECKS = 200  # per query: each selects two cohorts' row ids


@dataclass
class Cohort:
    size: int
    xor: int  # of the row ids' 64-bit hashes
    sql: str  # selects the cohort's row ids, ordered
    params: list[Any]  # the cell's key values
    sketch: list[int] | None = None  # its SKETCH smallest row-id hashes, once needed

    @property
    def fingerprint(self) -> tuple[int, int]:
        return self.size, self.xor

    @property
    def key(self) -> tuple[str, str]:
        return self.sql, json.dumps(self.params, default=str)


def released_cohorts(table: pa.Table, release: Release, min_size: int) -> list[Cohort]:
    """The cohorts an answer (with `disclosure.disclosed_query`'s hidden columns) lets out: in
    each cell it keeps (`disclosure.kept_cells`), the cell's rows, and those of each output whose
    value it does not withhold (each from at least `min_size` rows)."""
    plan = release.cohorts
    assert plan is not None, "the answer was computed without its cohorts"
    cohorts: list[Cohort] = []
    for row, kept in zip(table.to_pylist(), kept_cells(table, min_size, release).to_pylist(), strict=True):
        if not kept:
            continue
        keys = [row[f"{HIDDEN}k{i}"] for i in range(plan.keys)]
        sizes = [int(row[f"{HIDDEN}n{j}"]) for j in range(len(plan.conditions))]
        shown = {0, *(j for used in release.uses if all(sizes[i] >= min_size for i in used) for j in used)}
        cohorts.extend(Cohort(sizes[j], int(row[f"{HIDDEN}x{j}"]), plan.rows_sql(j), keys)
                       for j in sorted(shown) if sizes[j] > 0)
    return cohorts


RowIds = Callable[[str, list[Any]], tuple[np.ndarray, int]]  # a cohort's row ids, and their hashes' xor
Sketch = Callable[[str, list[Any]], tuple[list[int], int, int]]  # its sketch, size and xor


def not_selected_again(cohort: Cohort) -> str:
    return ("a cohort is not selected again as the answer selected it (a sample, random() "
            "or the clock in its query?), so the pod cannot tell how far it lies from those already released")


def far_apart(a: Cohort, b: Cohort, min_size: int) -> bool:
    """True when the two cohorts provably differ by at least `min_size` rows, from their sizes or
    their sketches alone (see the module docstring)."""
    if abs(a.size - b.size) >= min_size:
        return True
    if a.sketch is None or b.sketch is None:
        return False
    return min_size <= SKETCH and len(set(a.sketch) ^ set(b.sketch)) >= 2 * min_size


def disjoint(a: Cohort, b: Cohort) -> bool:
    """For two cohorts of one answer: whether they lie in different cells, which its GROUP BY
    keys partition the rows into."""
    return a.key[1] != b.key[1]


def symmetric_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(len(a) + len(b) - 2 * len(np.intersect1d(a, b, assume_unique=True)))


class _Kept:
    """One modeller's released cohorts of one dataset version, indexed by size: a new cohort is
    compared only with those whose size is within the threshold (at most 2m - 1 sizes)."""

    def __init__(self) -> None:
        self.by_size: dict[int, list[Cohort]] = {}
        self.fingerprints: set[tuple[int, int]] = set()

    def add(self, cohort: Cohort) -> None:
        self.by_size.setdefault(cohort.size, []).append(cohort)
        self.fingerprints.add(cohort.fingerprint)

    def near(self, size: int, min_size: int) -> list[Cohort]:
        return [c for s in range(size - min_size + 1, size + min_size) for c in self.by_size.get(s, ())]


class CohortLedger:
    """One file per pod (`storage/cohorts.jsonl`), read once and appended to; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, str, str], _Kept] | None = None

    def _load(self) -> dict[tuple[str, str, str], _Kept]:
        if self._kept is None:
            kept: dict[tuple[str, str, str], _Kept] = {}
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        entry = json.loads(line)
                        key = (entry["modeller"], entry["dataset"], entry["version"])
                        kept.setdefault(key, _Kept()).add(Cohort(**entry["cohort"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line after a crash: the rest stands
            self._kept = kept
        return self._kept

    def check_and_keep(self, modeller: str, dataset: str, version: str, cohorts: list[Cohort], min_size: int,
                       row_ids: RowIds, sketch: Sketch) -> str | None:
        """None, having kept the new cohorts, if none differs from a kept one or from another
        new one by 1 to `min_size - 1` rows; else why not (and nothing is kept). `cohorts` are one
        answer's; `sketch` and `row_ids` select a cohort again, for the few pairs that need it."""
        with self._lock:
            kept = self._load().setdefault((modeller, dataset, version), _Kept())
            fresh = list({c.fingerprint: c for c in cohorts if c.fingerprint not in kept.fingerprints}.values())
            if len(kept.fingerprints) + len(fresh) > MAX_COHORTS:
                return (f"this pod has released {len(kept.fingerprints):,} distinct cohorts of {dataset} to this "
                        "modeller, its limit for checking differences; ask the custodian to review and clear its "
                        "ledger")
            loaded: dict[tuple[str, str], tuple[np.ndarray, int]] = {}

            def rows(cohort: Cohort) -> np.ndarray | None:
                """Its row ids, None unless they are the rows the answer described."""
                if cohort.key not in loaded:
                    loaded[cohort.key] = row_ids(cohort.sql, cohort.params)
                ids, xor = loaded[cohort.key]
                return ids if (len(ids), xor) == cohort.fingerprint else None

            batch = _Kept()
            checks = 0
            for new in fresh:
                near = [*kept.near(new.size, min_size), *(c for c in batch.near(new.size, min_size)
                                                           if not disjoint(new, c))]
                for other in near:
                    if new.fingerprint == other.fingerprint or far_apart(new, other, min_size):
                        continue
                    # sizes are close: the sketches may still tell them apart. Each cohort is selected
                    # again by its query, which must select the rows the answer described: else a
                    # sample, or random(), could release one cohort and have another compared
                    for cohort in (new, other):
                        if cohort.sketch is None:
                            found, size, xor = sketch(cohort.sql, cohort.params)
                            if (size, xor) != cohort.fingerprint:
                                return not_selected_again(cohort)
                            cohort.sketch = found
                    if far_apart(new, other, min_size):
                        continue
                    checks += 1
                    if checks > MAX_EXACT_CHECKS:
                        return (f"it has more than {MAX_EXACT_CHECKS} cohorts of nearly the same size as ones already "
                                "released to compare row by row; narrow it (fewer groups), or ask the custodian")
                    new_rows, other_rows = rows(new), rows(other)
                    if new_rows is None or other_rows is None:
                        return not_selected_again(new if new_rows is None else other)
                    difference = symmetric_difference(new_rows, other_rows)
                    if 0 < difference < min_size:
                        # by how many, or the sizes, is not said: that is the small count withheld
                        return (f"its cohort differs by fewer than {min_size} rows from one already released; "
                                f"answering both would single out fewer than {min_size} people")
                batch.add(new)
            if fresh:
                for cohort in fresh:
                    kept.add(cohort)
                with self.path.open("a") as handle:
                    for cohort in fresh:
                        handle.write(json.dumps({"modeller": modeller, "dataset": dataset, "version": version,
                                                 "cohort": cohort.__dict__}, default=str) + "\n")
            return None
