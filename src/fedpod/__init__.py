"""fedpod: federated data collaboration. Pods beside the data, a modeller, a NATS broker."""

__version__ = "0.1.0"

from fedpod.modeller.client import Modeller

__all__ = ["Modeller", "__version__"]
