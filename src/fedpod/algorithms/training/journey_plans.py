"""Built-in models for patient journeys (events datasets): they need no approval at pods.

Both read the pod's events and static tables and build the temporal tensor with
`fedpod.journeys.to_tensor` from `model_args`:

- `codes` (required): the vocabulary, in feature order, agreed across pods beforehand
  (`fedpod.modeller.vocabulary.federated_vocabulary`; `Experiment` does it when it is missing)
  — a pod never picks its own, so feature j means the same code everywhere;
- `target`: a static column or SQL expression over the static table (e.g. `"gender = 'F'"`);
- `bin_size` ("360D"), `max_bins` (10), `anchor` ("first_event", a date, or a static date
  column), `aggregate` ("count"), `log_counts` (true: log(1 + count), which keeps a
  frequently measured code from swamping the rest).

`journey_mlp` is the tutorial's model: an MLP over the time-averaged tensor, behind a LayerNorm
that rescales each patient's code profile. The averaged features differ in scale by two orders of
magnitude (a code measured at every visit against a rare one) and in level between centres;
without the LayerNorm the federated MLP needed three times the rounds of the centralised one to
reach its AUC. A LayerNorm keeps no running statistics, so FedAverage mixes it like any other
layer (a BatchNorm's would be averaged across centres meaning nothing). `journey_gru` runs
a GRU over the time bins; a bin without any event leaves the hidden state as it was (masking),
so a gap of a year and no gap read alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedpod.algorithms.training.builtin import ClassLogits, check_classes, given_dataset, mlp, n_classes
from fedpod.algorithms.training.plans import DataManager
from fedpod.errors import ConfigError
from fedpod.journeys import target, to_tensor


def journey_tensor(events: Any, static: Any, model_args: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    codes = model_args.get("codes")
    if not codes:
        raise ConfigError("journey models need model_args['codes'], the vocabulary agreed across pods",
                          hint="fedpod.modeller.vocabulary.federated_vocabulary(...) computes it; Experiment does "
                               "when it is missing")
    if not model_args.get("target"):
        raise ConfigError("journey models need model_args['target']: a static column or expression")
    tensor = to_tensor(events, static, codes=list(codes), bin_size=model_args.get("bin_size", "360D"),
                       max_bins=int(model_args.get("max_bins", 10)), anchor=model_args.get("anchor", "first_event"),
                       aggregate=model_args.get("aggregate", "count"),
                       id_column=model_args.get("id_column", "patient_id"),
                       time_column=model_args.get("time_column", "timestamp"),
                       code_column=model_args.get("code_column", "code")).tensor
    if model_args.get("log_counts", True) and model_args.get("aggregate", "count") == "count":
        tensor = np.log1p(tensor)
    labels = target(static, str(model_args["target"])).astype(np.float64)
    return tensor, labels


def vocabulary_size(model_args: dict[str, Any]) -> int:
    """1 (a placeholder) until the vocabulary is agreed: Experiment builds its plan first, then
    rebuilds it with the agreed codes."""
    return max(1, len(model_args.get("codes") or ()))


class JourneyData:
    model_args: dict[str, Any]
    time_averaged = False
    needs_vocabulary = True  # Experiment agrees `codes` by federated count when they are not given

    def training_data(self) -> DataManager:
        handle = given_dataset(self)
        tensor, labels = journey_tensor(handle.to_pandas(), handle.static(), self.model_args)
        check_classes(labels, n_classes(self.model_args), str(self.model_args["target"]), handle.name)
        features = tensor.mean(axis=1) if self.time_averaged else tensor
        return DataManager(features.astype(np.float32), labels)


class JourneyMLP(JourneyData, ClassLogits):
    time_averaged = True

    def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
        width = vocabulary_size(model_args)
        return torch.nn.Sequential(torch.nn.LayerNorm(width),
                                   mlp(width, model_args.get("hidden", [32]), self.outputs(model_args)))


class MaskedGRU(torch.nn.Module):
    """A GRU over time bins that skips empty bins, then a linear head on the last state."""

    def __init__(self, features: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(features, hidden)
        self.head = torch.nn.Linear(hidden, outputs)
        self.hidden = hidden

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        state = bins.new_zeros(bins.shape[0], self.hidden)
        for step in range(bins.shape[1]):
            observed = bins[:, step]
            present = (observed.abs().sum(dim=1, keepdim=True) > 0).to(bins.dtype)
            state = present * self.cell(observed, state) + (1 - present) * state
        logits: torch.Tensor = self.head(state)
        return logits


class JourneyGRU(JourneyData, ClassLogits):
    def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
        return MaskedGRU(vocabulary_size(model_args), int(model_args.get("hidden_size", 32)), self.outputs(model_args))
