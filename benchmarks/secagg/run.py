"""What secure aggregation costs per round: the rounds benchmark's federation (pods as processes,
"training" is w + 1, so a round is pure overhead) with plain FedAvg and with secure aggregation,
in one run, for 3 and 10 pods and a 1,000- and a 10M-parameter (40 MB) model.

    python -m benchmarks.secagg.run [--rounds 5]     # rewrites benchmarks/secagg/results.md

Under secure aggregation each round adds three exchanges (keys, shares, unmasking) and, per pod,
one AES-CTR mask expansion per neighbour plus its own; the modeller expands one self mask per
pod. Both runs end with the exact model (FedAvg of w + 1 adds one per round; the fixed-point
encoding of 1.0 is exact). Medians over the rounds after the first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.report import machine, publish
from benchmarks.rounds.run import time_rounds

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpod-bench-secagg-"))
    lines = [
        "# Secure aggregation: seconds per round, plain vs secure",
        "",
        f"`python -m benchmarks.secagg.run` — pods as processes on the embedded NATS broker (authenticated), "
        f"FedAvg of w + 1, {args.rounds} rounds, median seconds per round after the first; plain and secure "
        f"in the same run. Machine: {machine()}.",
        "",
        "| pods | parameters | plain (s) | secure (s) | secure / plain |",
        "|---:|---:|---:|---:|---:|",
    ]
    for pods in (3, 10):
        for parameters in (1_000, 10_000_000):
            plain = statistics.median(time_rounds(pods, parameters, args.rounds, work / f"plain-{pods}-{parameters}"))
            secure = statistics.median(time_rounds(pods, parameters, args.rounds, work / f"secure-{pods}-{parameters}",
                                                   secagg=True))
            lines.append(f"| {pods} | {parameters:,} | {plain:.3f} | {secure:.3f} | {secure / plain:.1f}x |")
            print(lines[-1], flush=True)
    lines += ["", "The secure rows carry the same model: the benchmark checks the final parameters exactly.", ""]
    publish(HERE / "results.md", lines)


if __name__ == "__main__":
    main()
