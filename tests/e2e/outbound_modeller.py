"""The modeller's host in `test_outbound_only`: the demo's two SQL queries and its training
(FedAvg rounds against central training), run against the broker's address only, printing what
came back as JSON. The pods' rows are synthetic, so this host regenerates them from the seed
for the centralised reference, as `fedpod demo` does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console

from fedpod.cli.demo import AGGREGATE_QUERY, PER_DATASET_QUERY
from fedpod.cli.demo_training import run_training
from fedpod.data.synth import generate
from fedpod.modeller.client import Modeller


def main(broker: str, keystore: Path, out: Path, patients: int, seed: int, identifiers: list[str]) -> None:
    with Modeller("modeller", broker=broker, keystore=keystore, timeout_s=60) as modeller:
        per_dataset = modeller.sql(PER_DATASET_QUERY, datasets=identifiers)
        aggregate = modeller.sql(AGGREGATE_QUERY, datasets=identifiers, aggregate=True)
        assert isinstance(per_dataset, dict) and isinstance(aggregate, pd.DataFrame)
        pooled = pd.concat([c.patients for c in generate(3, patients, seed)])
        holdout = pd.concat([c.patients for c in generate(3, 600, seed + 1000)])
        training = run_training(modeller, identifiers, pooled, holdout, out, Console(quiet=True))
    print(json.dumps({"per_dataset": {k: v.to_dict("list") for k, v in per_dataset.items()},
                      "aggregate": aggregate.to_dict("list"), "training": training}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
