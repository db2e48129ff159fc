"""Benchmark: fedpod's exact aggregated SQL over 3 pods vs DuckDB on the pooled table.

    python -m benchmarks.sql.run            # rewrites benchmarks/sql/results.md

3 pods (separate processes, real NATS) x 1,000,000 rows each, a GROUP BY with AVG and
COUNT over 20 groups. fedpod's time is the whole modeller call (discovery, sending the
task, the pods' queries, replies, the merge); the reference is the same query in DuckDB
on one in-memory table holding all 3,000,000 rows. Runs alternate; medians are quoted.
Target: fedpod <= 1.5 x pooled + 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from benchmarks.report import machine, publish
from fedpod.data.datasets import DatasetSpec
from fedpod.modeller.client import Modeller
from fedpod.pod.local import pod_processes, wait_for_pods, write_pod
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

HERE = Path(__file__).parent
PODS = ["alice", "bob", "charlie"]
QUERY = "SELECT grp, AVG(value) AS mean_value, COUNT(*) AS n FROM measurements GROUP BY grp ORDER BY grp"


def make_data(folder: Path, rows: int) -> list[Path]:
    connection = duckdb.connect()
    files = []
    for index, pod in enumerate(PODS):
        path = folder / f"{pod}.parquet"
        connection.execute(
            f"COPY (SELECT (hash(i + {index * rows}) % 20)::INTEGER AS grp, "
            f"(hash(i * 7 + {index}) % 100000) / 1000.0 + {index} AS value, (i % 90)::INTEGER AS age "
            f"FROM range({rows}) t(i)) TO '{path}' (FORMAT parquet)")
        files.append(path)
    return files


@contextlib.contextmanager
def federation(rows: int, name: str) -> Iterator[tuple[Modeller, list[str], duckdb.DuckDBPyConnection]]:
    """3 pods as processes on a real NATS broker, each serving `rows` rows of `measurements`; the
    modeller connected to them, their datasets' identifiers, and DuckDB holding the pooled rows."""
    work = Path(tempfile.mkdtemp(prefix=f"fedpod-bench-{name}-"))
    files = make_data(work, rows)
    modeller_identity = Identity.generate("modeller")
    modeller_identity.save(work / "keys")
    pooled = duckdb.connect()
    pooled.execute("CREATE TABLE measurements AS SELECT * FROM read_parquet(?)", [[str(f) for f in files]])
    with EmbeddedBroker() as broker:
        configs = [write_pod(work / pod, pod, broker, [DatasetSpec(name="measurements", kind="parquet",
                                                                   path=str(file))], [modeller_identity])
                   for pod, file in zip(PODS, files, strict=True)]
        with pod_processes(configs, work / "logs") as processes, \
                Modeller(modeller_identity, broker=broker.url, keystore=work / "keys") as modeller:
            wait_for_pods(modeller, set(PODS), processes, deadline_s=120)
            yield modeller, [f"{p}/measurements" for p in PODS], pooled


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per pod")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    with federation(args.rows, "sql") as (modeller, identifiers, pooled):
        federated_s, pooled_s = [], []
        expected = pooled.sql(QUERY).df()
        for run in range(args.runs + 1):
            started = time.perf_counter()
            merged = modeller.sql(QUERY, datasets=identifiers, aggregate=True)
            federated = time.perf_counter() - started
            started = time.perf_counter()
            pooled.sql(QUERY).df()
            central = time.perf_counter() - started
            if run == 0:  # warm-up
                assert merged["n"].tolist() == expected["n"].tolist()  # type: ignore[index]
                continue
            federated_s.append(federated)
            pooled_s.append(central)

    fed, ref = statistics.median(federated_s), statistics.median(pooled_s)
    target = 1.5 * ref + 0.100
    lines = [
        "# Federated SQL vs pooled DuckDB",
        "",
        f"`python -m benchmarks.sql.run` — {len(PODS)} pods x {args.rows:,} rows (Parquet, loaded by each pod), "
        f"query `{QUERY}`; {args.runs} runs after one warm-up, medians. Machine: {machine()}, "
        f"DuckDB {duckdb.__version__}.",
        "",
        "| path | median (ms) | min (ms) | max (ms) |",
        "|---|---:|---:|---:|",
        f"| fedpod exact aggregate over 3 pods (NATS, envelopes, merge) | {fed * 1000:.1f} | "
        f"{min(federated_s) * 1000:.1f} | {max(federated_s) * 1000:.1f} |",
        f"| DuckDB on the pooled in-memory table | {ref * 1000:.1f} | {min(pooled_s) * 1000:.1f} | "
        f"{max(pooled_s) * 1000:.1f} |",
        "",
        f"Ratio fedpod / pooled: **{fed / ref:.2f}x**. Target (1.5 x pooled + 100 ms = {target * 1000:.0f} ms): "
        f"**{'met' if fed <= target else 'NOT met'}** ({fed * 1000:.0f} ms).",
        "",
    ]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    main()
