"""The same federated SQL from Python. Start the broker and pods first (see the README's tour).

The identity, keystore and broker are found as the CLI finds them: FEDPOD_IDENTITY (default
"modeller"), FEDPOD_HOME or FEDPOD_KEYSTORE, and FEDPOD_BROKER (default nats://127.0.0.1:4222);
pass `Modeller(identity, broker=URL)` to choose.
"""

from fedpod import Modeller

with Modeller() as modeller:
    print(modeller.datasets())
    pooled = modeller.sql(
        "SELECT sex, COUNT(*) AS n, AVG(age) AS mean_age FROM `ehr-records-2025` GROUP BY sex ORDER BY sex",
        datasets=["alice/ehr-records-2025", "bob/ehr-records-2025", "charlie/ehr-records-2025"],
        aggregate=True,
    )
    print(f"aggregated over {', '.join(pooled.attrs['datasets'])}")
    print(pooled)
