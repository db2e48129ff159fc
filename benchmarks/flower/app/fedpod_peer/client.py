"""Flower ClientApp: the same local work as a fedpod pod does in each benchmark."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    received = msg.content["arrays"]
    assert isinstance(received, ArrayRecord)
    params = {name: array.numpy() for name, array in received.items()}
    if context.run_config["task"] == "add-one":
        updated, samples = {name: values + 1 for name, values in params.items()}, 1
    else:
        from fedpod.algorithms.training.local import run_local_round
        from fedpod_peer.task import arguments, logistic_plan

        _, training_args = arguments(context.run_config)
        plan = logistic_plan(context.run_config, str(context.node_config["data"]))
        result = run_local_round(plan, params, training_args, {})
        updated, samples = result.params, result.num_samples
    reply = ArrayRecord({name: Array(np.ascontiguousarray(values)) for name, values in updated.items()})
    return Message(RecordDict({"arrays": reply, "metrics": MetricRecord({"num-examples": samples})}), reply_to=msg)
