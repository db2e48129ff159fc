"""Local differential privacy for a PyTorch plan's round: DP-SGD through Opacus.

Imported only when a round asks for it (Opacus loads a good part of its own machinery). The
plan's model is made Opacus-compatible for the round (an `nn.GRU` becomes Opacus's `DPGRU`,
whose parameters keep their names); a model whose fix would rename parameters (BatchNorm into
GroupNorm) is refused, since the global model could no longer be loaded into it.
"""

from __future__ import annotations

import contextlib
import copy
import secrets
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.privacy import PrivacyRound, local_mechanism
from fedpod.errors import ConfigError

if TYPE_CHECKING:
    from fedpod.algorithms.training.torch_plan import TorchTrainingPlan

# Noise comes from a generator seeded with the OS's entropy (below), which is what the first
# warning asks for; the second is PyTorch noting that input batches need no gradient.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def planned_steps(args: TrainingArgs, batches_per_epoch: int) -> int:
    """The optimizer steps the round will take (what the ledger is charged for, before training)."""
    if args.dry_run:
        return 1
    updates, epochs, batch_maxnum = args.local_budget()
    if updates is not None:
        return updates
    return epochs * min(batches_per_epoch, batch_maxnum or batches_per_epoch)


def _replace_unsupported(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        fixer = ModuleValidator.FIXERS.get(type(child))
        if fixer is not None:
            setattr(module, name, fixer(child))
        else:
            _replace_unsupported(child)


def compatible(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model (Opacus's hooks never touch the plan's own), with the layers Opacus
    cannot train per example replaced by ones it can. Copied in memory: Opacus's own fixer
    pickles the model, which fails for a plan compiled from approved source."""
    fixed = copy.deepcopy(model)
    _replace_unsupported(fixed)
    left = ModuleValidator.validate(fixed, strict=False)
    renamed = sorted(set(model.state_dict()) - set(fixed.state_dict()))
    if left or renamed:
        why = "; ".join(str(e) for e in left) or f"its parameters {renamed[:5]} would be renamed"
        raise ConfigError(f"local DP (DP-SGD) cannot train this model: {why}",
                          hint="use LayerNorm or GroupNorm instead of BatchNorm, or central DP (dp_args.type: central)")
    return fixed


@contextlib.contextmanager
def dp_sgd(plan: TorchTrainingPlan, loader: torch.utils.data.DataLoader[Any], args: TrainingArgs,
           privacy: PrivacyRound, device: str) -> Iterator[tuple[torch.optim.Optimizer, Any]]:
    """The optimizer and data loader of a DP-SGD round, the ledger charged before the first step.
    While it is open, `plan.model()` is the Opacus-compatible copy, so that the plan's own
    `training_step` feeds Opacus's per-example hooks; on leaving, its weights go back into the
    plan's model."""
    original = plan.model()
    private_model = compatible(original).to(device)
    plan.use_model(private_model)
    try:
        optimizer = plan.init_optimizer(args.optimizer_args)
        engine = PrivacyEngine(accountant="rdp")
        noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        _, private_optimizer, private_loader = engine.make_private(
            module=private_model, optimizer=optimizer, data_loader=loader, noise_multiplier=privacy.dp.sigma,
            max_grad_norm=privacy.dp.clip, noise_generator=noise, poisson_sampling=True)
        batches = len(private_loader)
        privacy.charge(local_mechanism(privacy.dp, batches, planned_steps(args, batches)), privacy.dp.delta)
        yield private_optimizer, private_loader
        trained = private_model.state_dict()
        original.load_state_dict({name: trained[name] for name in original.state_dict()})
    finally:
        plan.use_model(original)
