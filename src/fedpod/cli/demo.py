"""`fedpod demo`: the whole story on one machine, with no setup.

A local NATS broker, three synthetic hospitals served by three pods running as separate
processes, and a modeller that runs a federated SQL query per dataset and aggregated. The
aggregated answer is checked against the same query on the pooled rows, which only the
demo can see because it generated the data. Everything is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from rich.console import Console

from fedpod.algorithms.sql.dialect import parse_statement, to_duckdb
from fedpod.data.catalog import inspect
from fedpod.data.datasets import DatasetSpec
from fedpod.data.synth import generate, write
from fedpod.errors import FedpodError
from fedpod.modeller.client import Modeller
from fedpod.pod.local import pod_processes, wait_for_pods, write_pod
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker

DATASET = "ehr-records-2025"
PER_DATASET_QUERY = (f"SELECT sex, COUNT(*) AS patients, AVG(age) AS mean_age FROM `{DATASET}` "
                     "GROUP BY sex ORDER BY sex")
AGGREGATE_QUERY = (f"SELECT smoker, COUNT(*) AS patients, AVG(age) AS mean_age, STDDEV(bmi) AS sd_bmi, "
                   f"MIN(age) AS min_age, MAX(age) AS max_age, AVG(outcome) AS event_rate FROM `{DATASET}` "
                   "WHERE age >= 18 GROUP BY smoker ORDER BY smoker")


def prepare_pod(folder: Path, name: str, broker: EmbeddedBroker | str, data: Path, modeller: Identity) -> Path:
    """Write a pod folder (identity, config with one dataset, the modeller accepted), and let
    the pod and the modeller in to the broker (given the broker itself, not a URL)."""
    spec = inspect(DatasetSpec(name=DATASET, kind="csv", path=str(data.resolve()), tags=["ehr", "synthetic"],
                               description=f"synthetic patients of {name}"), folder)
    return write_pod(folder, name, broker, [spec], [modeller], heartbeat_s=1.0)


def pooled(query: str, files: list[Path]) -> pd.DataFrame:
    """The centralised reference: the same query over all centres' rows in one table."""
    connection = duckdb.connect(":memory:")
    union = " UNION ALL ".join(f"SELECT * FROM read_csv('{f}')" for f in files)
    connection.execute(f'CREATE TABLE "{DATASET}" AS {union}')
    result: pd.DataFrame = connection.sql(to_duckdb(parse_statement(query))).df()
    return result


def frames_agree(left: pd.DataFrame, right: pd.DataFrame) -> bool:
    if list(left.columns) != list(right.columns) or left.shape != right.shape:
        return False
    for column in left.columns:
        a, b = left[column].to_numpy(), right[column].to_numpy()
        if pd.api.types.is_numeric_dtype(left[column]) and pd.api.types.is_numeric_dtype(right[column]):
            if not np.allclose(a.astype(float), b.astype(float), rtol=1e-9, atol=1e-9, equal_nan=True):
                return False
        elif list(map(str, a)) != list(map(str, b)):
            return False
    return True


def run_demo(out: Path, *, patients: int, seed: int, console: Console) -> None:
    from fedpod.cli.app import print_frame

    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    results = out / "results"
    results.mkdir(parents=True)
    keystore = out / "keys"
    modeller_identity = Identity.generate("modeller")
    modeller_identity.save(keystore)
    centres = generate(3, patients, seed)
    folders = write(centres, out / "data")
    console.rule("[bold]fedpod demo")
    console.print(f"generated {patients} synthetic patients over {len(centres)} centres "
                  f"({', '.join(f'{c.name}: {len(c.patients)}' for c in centres)})")
    with EmbeddedBroker() as broker:
        console.print(f"NATS broker (JetStream) on {broker.url}; only its three pods and the modeller may "
                      "connect (nkeys)")
        configs = [prepare_pod(out / "pods" / c.name, c.name, broker, f / "patients.csv", modeller_identity)
                   for c, f in zip(centres, folders, strict=True)]
        with pod_processes(configs, out / "logs") as processes, \
                Modeller(modeller_identity, broker=broker.url, keystore=keystore,
                         known_pods=keystore.parent / "known_pods.json") as modeller:
            wait_for_pods(modeller, {c.name for c in centres}, processes)
            console.print(f"3 pods up as separate processes (pids {', '.join(str(p.pid) for p in processes)}), "
                          f"after {time.perf_counter() - started:.1f}s")
            identifiers = [f"{c.name}/{DATASET}" for c in centres]

            console.rule("federated SQL, one result per dataset")
            console.print(f"[dim]{PER_DATASET_QUERY}[/dim]", highlight=False)
            per_dataset = modeller.sql(PER_DATASET_QUERY, datasets=identifiers)
            assert isinstance(per_dataset, dict)
            for identifier, frame in per_dataset.items():
                file = results / (identifier.replace("/", "__") + ".csv")
                frame.to_csv(file, index=False)
                print_frame(frame, identifier)

            console.rule("federated SQL, one exact global result")
            console.print(f"[dim]{AGGREGATE_QUERY}[/dim]", highlight=False)
            aggregated = modeller.sql(AGGREGATE_QUERY, datasets=identifiers, aggregate=True)
            assert isinstance(aggregated, pd.DataFrame)
            reference = pooled(AGGREGATE_QUERY, [f / "patients.csv" for f in folders])
            aggregated.to_csv(results / "aggregate.csv", index=False)
            reference.to_csv(results / "pooled.csv", index=False)
            print_frame(aggregated, "federated (exact merge of per-pod partials)")
            print_frame(reference, "pooled data (centralised, for comparison)")
            agree = frames_agree(aggregated, reference)
            if agree:
                console.print("[green]✓ federated result equals the pooled result[/green]")

            console.rule("federated training vs centralised training")
            from fedpod.cli.demo_training import ROUNDS, run_training

            console.print(f"logistic regression, {ROUNDS} rounds of FedAvg over the three pods; the same model "
                          "trained centrally on the pooled rows; both scored on held-out patients")
            holdout = pd.concat([c.patients for c in generate(3, max(600, patients // 3), seed + 1000)])
            pooled_rows = pd.concat([c.patients for c in centres])
            training = run_training(modeller, identifiers, pooled_rows, holdout, out, console)
            comparison = pd.DataFrame([{"model": name, **values} for name, values in training.items()])
            comparison.to_csv(results / "training.csv", index=False)
            print_frame(comparison, "held-out patients")
    seconds = time.perf_counter() - started
    summary = {"patients": patients, "seed": seed, "centres": [c.name for c in centres],
               "federated_equals_pooled": agree, "training": training, "seconds": round(seconds, 2)}
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    if not agree:
        raise FedpodError("the federated result differs from the pooled result", where=str(results))
    ratio = training["federated"]["auc"] / training["centralised"]["auc"]
    console.print(f"federated AUC is {ratio:.1%} of the centralised AUC; results in {results} ({seconds:.1f}s)")
