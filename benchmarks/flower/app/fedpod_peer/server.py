"""Flower ServerApp: FedAvg over every node, no federated evaluation; it writes a timestamp
after each round (through the strategy's evaluate_fn hook) and the final weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.numpy import save_file

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    out = Path(str(config["out"]))
    nodes = int(config["nodes"])
    if config["task"] == "add-one":
        initial = {"w": np.zeros(int(config["parameters"]), dtype=np.float32)}
    else:
        from fedpod_peer.task import logistic_plan

        initial = logistic_plan(config, None).get_params()
    stamps: list[float] = []

    def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        stamps.append(time.time())
        (out / "rounds.json").write_text(json.dumps(stamps))
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    result = strategy.start(grid, ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in initial.items()}),
                            num_rounds=int(config["rounds"]), evaluate_fn=stamp)
    save_file({name: array.numpy() for name, array in result.arrays.items()}, str(out / "final.safetensors"))
