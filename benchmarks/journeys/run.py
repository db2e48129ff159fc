"""Temporal tensors from about 1M events: fedpod's `to_tensor` against a straightforward pandas
implementation of the same binning (and TanaT's `to_tensor` where the optional `tanat` package
is installed), in one run, medians of `--runs`.

    python -m benchmarks.journeys.run [--patients 6000] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.report import machine, publish
from fedpod.data.journeys import generate_journeys
from fedpod.journeys import to_tensor, top_codes

HERE = Path(__file__).parent
BIN = "180D"
BINS = 10


def pandas_tensor(events: pd.DataFrame, static: pd.DataFrame, codes: list[str]) -> np.ndarray:
    """The same tensor (counts, backward bins from each patient's index date) as one would write
    it with pandas: filter, compute bins, group, unstack, reindex onto the full grid."""
    size = pd.Timedelta(BIN)
    frame = events[events["code"].isin(codes)].merge(static[["patient_id", "index_date"]], on="patient_id")
    anchor = pd.to_datetime(frame["index_date"]).dt.tz_localize("UTC")
    before = anchor - frame["timestamp"].dt.tz_convert("UTC")
    frame = frame[before > pd.Timedelta(0)]
    back = np.ceil((anchor[frame.index] - frame["timestamp"].dt.tz_convert("UTC")) / size).astype(int) - 1
    frame = frame.assign(bin=BINS - 1 - back)[back < BINS]
    counts = frame.groupby(["patient_id", "bin", "code"]).size()
    grid = pd.MultiIndex.from_product([static["patient_id"], range(BINS), codes], names=["patient_id", "bin", "code"])
    return counts.reindex(grid, fill_value=0).to_numpy(dtype=np.float32).reshape(len(static), BINS, len(codes))


def timed(function: object, runs: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = function()  # type: ignore[operator]
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def tanat_measurement(events: pd.DataFrame, codes: list[str], runs: int, fedpod_s: float) -> str:
    """TanaT's nearest call where the optional package is installed: a pool of the same events
    (built once, not timed), `to_tensor` one-hot over the same codes and bins. TanaT
    bins forward from each sequence's start and counts differently, so its tensor is timed, not
    compared; fedpod's `to_tensor` also takes that pool as input, which is checked here."""
    try:
        import tanat
    except ImportError:
        return "| TanaT `to_tensor` | not installed (optional; about 960 MB of dependencies) | |"
    import tempfile

    tanat.set_workspace(tempfile.mkdtemp(prefix="fedpod-bench-tanat-"))
    kept = events.loc[events["code"].isin(codes), ["patient_id", "timestamp", "code"]]
    pool = tanat.build_events(kept.assign(code=kept["code"].astype("category")), id_column="patient_id",
                              time_column="timestamp")
    seconds, _ = timed(lambda: pool.to_tensor("code", BIN.lower(), max_bins=BINS, ohe=True, fill_value=0), runs)
    from_pool = to_tensor(pool, codes=codes, bin_size=BIN, max_bins=BINS).tensor
    assert np.array_equal(from_pool, to_tensor(kept, codes=codes, bin_size=BIN, max_bins=BINS).tensor)
    version = getattr(tanat, "__version__", "") or __import__("importlib.metadata").metadata.version("tanat")
    return (f"| TanaT {version} `to_tensor` (its pool built beforehand, not timed) | {seconds:.3f} | "
            f"{seconds / fedpod_s:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=6000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    centre = generate_journeys(1, args.patients, seed=1)[0]
    events, static = centre.events, centre.patients
    codes = top_codes(events, 30)
    fedpod_s, ours = timed(lambda: to_tensor(events, static, codes=codes, bin_size=BIN, max_bins=BINS,
                                             anchor="index_date").tensor, args.runs)
    pandas_s, theirs = timed(lambda: pandas_tensor(events, static, codes), args.runs)
    assert np.array_equal(ours, theirs), "the two implementations disagree"  # type: ignore[arg-type]
    tanat_row = tanat_measurement(events, codes, args.runs, fedpod_s)
    lines = [
        "# Temporal tensors: fedpod vs pandas (and TanaT where installed)",
        "",
        f"`python -m benchmarks.journeys.run` — {len(events):,} events of {len(static):,} patients "
        f"(`fedpod data synth --journeys`), top 30 codes, {BINS} bins of {BIN} back from each patient's index "
        f"date, counts; median of {args.runs} runs; both tensors checked equal. Machine: {machine()}; "
        f"numpy {np.__version__}, pandas {pd.__version__}.",
        "",
        "| implementation | median (s) | vs fedpod |",
        "|---|---:|---:|",
        f"| fedpod `to_tensor` (numpy, one pass) | {fedpod_s:.3f} | 1.0x |",
        f"| pandas (filter, merge, groupby, unstack onto the grid) | {pandas_s:.3f} | {pandas_s / fedpod_s:.1f}x |",
        tanat_row,
        "",
        f"fedpod is **{pandas_s / fedpod_s:.1f}x** faster than the pandas version (target: at least 5x: "
        f"**{'met' if pandas_s / fedpod_s >= 5 else 'NOT met'}**).",
        "",
    ]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    main()
