"""TanaT event pools as input to `fedpod.journeys.to_tensor` (issue 9, item 3). `tanat` is an
optional extra (about 960 MB of dependencies): these tests skip when it is not installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpod.journeys import is_tanat_pool, to_tensor

tanat = pytest.importorskip("tanat", reason="the optional tanat package is not installed (pip install tanat)")

EVENTS = pd.DataFrame({
    "patient_id": ["p1", "p1", "p1", "p2", "p2"],
    "timestamp": pd.to_datetime(["2024-01-01", "2024-01-11", "2024-01-05", "2024-01-03", "2024-01-03"], utc=True),
    "code": ["A", "A", "B", "B", "B"],
    "value": [1.0, 3.0, 5.0, 7.0, 9.0],
})
STATIC = pd.DataFrame({"patient_id": ["p1", "p2", "p3"],
                       "index_date": pd.to_datetime(["2024-01-21", "2024-01-13", "2024-01-01"], utc=True)})


@pytest.fixture(autouse=True)
def workspace(tmp_path: Path) -> None:
    tanat.set_workspace(str(tmp_path / "tanat"))  # not the user's ~/.tanat


def test_a_tanat_pool_gives_the_same_tensor_as_the_frames_it_was_built_from() -> None:
    pool = tanat.build_events(EVENTS, id_column="patient_id", time_column="timestamp", static_data=STATIC)
    assert is_tanat_pool(pool) and not is_tanat_pool(EVENTS)
    from_pool = to_tensor(pool, codes=["A", "B"], bin_size="10D")
    assert np.array_equal(from_pool.tensor, to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D").tensor)
    assert list(from_pool.patient_ids) == ["p1", "p2", "p3"] and from_pool.feature_names == ["A", "B"]
    # an anchor from the static table: the one given wins over the pool's own (see the module docstring)
    assert np.array_equal(to_tensor(pool, STATIC, codes=["A", "B"], bin_size="10D", anchor="index_date").tensor,
                          to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D", anchor="index_date").tensor)


def test_the_pools_static_table_is_read_from_the_pool() -> None:
    pool = tanat.build_events(EVENTS, id_column="patient_id", time_column="timestamp", static_data=STATIC)
    from_pool = to_tensor(pool, codes=["A", "B"], bin_size="10D", anchor="index_date")
    as_stored = to_tensor(pool.temporal_data(fmt="pandas"), pool.static_data(fmt="pandas"), codes=["A", "B"],
                          bin_size="10D", anchor="index_date")
    assert np.array_equal(from_pool.tensor, as_stored.tensor)


def test_a_pool_with_other_column_names_needs_no_renaming() -> None:
    renamed = EVENTS.rename(columns={"patient_id": "subject", "timestamp": "when"})
    pool = tanat.build_events(renamed, id_column="subject", time_column="when")
    assert np.array_equal(to_tensor(pool, codes=["A", "B"], bin_size="10D").tensor,
                          to_tensor(EVENTS, codes=["A", "B"], bin_size="10D").tensor)
