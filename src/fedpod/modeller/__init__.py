"""The modeller: discovers datasets, sends tasks, merges results."""

from fedpod.modeller.client import Modeller

__all__ = ["Modeller"]
