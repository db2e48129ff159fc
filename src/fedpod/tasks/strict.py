"""Every key a task file may hold, checked before anything else reads the file.

A misspelled key (`save_locaton`) must not be ignored, nor surface as a message about some
other key it made look missing: the first check names the key, where it is in the file, and the
nearest valid key. Aggregator arguments depend on the aggregator chosen and are checked where
it is built (`aggregation.base.aggregator_from_config`), with the same kind of message.
"""

from __future__ import annotations

import difflib
from typing import Any

from fedpod.errors import ConfigError

Schema = dict[str, "Schema | None"]  # None: a value (of any shape) whose keys are not ours to check
FREE = None
# The built-in models' own arguments a task file may give under `model:` — the tabular models'
# shape, and the journey models' tensor (`fedpod.algorithms.training.journey_plans`).
MODEL_ARGUMENTS = ("n_classes", "hidden", "hidden_size", "codes", "top_k", "bin_size", "max_bins", "anchor",
                   "aggregate", "log_counts")

ALGORITHM: Schema = {
    "name": FREE,
    "arguments": {"query": FREE},
    "model": {"name": FREE, **dict.fromkeys(MODEL_ARGUMENTS, FREE),
              "bitfount_model": {"model_ref": FREE, "model_version": FREE, "username": FREE}},
    "hyperparameters": {"steps": FREE, "epochs": FREE, "batch_size": FREE, "learning_rate": FREE,
                        "random_seed": FREE},
}
TASK_FILE: Schema = {
    "pods": {"identifiers": FREE, "tags": FREE},
    "modeller": {"identity_verification_method": FREE, "private_key_file": FREE, "username": FREE},
    "task": {
        "protocol": {"name": FREE, "arguments": {"save_location": FREE, "steps_between_parameter_updates": FREE,
                                                 "epochs_between_parameter_updates": FREE}},
        "algorithm": ALGORITHM,  # or a list of them
        "aggregator": FREE,
        "data_structure": {"table_config": {"table": FREE}, "assign": {"target": FREE},
                           "select": {"include": FREE, "exclude": FREE}, "schema_requirements": FREE},
    },
}


def unknown_key(key: object, path: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f"did you mean `{near[0]}`?" if near else f"valid keys there: {', '.join(valid)}"
    return ConfigError(f"unknown key `{key}` at {path or 'the top level'}", where=where, hint=hint)


def check_keys(value: Any, where: str, schema: Schema = TASK_FILE, path: str = "") -> None:
    """Raise ConfigError for the first key that `schema` does not know (a list is checked item by item)."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            check_keys(item, where, schema, f"{path}[{index}]")
        return
    if not isinstance(value, dict):
        return  # a wrong type is the validator's to report, with the field's name
    for key, item in value.items():
        if key not in schema:
            raise unknown_key(key, path, list(schema), where)
        child = schema[key]
        if child is not None:
            check_keys(item, where, child, f"{path}.{key}" if path else str(key))
