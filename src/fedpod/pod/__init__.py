"""The pod: a long-running service beside the data."""
