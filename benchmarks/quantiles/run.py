"""Benchmark: fedpod's exact federated median vs DuckDB's median on the pooled table.

    python -m benchmarks.quantiles.run       # rewrites benchmarks/quantiles/results.md

3 pods (separate processes, real NATS) x 1,000,000 rows each. fedpod's time is the whole
modeller call: every count step's tasks to the 3 pods, their scans, the replies and the search;
the reference is the same query in DuckDB on one in-memory table of all 3,000,000 rows. Each
run checks that the two agree. Runs alternate; medians are quoted.
Targets (issue 10): at most 25 count steps and under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import duckdb
import pytest

from benchmarks.report import machine, publish
from benchmarks.sql.run import PODS, federation

HERE = Path(__file__).parent
QUERIES = {
    "median": "SELECT MEDIAN(value) AS median FROM measurements",
    "quartiles and 99th percentile": "SELECT QUANTILE_CONT(value, 0.25) AS q1, QUANTILE_CONT(value, 0.75) AS q3, "
                                     "QUANTILE_DISC(value, 0.99) AS p99 FROM measurements",
}
STEP_TARGET, SECONDS_TARGET = 25, 1.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per pod")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    rows: list[str] = []
    verdicts: list[bool] = []
    with federation(args.rows, "quantiles") as setup:
        modeller, identifiers, pooled = setup.modeller, setup.identifiers, setup.pooled
        for label, query in QUERIES.items():
            federated_s, pooled_s, steps = [], [], 0
            for run in range(args.runs + 1):
                started = time.perf_counter()
                merged = modeller.sql(query, datasets=identifiers, aggregate=True)
                federated = time.perf_counter() - started
                started = time.perf_counter()
                expected = pooled.execute(query).fetchone() or ()
                central = time.perf_counter() - started
                assert list(merged.iloc[0]) == pytest.approx(list(expected), rel=4e-16), (label, merged, expected)
                steps = merged.attrs["steps"]
                if run:  # the first is a warm-up
                    federated_s.append(federated)
                    pooled_s.append(central)
            fed, ref = statistics.median(federated_s), statistics.median(pooled_s)
            met = steps <= STEP_TARGET and fed < SECONDS_TARGET
            verdicts.append(met)
            rows.append(f"| {label} | {steps} | {fed * 1000:.0f} | {min(federated_s) * 1000:.0f} | "
                        f"{ref * 1000:.1f} | {fed / ref:.0f}x | {'met' if met else 'NOT met'} |")
    lines = [
        "# Exact federated quantiles vs pooled DuckDB",
        "",
        f"`python -m benchmarks.quantiles.run` — {len(PODS)} pods x {args.rows:,} rows (Parquet, loaded by each "
        f"pod), column `value`; {args.runs} runs after one warm-up, medians; every run's answer equals DuckDB's on "
        f"the pooled rows. Machine: {machine()}, DuckDB {duckdb.__version__}.",
        "",
        "| query | count steps | fedpod median (ms) | fedpod min (ms) | pooled DuckDB (ms) | ratio | "
        f"target (<= {STEP_TARGET} steps, < {SECONDS_TARGET * 1000:.0f} ms) |",
        "|---|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        "Each step is one task to every pod: a `histogram` scan counting its values at or below 255 thresholds "
        "(per quantile searched), merged by addition at the modeller. A step cuts the interval that holds the "
        "answer 256-fold in the 64-bit order of doubles, so any double is pinned within 9 steps; a query's "
        "quantiles share the steps.",
        "",
        f"Targets: **{'met' if all(verdicts) else 'NOT met'}**.",
        "",
    ]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    main()
