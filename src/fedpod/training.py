"""What a training plan imports: `from fedpod.training import TorchTrainingPlan, DataManager`."""

from fedpod.algorithms.training.plans import DataManager, TrainingPlan
from fedpod.algorithms.training.sklearn_plan import SKLearnTrainingPlan
from fedpod.algorithms.training.torch_plan import TorchTrainingPlan

__all__ = ["DataManager", "SKLearnTrainingPlan", "TorchTrainingPlan", "TrainingPlan"]
