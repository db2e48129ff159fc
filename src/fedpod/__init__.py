"""fedpod: federated data collaboration. Pods beside the data, a modeller, a NATS broker."""

__version__ = "0.1.0"

from fedpod.modeller.client import Modeller  # noqa: E402 - the public entry point

__all__ = ["Modeller", "__version__"]
