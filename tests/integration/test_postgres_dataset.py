"""A PostgreSQL-backed dataset, against a real PostgreSQL server."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import psycopg
import pytest

from fedpod.data.datasets import DatasetSpec
from fedpod.modeller.client import Modeller
from fedpod.security.identity import Identity
from fedpod.transport.broker import EmbeddedBroker
from tests.conftest import PodFactory, PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_postgres_dataset_answers_exact_federated_queries(postgres: PostgresServer, pod_factory: PodFactory,
                                                          tmp_path: Path, modeller_identity: Identity,
                                                          keystore: Path, broker: EmbeddedBroker) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS visits")
        connection.execute("CREATE TABLE visits (id serial PRIMARY KEY, ward text, los_days double precision)")
        connection.execute("INSERT INTO visits (ward, los_days) SELECT CASE WHEN g % 3 = 0 THEN 'icu' ELSE 'gen' END,"
                           " (g % 17) * 0.5 FROM generate_series(1, 500) AS g")
    csv = tmp_path / "visits.csv"
    pd.DataFrame({"id": range(1000, 1100), "ward": ["icu", "gen"] * 50,
                  "los_days": [i * 0.25 for i in range(100)]}).to_csv(csv, index=False)
    pod_factory("pg", [DatasetSpec(name="visits", type="postgres", dsn=postgres.dsn, table="visits", tags=["v"])],
                [modeller_identity])
    pod_factory("files", [DatasetSpec(name="visits", type="csv", path=str(csv), tags=["v"])], [modeller_identity])
    query = ("SELECT ward, COUNT(*) AS n, AVG(los_days) AS mean_los, VAR_SAMP(los_days) AS v FROM visits "
             "GROUP BY ward ORDER BY ward")
    with Modeller(modeller_identity, broker=broker.url, keystore=keystore, timeout_s=20) as modeller:
        merged = modeller.sql(query, tags=["v"], aggregate=True)
    with psycopg.connect(postgres.dsn) as connection:
        rows = connection.execute("SELECT ward, los_days FROM visits").fetchall()
    pooled = pd.concat([pd.DataFrame(rows, columns=["ward", "los_days"]), pd.read_csv(csv)[["ward", "los_days"]]])
    expected = pooled.groupby("ward")["los_days"].agg(["count", "mean", "var"]).reset_index()
    assert isinstance(merged, pd.DataFrame)
    assert merged["ward"].tolist() == expected["ward"].tolist()
    assert merged["n"].tolist() == expected["count"].tolist()
    assert merged["mean_los"].tolist() == pytest.approx(expected["mean"].tolist(), rel=1e-12)
    assert merged["v"].tolist() == pytest.approx(expected["var"].tolist(), rel=1e-9)
