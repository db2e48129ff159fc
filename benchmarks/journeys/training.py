"""Federated vs centralised training on patient journeys, and the GRU vs the time-averaged MLP:
the tutorial's stage B (three pods as processes, agreed vocabulary, FedAverage) against the same
model trained on the pooled tensors with as many updates, both scored on new patients.

    python -m benchmarks.journeys.training [--patients 3000] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.report import machine, publish
from fedpod.cli.demo_journeys import ROUNDS, UPDATES, stage_b
from fedpod.data.journeys import generate_journeys, write_journeys

HERE = Path(__file__).parent
MODELS = ("journey_mlp", "journey_gru")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpod-bench-journeys-"))
    scores: dict[str, list[tuple[float, float]]] = {model: [] for model in MODELS}
    for seed in range(1, args.seeds + 1):
        centres = generate_journeys(3, args.patients, seed)
        folders = write_journeys(centres, work / f"data-{seed}", "parquet")
        for model in MODELS:
            result = stage_b(centres, folders, work / f"{model}-{seed}", model, "diabetes_next_year")
            scores[model].append((result["holdout_auc"]["federated"], result["holdout_auc"]["centralised"]))
    lines = [
        "# Patient journeys: federated vs centralised training",
        "",
        f"`python -m benchmarks.journeys.training` — 3 pods (processes) x {args.patients // 3:,} patients from "
        f"`fedpod data synth --journeys`, target `diabetes_next_year`, 8 bins of 180 days back from the index "
        f"date, 30 codes agreed by federated count; {ROUNDS} FedAverage rounds of {UPDATES} updates per pod vs the "
        f"same model trained on the pooled tensors with as many updates; AUC on new patients of all three centres; "
        f"medians over {args.seeds} seeds (the ratio: the median of each seed's ratio). Machine: {machine()}.",
        "",
        "| model | federated AUC | centralised AUC | federated / centralised |",
        "|---|---:|---:|---:|",
    ]
    ratios = {}
    for model in MODELS:
        federated = statistics.median(f for f, _ in scores[model])
        central = statistics.median(c for _, c in scores[model])
        ratios[model] = statistics.median(f / c for f, c in scores[model])
        lines.append(f"| `{model}` | {federated:.3f} | {central:.3f} | {ratios[model]:.3f} |")
    gru, mlp = (statistics.median(f for f, _ in scores[m]) for m in ("journey_gru", "journey_mlp"))
    lines += ["", f"Target federated >= 0.98 x centralised: **{'met' if min(ratios.values()) >= 0.98 else 'NOT met'}** "
              f"(lowest ratio {min(ratios.values()):.3f}). The GRU over time bins vs the time-averaged MLP: "
              f"AUC {gru:.3f} vs {mlp:.3f}.", ""]
    publish(HERE / "training.md", lines)


if __name__ == "__main__":
    main()
