"""fedpod: federated data collaboration. Pods beside the data, a modeller, a NATS broker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpod.modeller.client import Modeller

__version__ = "0.1.0"
__all__ = ["Experiment", "FedAverage", "Modeller", "__version__"]

if TYPE_CHECKING:
    from fedpod.aggregation import FedAverage
    from fedpod.modeller.experiment import Experiment


def __getattr__(name: str) -> Any:
    """Training names load PyTorch; import them only when asked for (a pod serving SQL never is)."""
    if name == "Experiment":
        from fedpod.modeller.experiment import Experiment

        return Experiment
    if name == "FedAverage":
        from fedpod.aggregation import FedAverage

        return FedAverage
    raise AttributeError(f"module 'fedpod' has no attribute {name!r}")
