"""Global standardisation for the built-in tabular models: every feature's mean and standard
deviation over all the datasets of a task, computed exactly with federated SQL (nothing but
those two numbers per feature leaves a pod), so that every pod scales its rows the same way."""

from __future__ import annotations

from typing import Any

import pandas as pd

from fedpod.modeller.client import Modeller
from fedpod.modeller.discovery import Target

NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
           "FLOAT", "DOUBLE", "DECIMAL", "BOOLEAN")



def numeric_features(target: Target, model_args: dict[str, Any]) -> list[str]:
    if model_args.get("features"):
        return list(model_args["features"])
    excluded = {model_args["target"], *model_args.get("exclude", [])}
    return [c for c, kind in target.dataset.columns.items() if c not in excluded and kind.startswith(NUMERIC)]


def global_standardisation(modeller: Modeller, targets: list[Target], features: list[str]) -> dict[str, Any]:
    def quoted(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    columns = ", ".join(f"AVG(CAST({quoted(f)} AS DOUBLE)) AS m{i}, STDDEV_POP(CAST({quoted(f)} AS DOUBLE)) AS s{i}"
                        for i, f in enumerate(features))
    row = modeller.sql(f"SELECT {columns} FROM {quoted(targets[0].dataset.name)}",
                       datasets=[t.identifier for t in targets], aggregate=True)
    assert isinstance(row, pd.DataFrame)
    return {"features": features, "feature_means": [float(row[f"m{i}"][0]) for i in range(len(features))],
            "feature_stds": [float(row[f"s{i}"][0]) for i in range(len(features))]}
