"""The benchmark's training plan: "training" is w + 1, so a round measures pure overhead
(transport, encryption, serialisation, aggregation), as in FIELD-NOTES' Flower measurement.
A pod whose data file has a `drop_out` column fails its training step: a dropout after the
secure-aggregation key exchange (benchmarks/secagg)."""

from pathlib import Path

import numpy as np

from fedpod.algorithms.training.plans import LocalResult
from fedpod.training import DataManager, TrainingPlan

ROWS = 20


class AddOne(TrainingPlan):
    def post_init(self, model_args, training_args):
        self.model_args = dict(model_args)
        self.training_args = training_args
        self.params = {"w": np.zeros(int(model_args["parameters"]), dtype=np.float32)}

    def model(self):
        return self.params

    def get_params(self):
        return dict(self.params)

    def set_params(self, params):
        self.params = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}

    def predict_scores(self, features):
        return np.zeros(len(features))

    def training_data(self):  # as many rows as each pod's data file: no fewer than its min_group_size
        return DataManager(np.zeros((ROWS, 1), dtype=np.float32), np.zeros(ROWS))

    def train_round(self, features, target, args, round_config, device, state):
        if self.dataset_path is not None and "drop_out" in Path(self.dataset_path).read_text():
            raise RuntimeError("this pod drops out, as the benchmark asked")
        return LocalResult({"w": self.params["w"] + 1}, 1, {"loss": 0.0}, {})
