"""Patient journeys as tensors: patients x time bins x codes, as TanaT's `to_tensor` builds them.

    tensor, patient_ids, features = to_tensor(events, static, codes=vocabulary, bin_size="360D",
                                              max_bins=5, anchor="index_date")

Vectorised throughout (one pass of numpy over all events; no Python loop over patients).

Binning, exactly:
- Every timestamp is converted to UTC (naive timestamps are taken as UTC), so centres in
  different time zones bin alike; anchors given as dates mean midnight UTC.
- `anchor="first_event"`: bins run forward from each patient's first event; bin b holds
  [first + b*size, first + (b+1)*size), so an event exactly on an edge starts the next bin.
  `max_bins` keeps the *earliest* bins.
- `anchor=<date>` or `anchor=<static column>` (a per-patient date, e.g. the prediction time):
  only events strictly before the anchor count, and bins run backwards from it: the last bin
  holds [anchor - size, anchor), the one before [anchor - 2*size, anchor - size), and so on.
  A patient without an anchor date (a null `death_date`) gets an empty row. `max_bins` keeps
  the *latest* bins (those nearest the anchor). Either way the time axis of the tensor runs
  from oldest to newest.
- Patients: the static table's, in its order (those without events get empty rows), or else
  every patient of the events, sorted; an identifier stands once in the static table. Ids
  match as text, a whole number read as a float (a column with a blank cell) as the integer
  it is. Events of patients not in the static table, of codes not in `codes` and without a
  timestamp are left out. Unsorted input and duplicate timestamps change nothing.
- At most `max_cells` cells (patients x bins x codes): a bin size a thousand times too fine
  fails saying so, rather than asking for terabytes.
- `aggregate="count"` (one-hot, summed over the bin's events), `"presence"` (0/1) or `"mean"`
  (the mean of the events' values). A cell with no event of its code holds `fill_value`.

`events` may also be a TanaT event pool (`tanat.build_events(...)`, where the optional `tanat`
package is installed): its temporal data, static data and id/time columns are taken from the
pool, so a tutorial's pool feeds fedpod unchanged; a `static` table given beside the pool wins
over the pool's. fedpod never imports `tanat` itself. Measured with TanaT 0.10.4: a pool's
static data now and then pairs patients with another patient's static values (seen in 1 of 8
builds where the static table held a patient without events), so pass your own static table
where a static column is the anchor or the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from fedpod.algorithms.sql.watchdog import Watchdog
from fedpod.algorithms.training.layout import report_features
from fedpod.errors import ConfigError, SqlRejected, TaskTimeout

Aggregate = Literal["count", "presence", "mean"]
_deadlines = Watchdog()  # its thread starts with the first target computed


class TemporalTensor(NamedTuple):
    tensor: np.ndarray  # float32, patients x bins x codes
    patient_ids: np.ndarray
    feature_names: list[str]


NOT_A_TIME = np.iinfo(np.int64).min  # NaT, as nanoseconds


def _utc_ns(values: pd.Series | pd.Index | np.ndarray) -> np.ndarray:
    stamps = pd.to_datetime(pd.Series(values), utc=True, format="mixed") if not isinstance(
        getattr(values, "dtype", None), pd.DatetimeTZDtype) else pd.Series(values).dt.tz_convert("UTC")
    return stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64)


def _as_text(values: pd.Series | pd.Index) -> np.ndarray:
    """Identifiers as text: 1.0 (an integer column with a blank cell reads as floats) as "1"."""
    if pd.api.types.is_float_dtype(values.dtype):
        numbers = np.asarray(values, dtype=np.float64)
        whole = np.isfinite(numbers) & (numbers == np.round(numbers))
        return np.where(whole, pd.Series(numbers).map("{:.0f}".format).to_numpy(), np.asarray(values).astype(str))
    return np.asarray(values).astype(str)


def _positions(column: pd.Series, universe: Sequence[str] | np.ndarray) -> np.ndarray:
    """Each value's index in `universe` (-1 when absent). Factorised first, so that each distinct
    value is looked up once instead of once per event (10x faster on a million events)."""
    codes, uniques = pd.factorize(column)
    lookup = pd.Index(list(universe)).get_indexer(pd.Index(_as_text(pd.Index(uniques))))
    return np.where(codes >= 0, lookup[codes], -1)


def _distinct(values: np.ndarray, what: str, *, name_one: bool) -> None:
    repeated = pd.Index(values)[pd.Index(values).duplicated()].unique()
    if len(repeated):  # a patient's identifier is the pod's data: not named in an error a modeller may see
        example = f", e.g. {str(repeated[0])[:64]!r}" if name_one else ""
        raise ConfigError(f"{what} repeat ({len(repeated)} stand more than once{example}); each must stand once")


def top_codes(events: pd.DataFrame, k: int, code_column: str = "code") -> list[str]:
    """The `k` most frequent codes of one table, most frequent first (ties by code). A federation
    must not use this per pod: feature j would mean different codes at different pods."""
    counts = events[code_column].astype(str).value_counts()
    ranked = sorted(zip(counts.to_numpy().tolist(), counts.index.astype(str), strict=True),
                    key=lambda pair: (-pair[0], pair[1]))
    return [code for _, code in ranked[:k]]


def is_tanat_pool(value: object) -> bool:
    """A TanaT sequence pool, recognised by its interface (fedpod does not import tanat)."""
    settings = getattr(value, "settings", None)
    return callable(getattr(value, "temporal_data", None)) and hasattr(settings, "id_column") \
        and hasattr(settings, "time_column")


def from_tanat_pool(pool: Any) -> tuple[pd.DataFrame, pd.DataFrame | None, str, str]:
    """A TanaT pool's events and static table as DataFrames, with its id and time columns."""
    events = pool.temporal_data(fmt="pandas")
    static = pool.static_data(fmt="pandas") if callable(getattr(pool, "static_data", None)) else None
    return events, static, str(pool.settings.id_column), str(pool.settings.time_column)


def to_tensor(events: pd.DataFrame | Any, static: pd.DataFrame | None = None, *, codes: Sequence[str] | None = None,
              top_k: int = 30, bin_size: str | pd.Timedelta = "360D", max_bins: int | None = None,
              anchor: str | pd.Timestamp = "first_event", aggregate: Aggregate = "count", fill_value: float = 0.0,
              id_column: str = "patient_id", time_column: str = "timestamp", code_column: str = "code",
              value_column: str = "value", max_cells: int = 50_000_000) -> TemporalTensor:
    """See the module docstring. `codes`: the vocabulary, in feature order (by default this
    table's `top_k` most frequent codes)."""
    if is_tanat_pool(events):
        events, pool_static, id_column, time_column = from_tanat_pool(events)
        static = pool_static if static is None else static
    size = pd.Timedelta(bin_size).value
    if size <= 0:
        raise ConfigError(f"bin_size {bin_size!r} must be positive")
    if max_bins is not None and max_bins < 1:
        raise ConfigError("max_bins must be at least 1")
    vocabulary = [str(code) for code in codes] if codes is not None else top_codes(events, top_k, code_column)
    _distinct(np.asarray(vocabulary), "the vocabulary's codes", name_one=True)
    report_features(vocabulary)  # at a pod, lets the modeller refuse to average mismatched layouts
    if static is not None:
        ids = _as_text(static[id_column])
        _distinct(ids, f"the static table's {id_column} values", name_one=False)
    else:
        ids = np.sort(pd.unique(_as_text(events[id_column].dropna())))
    patient = _positions(events[id_column], ids)
    feature = _positions(events[code_column], vocabulary)
    time = _utc_ns(events[time_column])
    keep = (patient >= 0) & (feature >= 0) & (time != NOT_A_TIME)
    patient, feature, time = patient[keep], feature[keep], time[keep]
    values = (pd.to_numeric(events[value_column], errors="coerce").to_numpy(dtype=float)[keep]
              if aggregate == "mean" else None)
    n, k = len(ids), len(vocabulary)

    if isinstance(anchor, str) and anchor == "first_event":
        first = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(first, patient, time)
        step = (time - first[patient]) // size  # 0 = the first bin
        bins = int(step.max()) + 1 if len(step) else 1
        bins = min(bins, max_bins) if max_bins else bins
        inside = step < bins
        position = step
    else:
        if isinstance(anchor, str) and static is not None and anchor in static.columns:
            anchors = _utc_ns(static[anchor])
        else:
            anchors = np.full(n, _utc_ns(pd.Index([pd.Timestamp(anchor)]))[0])
        anchored = anchors[patient] != NOT_A_TIME
        before = np.where(anchored, anchors[patient], time) - time  # > 0 strictly before the anchor
        back = np.where(before > 0, -((-before) // size) - 1, -1)  # 0 = [anchor - size, anchor)
        bins = int(back.max()) + 1 if (back >= 0).any() else 1
        bins = min(bins, max_bins) if max_bins else bins
        inside = (back >= 0) & (back < bins)
        position = bins - 1 - back
    if n * bins * k > max_cells:
        raise ConfigError(f"the tensor would hold {n:,} patients x {bins:,} bins x {k:,} codes, more than max_cells "
                         f"({max_cells:,}): choose a larger bin_size, fewer max_bins or fewer codes")
    cell = (patient[inside] * bins + position[inside]) * k + feature[inside]
    counts = np.bincount(cell, minlength=n * bins * k).astype(np.float64)
    if aggregate == "count":
        flat = counts
    elif aggregate == "presence":
        flat = (counts > 0).astype(np.float64)
    else:
        assert values is not None
        observed = values[inside]
        valid = ~np.isnan(observed)
        sums = np.bincount(cell[valid], weights=observed[valid], minlength=n * bins * k)
        numbers = np.bincount(cell[valid], minlength=n * bins * k)
        counts = numbers.astype(np.float64)
        flat = np.divide(sums, numbers, out=np.zeros_like(sums), where=numbers > 0)
    flat = np.where(counts > 0, flat, fill_value)
    return TemporalTensor(flat.reshape(n, bins, k).astype(np.float32), ids, vocabulary)


def target(static: pd.DataFrame, expression: str, *, timeout_s: float = 60.0,
           memory_limit: str = "1GB") -> np.ndarray:
    """A target computed from the static table by a SQL expression over its columns (DuckDB),
    e.g. `"diabetes_next_year"` or `"gender = 'F'"`, in the static table's row order.

    At a pod the expression is the modeller's, and a built-in model needs no approval: it must be
    one expression over that table (text that closes its parenthesis to add a clause or a second
    statement is refused, as are the functions and tables a pod's SQL guard refuses), it is
    stopped after `timeout_s`, and DuckDB's buffers stay within `memory_limit` (the values its
    functions make, within the pod's own cap: `fedpod.pod.memory_cap`). An error raised by a
    value tells its kind, not the value (`fedpod.algorithms.sql.failures`)."""
    import duckdb

    from fedpod.algorithms.sql.dialect import to_duckdb
    from fedpod.algorithms.sql.failures import failure
    from fedpod.algorithms.sql.guard import check_read_only

    query = check_read_only(f"SELECT ({expression}) AS target FROM static_rows", {"static_rows"})
    clauses = {name for name, value in query.args.items() if value}
    if clauses != {"expressions", "from_"} or len(query.expressions) != 1:
        raise SqlRejected(f"the target {expression[:200]!r} is not one expression over the static table's columns",
                          hint="e.g. diabetes_next_year, or gender = 'F'")
    connection = duckdb.connect(":memory:")
    try:
        connection.register("static_rows", static)
        for setting in ("python_enable_replacements = false", f"memory_limit = '{memory_limit}'",
                        "enable_external_access = false", "lock_configuration = true"):
            connection.execute(f"SET {setting}")
        with _deadlines.deadline(timeout_s, connection.interrupt):
            result = connection.execute(to_duckdb(query)).fetchnumpy()["target"]
    except duckdb.InterruptException as exc:
        raise TaskTimeout(f"the target expression ran longer than {timeout_s:g}s and was stopped") from exc
    except duckdb.Error as exc:
        raise failure(exc, "the target expression") from exc
    finally:
        connection.close()
    return np.asarray(result)
