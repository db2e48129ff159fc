"""What a training plan imports: `from fedpod.training import TorchTrainingPlan, DataManager`.

The framework base classes load on first use, so a plan that needs neither PyTorch nor
scikit-learn keeps the pod free of both (a pod's memory is mostly its imports).
"""

from typing import TYPE_CHECKING, Any

from fedpod.algorithms.training.plans import DataManager, TrainingPlan

if TYPE_CHECKING:
    from fedpod.algorithms.training.sklearn_plan import SKLearnTrainingPlan
    from fedpod.algorithms.training.torch_plan import TorchTrainingPlan

__all__ = ["DataManager", "SKLearnTrainingPlan", "TorchTrainingPlan", "TrainingPlan"]


def __getattr__(name: str) -> Any:
    if name == "TorchTrainingPlan":
        from fedpod.algorithms.training.torch_plan import TorchTrainingPlan

        return TorchTrainingPlan
    if name == "SKLearnTrainingPlan":
        from fedpod.algorithms.training.sklearn_plan import SKLearnTrainingPlan

        return SKLearnTrainingPlan
    raise AttributeError(f"module 'fedpod.training' has no attribute {name!r}")
