"""PyTorch training plans and their local training loop (FedProx and Scaffold aware)."""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fedpod.aggregation.base import Params
from fedpod.aggregation.scaffold import CONTROL_DELTA
from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.plans import LocalResult, TrainingPlan
from fedpod.algorithms.training.privacy import PrivacyRound
from fedpod.errors import ConfigError


class TorchTrainingPlan(TrainingPlan):
    def __init__(self) -> None:
        super().__init__()
        self._model: torch.nn.Module | None = None

    def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define init_model(model_args)")

    def init_optimizer(self, optimizer_args: dict[str, Any]) -> torch.optim.Optimizer:
        """Default: Adam with `lr` (1e-3); `optimizer_args["name"]` picks another of OPTIMIZERS
        (plain SGD keeps no state: Adam's two moments cost a pod twice the model's memory), and
        the other arguments go to its constructor. Override for anything else."""
        args = {"lr": 1e-3, **optimizer_args}
        name = str(args.pop("name", "adam")).lower()
        if name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {name!r} in optimizer_args",
                              hint=f"choose one of {', '.join(sorted(OPTIMIZERS))}, or override init_optimizer")
        try:
            optimizer: torch.optim.Optimizer = OPTIMIZERS[name](self.model().parameters(), **args)
            return optimizer
        except TypeError as exc:
            raise ConfigError(f"optimizer_args do not fit {name}: {exc}") from exc

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define training_step(data, target)")

    def predict(self, data: torch.Tensor) -> torch.Tensor:
        """Scores used for validation metrics; override to return probabilities."""
        output: torch.Tensor = self.model()(data)
        return output

    def post_init(self, model_args: dict[str, Any], training_args: TrainingArgs) -> None:
        self.model_args = dict(model_args)
        self.training_args = training_args
        self._model = self.init_model(self.model_args)

    def model(self) -> torch.nn.Module:
        if self._model is None:
            raise ConfigError("the plan's model is not initialised yet (post_init was not called)")
        return self._model

    def use_model(self, model: torch.nn.Module) -> None:
        """Swap the module `model()` returns (DP-SGD trains an Opacus-compatible copy)."""
        self._model = model

    def get_params(self) -> Params:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model().state_dict().items()}

    def _params_as_arrays(self) -> Params:
        """The model's own memory seen as arrays (no copy): what a round returns (see
        `run_local_round(hand_over=...)`, which copies it for callers that keep the plan)."""
        return {k: v.detach().cpu().numpy() for k, v in self.model().state_dict().items()}

    def set_params(self, params: Params) -> None:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
        self.model().load_state_dict(state, strict=True)

    def adopt_params(self, params: Params) -> None:
        """The model's tensors become the given arrays where they can (writable, aligned, of
        the tensor's own dtype); the rest is copied. The model's initial tensors are freed."""
        current = self.model().state_dict()
        adopted: dict[str, torch.Tensor] = {}
        for key, value in params.items():
            array = np.asarray(value)
            target = current.get(key)
            shared = torch.from_numpy(array) if _shareable(array) else None
            if shared is None or target is None or shared.dtype != target.dtype or shared.shape != target.shape:
                shared = torch.from_numpy(np.array(array, order="C"))
            adopted[key] = shared
        self.model().load_state_dict(adopted, strict=True, assign=True)

    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        model = self.model()
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            scores = self.predict(torch.as_tensor(features, dtype=torch.float32, device=device))
        model.train()
        return np.asarray(scores.detach().cpu().numpy())

    def train_round(self, features: np.ndarray, target: np.ndarray, args: TrainingArgs,
                    round_config: dict[str, Any], device: str, state: dict[str, Params],
                    privacy: PrivacyRound | None = None) -> LocalResult:
        """`privacy`: DP-SGD for this round (local DP); the ledger is charged before the first step."""
        model = self.model().to(device)
        model.train()
        x = torch.as_tensor(features, dtype=torch.float32)
        y = torch.as_tensor(target)
        if y.is_floating_point():
            y = y.float()
        generator = torch.Generator()
        if privacy is not None:  # Poisson sampling must be secret from the modeller, who chose the seed
            generator.manual_seed(secrets.randbits(63))
        elif args.random_seed is not None:
            generator.manual_seed(args.random_seed)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=args.loader_args.batch_size,
            shuffle=args.loader_args.shuffle, drop_last=args.loader_args.drop_last, generator=generator)
        if len(loader) == 0:
            raise ConfigError("no training batch: the dataset is smaller than one batch with drop_last")
        mu = float(round_config.get("fedprox_mu", 0.0))
        scaffold = round_config.get("scaffold_control")
        # the starting point, kept only where the round needs it after steps (a model's worth of memory)
        global_weights = [p.detach().clone() for p in model.parameters()] if mu > 0 or scaffold is not None else []
        if privacy is not None and (mu > 0 or scaffold is not None):
            raise ConfigError("local DP (DP-SGD) cannot clip FedProx's or Scaffold's correction per example",
                              hint="use FedAvg-style aggregators with local DP, or central DP")
        corrections: list[torch.Tensor] | None = None
        names = [n for n, _ in model.named_parameters()]
        if scaffold is not None:
            if not args.uses_updates:
                raise ConfigError("Scaffold needs `num_updates` in training_args (the same step count on every pod)")
            own = state.setdefault("scaffold_ci", {n: np.zeros_like(scaffold[n]) for n in names})
            corrections = [torch.as_tensor(scaffold[n] - own[n], dtype=torch.float32, device=device) for n in names]
        losses: list[float] = []
        steps = 0
        started = time.perf_counter()
        with self._optimisation(loader, args, privacy, device) as (optimizer, batches):
            model = self.model()
            for data, labels in _batches(batches, args):
                steps += 1
                if len(labels) == 0:  # Poisson sampling drew no example: a step without data
                    continue
                data, labels = data.to(device), labels.to(device)
                optimizer.zero_grad()
                loss = self.training_step(data, labels)
                if mu > 0:
                    loss = loss + mu / 2 * sum(((p - g) ** 2).sum()
                                               for p, g in zip(model.parameters(), global_weights, strict=True))
                loss.backward()  # type: ignore[no-untyped-call]
                if corrections is not None:
                    for parameter, correction in zip(model.parameters(), corrections, strict=True):
                        if parameter.grad is not None:
                            parameter.grad += correction
                optimizer.step()
                if not torch.isfinite(loss):
                    raise ConfigError(f"training diverged at step {steps}: loss is {loss.item()}",
                                      hint="lower the learning rate")
                losses.append(float(loss.item()))
                if args.dry_run:
                    break
        extra: dict[str, Params] = {}
        if corrections is not None and scaffold is not None:
            lr = float(args.optimizer_args.get("lr", 1e-3))
            own = state["scaffold_ci"]
            new_params = dict(self.model().named_parameters())
            updated = {n: own[n] - scaffold[n]
                       + (global_weights[i].cpu().numpy() - new_params[n].detach().cpu().numpy()) / (steps * lr)
                       for i, n in enumerate(names)}
            extra[CONTROL_DELTA] = {n: updated[n] - own[n] for n in names}
            state["scaffold_ci"] = updated
        for parameter in self.model().parameters():
            parameter.grad = None  # a model's worth of gradients, not needed to send the result
        self.model().to("cpu")
        metrics = {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(steps),
                   "train_seconds": time.perf_counter() - started}
        return LocalResult(self._params_as_arrays(), len(x), metrics, extra)

    @contextlib.contextmanager
    def _optimisation(self, loader: torch.utils.data.DataLoader[Any], args: TrainingArgs,
                      privacy: PrivacyRound | None, device: str) -> Iterator[tuple[torch.optim.Optimizer, Any]]:
        """The round's optimizer and batches: the plan's own, or DP-SGD's under local DP."""
        if privacy is None:
            yield self.init_optimizer(args.optimizer_args), loader
            return
        from fedpod.algorithms.training.dp_sgd import dp_sgd  # Opacus loads only for DP rounds

        with dp_sgd(self, loader, args, privacy, device) as private:
            yield private


def _batches(loader: torch.utils.data.DataLoader[Any], args: TrainingArgs) -> Iterator[Any]:
    updates, epochs, batch_maxnum = args.local_budget()
    if updates is not None:
        yield from itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), updates)
        return
    for _ in range(epochs):
        yield from itertools.islice(loader, batch_maxnum)


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _shareable(array: np.ndarray) -> bool:
    """Whether a tensor may live in `array`'s memory: writable (it is trained in place), in C
    order, and aligned to its element size."""
    return bool(array.flags.writeable and array.flags.c_contiguous and array.flags.aligned)
