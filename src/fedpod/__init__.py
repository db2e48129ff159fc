"""fedpod: federated data collaboration. Pods beside the data, a modeller, a NATS broker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Experiment", "FedAverage", "Modeller", "__version__"]

if TYPE_CHECKING:
    from fedpod.aggregation import FedAverage
    from fedpod.modeller.client import Modeller
    from fedpod.modeller.experiment import Experiment


def __getattr__(name: str) -> Any:
    """The modeller's names load pandas, PyTorch and more; a pod never asks for them, so its
    memory stays that of what it actually runs."""
    if name == "Modeller":
        from fedpod.modeller.client import Modeller

        return Modeller
    if name == "Experiment":
        from fedpod.modeller.experiment import Experiment

        return Experiment
    if name == "FedAverage":
        from fedpod.aggregation import FedAverage

        return FedAverage
    raise AttributeError(f"module 'fedpod' has no attribute {name!r}")
