"""Server-side aggregation: pure functions over parameter dicts, and the aggregators that use them.

An aggregator is a small class with two hooks (see `base.Aggregator`): what to add to each
round's training instructions, and how to combine the round's replies into the next global
parameters. The maths live in module-level functions that several aggregators share, so an
aggregator is tested by handing it a list of replies, and a variant's diff is what its paper
changes. Aggregators register by name and round-trip through `get_config`/`from_config`, so
a task sent over the wire can say `{"name": "fedadam", "lr": 0.01}`.
"""

from fedpod.aggregation.base import Aggregator, Params, Reply, aggregator_from_config, registered_aggregators
from fedpod.aggregation.fedavg import FedAverage, FedProx
from fedpod.aggregation.fedopt import FedAdagrad, FedAdam, FedYogi
from fedpod.aggregation.robust import CoordinateMedian, TrimmedMean
from fedpod.aggregation.scaffold import Scaffold

__all__ = [
    "Aggregator", "CoordinateMedian", "FedAdagrad", "FedAdam", "FedAverage", "FedProx", "FedYogi", "Params",
    "Reply", "Scaffold", "TrimmedMean", "aggregator_from_config", "registered_aggregators",
]
