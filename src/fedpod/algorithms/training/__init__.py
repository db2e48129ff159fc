"""Federated model training: training arguments, training plans, and one local round at a pod."""
