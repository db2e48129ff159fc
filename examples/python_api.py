"""The same federated SQL from Python. Start pods first (see the README's tour)."""

from fedpod import Modeller

with Modeller("modeller", broker="nats://127.0.0.1:4222") as modeller:
    print(modeller.datasets())
    pooled = modeller.sql(
        "SELECT sex, COUNT(*) AS n, AVG(age) AS mean_age FROM `ehr-records-2025` GROUP BY sex ORDER BY sex",
        datasets=["alice/ehr-records-2025", "bob/ehr-records-2025", "charlie/ehr-records-2025"],
        aggregate=True,
    )
    print(pooled)
