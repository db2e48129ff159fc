"""Temporal tensors (binning and one-hot layout at the edges) and the synthetic journeys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpod.data.journeys import generate_journeys, write_journeys
from fedpod.errors import ConfigError, SqlExecutionError, SqlRejected, TaskTimeout
from fedpod.journeys import target, to_tensor, top_codes


def frame(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["patient_id", "timestamp", "code", "value"])


EVENTS = frame([
    ("p1", "2024-01-01T00:00:00+00:00", "A", 1.0),
    ("p1", "2024-01-11T00:00:00+00:00", "A", 3.0),  # exactly on the edge of bin 1 (10-day bins)
    ("p1", "2024-01-05T00:00:00+00:00", "B", 5.0),
    ("p2", "2024-01-03T00:00:00+00:00", "B", 7.0),
    ("p2", "2024-01-03T00:00:00+00:00", "B", 9.0),  # a duplicate timestamp
])
STATIC = pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "index_date": ["2024-01-21", "2024-01-13", "2024-01-01"],
                       "gender": ["F", "M", "F"]})


def test_forward_bins_start_at_each_patients_first_event_and_an_edge_starts_the_next_bin() -> None:
    tensor, ids, names = to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D")
    assert list(ids) == ["p1", "p2", "p3"] and names == ["A", "B"] and tensor.shape == (3, 2, 2)
    assert tensor[0].tolist() == [[1, 1], [1, 0]]  # p1: A and B in bin 0, the edge event in bin 1
    assert tensor[1].tolist() == [[0, 2], [0, 0]]  # p2's first event is its own origin; duplicates both count
    assert not tensor[2].any()  # a patient without events: an empty row


def test_unsorted_input_and_time_zones_give_the_same_tensor() -> None:
    shuffled = EVENTS.sample(frac=1, random_state=3)
    paris = EVENTS.assign(timestamp=pd.to_datetime(EVENTS["timestamp"], utc=True).dt.tz_convert("Europe/Paris"))
    reference = to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D").tensor
    assert np.array_equal(to_tensor(shuffled, STATIC, codes=["A", "B"], bin_size="10D").tensor, reference)
    assert np.array_equal(to_tensor(paris, STATIC, codes=["A", "B"], bin_size="10D").tensor, reference)
    local = EVENTS.assign(timestamp=["2024-01-01T01:00:00+01:00", "2024-01-11T01:00:00+01:00",
                                     "2024-01-05T01:00:00+01:00", "2024-01-03T01:00:00+01:00",
                                     "2024-01-03T01:00:00+01:00"])  # the same instants, written in +01:00
    assert np.array_equal(to_tensor(local, STATIC, codes=["A", "B"], bin_size="10D").tensor, reference)


def test_backward_bins_end_at_the_anchor_and_max_bins_keeps_the_latest() -> None:
    tensor = to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D", anchor="index_date").tensor
    # p1's anchor 2024-01-21: [01-11, 01-21) is the last bin (holds the edge event), [01-01, 01-11) the one before.
    assert tensor.shape == (3, 2, 2) and tensor[0].tolist() == [[1, 1], [1, 0]]
    # p2's anchor 2024-01-13: both B events lie in [01-03, 01-13), the last bin — the start is inclusive.
    assert tensor[1].tolist() == [[0, 0], [0, 2]]
    latest = to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D", anchor="index_date", max_bins=1).tensor
    assert latest.shape == (3, 1, 2) and latest[0].tolist() == [[1, 0]]
    fixed = to_tensor(EVENTS, STATIC, codes=["A"], bin_size="10D", anchor=pd.Timestamp("2024-01-11")).tensor
    assert fixed[0].tolist() == [[1]]  # an event at the anchor itself is the future: left out


def test_max_bins_keeps_the_earliest_bins_when_counting_forward() -> None:
    tensor = to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D", max_bins=1).tensor
    assert tensor.shape == (3, 1, 2) and tensor[0].tolist() == [[1, 1]]


def test_presence_mean_and_fill_values() -> None:
    presence = to_tensor(EVENTS, STATIC, codes=["B"], bin_size="30D", aggregate="presence").tensor
    assert presence[:, 0, 0].tolist() == [1, 1, 0]
    mean = to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="30D", aggregate="mean", fill_value=-1).tensor
    assert mean[0, 0].tolist() == [2.0, 5.0] and mean[1, 0].tolist() == [-1.0, 8.0] and mean[2, 0].tolist() == [-1, -1]


def test_codes_outside_the_vocabulary_and_unknown_patients_are_left_out() -> None:
    extra = pd.concat([EVENTS, frame([("p9", "2024-01-01T00:00:00Z", "A", 1.0), ("p1", "2024-01-02T00:00:00Z", "Z",
                                                                                   0.0)])])
    assert np.array_equal(to_tensor(extra, STATIC, codes=["A", "B"], bin_size="10D").tensor,
                          to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D").tensor)
    assert top_codes(EVENTS, 1) == ["B"] and top_codes(EVENTS, 5) == ["B", "A"]
    with pytest.raises(ValueError, match="bin_size"):
        to_tensor(EVENTS, STATIC, bin_size="0D")


def test_events_without_a_time_and_patients_without_an_anchor_count_for_nothing() -> None:
    """An event with no timestamp crashed forward binning ("'list' argument must have no negative
    elements"); a patient whose anchor date is null was binned back from the year 1677, which
    made 5,000 bins and counted all their events."""
    untimed = pd.concat([EVENTS, frame([("p1", None, "A", 1.0)])])  # type: ignore[list-item]
    for anchor in ("first_event", "index_date"):
        assert np.array_equal(to_tensor(untimed, STATIC, codes=["A", "B"], bin_size="10D", anchor=anchor).tensor,
                              to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="10D", anchor=anchor).tensor)
    no_anchor = STATIC.assign(index_date=["2024-01-21", None, "2024-01-01"])
    tensor = to_tensor(EVENTS, no_anchor, codes=["A", "B"], bin_size="10D", anchor="index_date").tensor
    assert tensor.shape == (3, 2, 2) and tensor[0].tolist() == [[1, 1], [1, 0]] and not tensor[1].any()


def test_ids_match_as_whole_numbers_and_repeats_are_refused_without_naming_a_patient() -> None:
    """An integer id column with a blank cell reads as floats: 1.0 never matched the static
    table's 1, and every event was dropped without a word."""
    events = EVENTS.assign(patient_id=[1.0, 1.0, 1.0, 2.0, np.nan])
    static = STATIC.assign(patient_id=[1, 2, 3])
    tensor = to_tensor(events, static, codes=["A", "B"], bin_size="10D").tensor
    assert tensor.sum(axis=(1, 2)).tolist() == [3, 1, 0]
    with pytest.raises(ConfigError, match=r"patient_id values repeat \(1 stand more than once\)") as refused:
        to_tensor(EVENTS, pd.concat([STATIC, STATIC.iloc[[1]]]), codes=["A"])
    assert "p2" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"vocabulary's codes repeat .*'A'"):
        to_tensor(EVENTS, STATIC, codes=["A", "B", "A"])


def test_a_tensor_beyond_max_cells_is_refused_before_it_is_allocated() -> None:
    with pytest.raises(ConfigError, match=r"3 patients x 864,001 bins x 2 codes, more than max_cells \(1,000,000\)"):
        to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="1s", max_cells=1_000_000)  # p1's events span 10 days
    assert to_tensor(EVENTS, STATIC, codes=["A", "B"], bin_size="1s", max_bins=10).tensor.shape == (3, 10, 2)


def test_a_pod_reports_the_feature_order_and_the_modeller_sees_only_whether_pods_agree() -> None:
    from fedpod.algorithms.training.layout import disagreement, layout_digest, recording

    to_tensor(EVENTS, STATIC, codes=["A", "B"])  # outside a pod's training data: nothing recorded, no error
    with recording() as reported:
        to_tensor(EVENTS, STATIC, codes=["A", "B"])
    with recording() as reordered:
        to_tensor(EVENTS, STATIC, codes=["B", "A"])
    with recording() as own:
        to_tensor(EVENTS, STATIC, top_k=2)  # this table's own top codes: B, A
    assert reported == [("A", "B")] and layout_digest(reported) != layout_digest(reordered) == layout_digest(own)
    assert layout_digest([]) is None and "A" not in (layout_digest(reported) or "A")
    layouts = {"alice": layout_digest(reported), "bob": layout_digest(reordered), "carol": layout_digest(own),
               "dave": None}  # dave's plan built no tensor: it takes no side
    assert disagreement({"alice": layouts["alice"], "dave": None}) is None
    said = disagreement(layouts)
    assert said == f"bob, carol built features {layouts['bob']}; alice built features {layouts['alice']}"


def test_targets_come_from_an_expression_over_the_static_table() -> None:
    assert target(STATIC, "gender = 'F'").tolist() == [True, False, True]
    assert target(STATIC, "index_date > (SELECT MIN(index_date) FROM static_rows)").tolist() == [True, True, False]
    with pytest.raises(SqlRejected, match=r"read_csv\(\) is not allowed"):
        target(STATIC, "(SELECT COUNT(*) FROM read_csv('/etc/passwd'))")


@pytest.mark.parametrize("expression", [
    "1) AS target FROM static_rows; SELECT (2",  # a second statement
    "gender) AS target FROM static_rows ORDER BY random() LIMIT 3 OFFSET (0",  # labels shuffled against patients
    "gender) AS target, * FROM static_rows WHERE (true",
    "(SELECT COUNT(*) FROM range(3000000000))",
])
def test_a_target_is_one_expression_and_nothing_more(expression: str) -> None:
    """A built-in journey model needs no approval, and its target is the modeller's text, run by
    the pod: it closed the parenthesis to run statements of its own."""
    with pytest.raises(SqlRejected):
        target(STATIC, expression)


def test_a_target_stops_at_its_deadline_and_does_not_quote_the_value_it_failed_on() -> None:
    many = pd.DataFrame({"patient_id": [f"p{i}" for i in range(400)], "note": ["HIV positive"] * 400})
    with pytest.raises(TaskTimeout, match=r"ran longer than 0\.5s"):
        target(many, "(SELECT COUNT(*) FROM static_rows a, static_rows b, static_rows c, static_rows d) > 0",
               timeout_s=0.5)
    with pytest.raises(SqlExecutionError, match=r"ConversionException") as failed:
        target(many, "CAST(note AS INTEGER) > 0")
    assert "HIV" not in str(failed.value)


def test_synthetic_journeys_are_deterministic_realistic_and_differ_by_centre(tmp_path: Path) -> None:
    first, second = generate_journeys(3, 900, seed=4), generate_journeys(3, 900, seed=4)
    for a, b in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(a.events, b.events)
        pd.testing.assert_frame_equal(a.patients, b.patients)
    ages = [(c.patients["index_date"].astype("datetime64[ns]") - c.patients["birth_date"].astype("datetime64[ns]"))
            .dt.days.div(365.25) for c in first]
    assert ages[0].min() >= 19.9 and ages[1].min() >= 39.9 and ages[2].max() < 61.5  # 20-80, 40-85, 20-60
    assert [str(c.events["timestamp"].dt.tz) for c in first] == ["America/New_York", "Europe/Paris", "Europe/London"]
    for centre in first:
        counts = centre.events["code"].value_counts()
        assert 200 <= len(counts) <= 400 and counts.iloc[0] > 20 * counts.iloc[-1]  # a long tail
        assert 0.02 < centre.patients["diabetes_next_year"].mean() < 0.3
    units = [set(c.events.loc[c.events["description"].str.startswith("Glucose"), "units"]) for c in first]
    assert units == [{"mg/dL"}, {"mmol/L"}, {"mmol/L"}]
    assert "GLY" in set(first[1].events["code"]) and "GLY" not in set(first[0].events["code"])
    written = write_journeys(first, tmp_path / "out")
    back = pd.read_csv(written[1] / "events.csv")
    assert back["timestamp"].iloc[0].endswith(("+01:00", "+02:00"))


def test_the_target_is_learnable_from_the_temporal_pattern() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    centre = generate_journeys(1, 3000, seed=2)[0]
    codes = ["2345-7", "4548-4", "39156-5", "44054006"]  # glucose, HbA1c, BMI, a diabetes diagnosis
    counts = to_tensor(centre.events, centre.patients, codes=codes, bin_size="180D", max_bins=4,
                       anchor="index_date").tensor
    means = to_tensor(centre.events, centre.patients, codes=codes, bin_size="180D", max_bins=4,
                      anchor="index_date", aggregate="mean").tensor
    features = np.concatenate([counts.reshape(len(counts), -1), means.reshape(len(means), -1)], axis=1)
    labels = centre.patients["diabetes_next_year"].to_numpy()
    half = len(labels) // 2
    model = LogisticRegression(max_iter=2000).fit(features[:half], labels[:half])
    assert roc_auc_score(labels[half:], model.predict_proba(features[half:])[:, 1]) > 0.8


def test_an_events_dataset_is_two_tables_that_sql_reads_by_their_names(tmp_path: Path) -> None:
    from fedpod.algorithms.sql.engine import SqlEngine
    from fedpod.data.catalog import inspect
    from fedpod.data.datasets import DatasetSpec
    from fedpod.errors import ConfigError, SqlRejected

    [folder] = write_journeys(generate_journeys(1, 200, seed=3), tmp_path)
    spec = inspect(DatasetSpec(name="ehr", type="events", path=str(folder / "events.csv"),
                               static=str(folder / "patients.csv")), tmp_path)
    assert spec.tables == ["ehr", "ehr_static"] and spec.static_rows == 200 and "gender" in spec.static_columns
    assert "WITH TIME ZONE" in spec.columns["timestamp"]  # the offsets written in the CSV are kept
    engine = SqlEngine([spec], tmp_path)
    try:
        genders = engine.run("SELECT gender, COUNT(*) AS n FROM ehr_static GROUP BY gender ORDER BY gender", "ehr")
        assert sum(genders.column("n").to_pylist()) == 200
        joined = engine.run("SELECT s.gender, COUNT(*) AS n FROM ehr e JOIN ehr_static s USING (patient_id) "
                            "GROUP BY s.gender", "ehr")
        assert sum(joined.column("n").to_pylist()) == spec.rows
        assert set(engine.catalog.columns_of("ehr")) >= {"code", "timestamp", "gender", "birth_date"}
        with pytest.raises(SqlRejected, match="not a dataset of this task"):
            engine.run("SELECT * FROM other_static", "ehr")
    finally:
        engine.close()
    with pytest.raises(ConfigError, match=r"no column\(s\) \['when'\]"):
        inspect(DatasetSpec(name="ehr", type="events", path=str(folder / "events.csv"), time_column="when"),
                tmp_path)
