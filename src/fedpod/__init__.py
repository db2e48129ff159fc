"""fedpod: federated data collaboration. Pods beside the data, a modeller, a NATS broker."""

__version__ = "0.1.0"

__all__ = ["__version__"]
