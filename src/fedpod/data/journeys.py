"""Synthetic patient journeys: years of encounters per patient, as hospitals record them.

What the Synthea-generated centres of Fed-BioMed's TanaT tutorial offer, without a download
and deterministic per seed. Each centre gets

- a static table: patient_id, birth_date, gender, country, region, death_date (where the
  patient died during the record), index_date (the prediction time), and two targets:
  `diabetes_next_year` (type 2 diabetes diagnosed within the year after the index date — the
  one a temporal model can learn: glucose and HbA1c drift upwards, and are measured more often,
  in the two years before onset) and `gender` (the tutorial's own target, kept for fidelity);
- a long-format event table: patient_id, timestamp (with the centre's time zone), code,
  description, value, units, category, encounter_id — vitals at every encounter, labs that the
  patient's conditions call for, diagnoses when a condition starts, and a long tail of a few
  hundred procedure/finding codes whose frequencies follow a Zipf law.

Centres differ the way hospitals do: size, age range (20-80, 40-85, 20-60 as in the tutorial),
country and time zone, visit frequency, and coding habits — the French centre records some
labs under local codes and glucose in mmol/L; the British one records HbA1c in mmol/mol. Every
step is vectorised (numpy over all encounters at once); 3 x 1,000 patients take about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedpod.data.synth import centre_name

INDEX_DATE = pd.Timestamp("2025-01-01")
HISTORY_YEARS = 6.0
DAY_NS = 86_400 * 10**9
YEAR_NS = int(365.25 * DAY_NS)
TAIL_CODES = 280
DIABETES = ("44054006", "Diabetes mellitus type 2 (disorder)")
HYPERTENSION = ("38341003", "Hypertensive disorder, systemic arterial (disorder)")


@dataclass(frozen=True)
class Profile:
    country: str
    regions: tuple[str, ...]
    timezone: str
    ages: tuple[int, int]
    visits_per_year: float
    local_codes: bool  # some labs under the centre's own codes
    glucose_mmol: bool  # glucose in mmol/L instead of mg/dL
    hba1c_mmol: bool  # HbA1c in mmol/mol instead of %


PROFILES = (
    Profile("US", ("MA", "NY", "CA", "TX"), "America/New_York", (20, 80), 3.0, False, False, False),
    Profile("FR", ("IDF", "ARA", "OCC", "PACA"), "Europe/Paris", (40, 85), 4.5, True, True, False),
    Profile("UK", ("ENG", "SCT", "WLS", "NIR"), "Europe/London", (20, 60), 2.0, False, True, True),
)


@dataclass(frozen=True)
class Lab:
    """A measurement: LOINC code, description, units, and how it is generated."""

    code: str
    local_code: str
    description: str
    units: str
    category: Literal["vital-signs", "laboratory"]
    mean: float
    sd: float  # between patients
    noise: float  # between visits
    rate: float  # chance of being measured at an encounter (vitals: 1)


LABS = (
    Lab("8480-6", "PAS", "Systolic blood pressure", "mm[Hg]", "vital-signs", 124, 12, 7, 1.0),
    Lab("8462-4", "PAD", "Diastolic blood pressure", "mm[Hg]", "vital-signs", 79, 8, 5, 1.0),
    Lab("8867-4", "FC", "Heart rate", "/min", "vital-signs", 73, 8, 6, 1.0),
    Lab("29463-7", "POIDS", "Body weight", "kg", "vital-signs", 78, 14, 1.2, 1.0),
    Lab("39156-5", "IMC", "Body mass index (BMI) [Ratio]", "kg/m2", "vital-signs", 27, 4.5, 0.4, 1.0),
    Lab("2345-7", "GLY", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory", 92, 8, 7, 0.35),
    Lab("4548-4", "HBA1C", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", "laboratory", 5.4, 0.3, 0.15, 0.12),
    Lab("2093-3", "CHOL", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory", 190, 30, 12,
        0.25),
    Lab("2571-8", "TG", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory", 130, 40, 20, 0.2),
    Lab("2160-0", "CREA", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory", 0.95, 0.18, 0.06,
        0.3),
    Lab("718-7", "HB", "Hemoglobin [Mass/volume] in Blood", "g/dL", "laboratory", 14, 1.2, 0.4, 0.3),
    Lab("6690-2", "GB", "Leukocytes [#/volume] in Blood", "10*3/uL", "laboratory", 7, 1.5, 0.8, 0.3),
)
GLUCOSE, HBA1C = 5, 6  # indices in LABS
LOCALLY_CODED = (GLUCOSE, 7, 9, 10)  # glucose, cholesterol, creatinine, haemoglobin at a centre with local codes
TAIL_CATEGORIES = ("procedure", "finding", "medication", "survey", "imaging")


@dataclass(frozen=True)
class Journeys:
    name: str
    patients: pd.DataFrame
    events: pd.DataFrame


def tail_vocabulary() -> pd.DataFrame:
    """The long tail: codes, descriptions, categories and Zipf frequencies (the same everywhere)."""
    rank = np.arange(1, TAIL_CODES + 1)
    weights = 1.0 / rank**1.1
    codes = [str(100000 + 7919 * r % 900000) for r in rank]  # SNOMED-like numeric identifiers
    categories = [TAIL_CATEGORIES[r % len(TAIL_CATEGORIES)] for r in rank]
    return pd.DataFrame({"code": codes, "description": [f"{c.capitalize()} {code}" for c, code in
                                                        zip(categories, codes, strict=True)],
                         "category": categories, "p": weights / weights.sum()})


def _patients(index: int, size: int, profile: Profile, rng: np.random.Generator) -> pd.DataFrame:
    name = centre_name(index)
    low, high = profile.ages
    age_days = rng.uniform(low * 365.25, (high + 1) * 365.25, size)
    birth = INDEX_DATE - pd.to_timedelta(age_days, unit="D")
    return pd.DataFrame({
        "patient_id": [f"{name[:1].upper()}{index:02d}-J{i:05d}" for i in range(size)],
        "birth_date": birth.normalize().date,
        "gender": np.where(rng.random(size) < 0.49, "M", "F"),
        "country": profile.country,
        "region": rng.choice(profile.regions, size),
        "age_at_index": (age_days / 365.25).astype(int),
    })


def _centre(index: int, size: int, seed: int) -> Journeys:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 9_000 + index]))
    profile = PROFILES[index % len(PROFILES)]
    patients = _patients(index, size, profile, rng)
    n = len(patients)
    age = patients["age_at_index"].to_numpy().astype(float)
    male = (patients["gender"] == "M").to_numpy()
    # Latent risk of type 2 diabetes: age, BMI, a family factor. Prevalent cases got it during the
    # record; incident cases get it within the year after the index date (the target).
    bmi = np.clip(rng.normal(26 + 0.04 * (age - 45), 4.5), 16, 50)
    risk = 1 / (1 + np.exp(-(-1.9 + 0.055 * (age - 50) + 0.18 * (bmi - 27) + rng.normal(0, 0.8, n))))
    draw = rng.random(n)
    prevalent = draw < 0.5 * risk
    incident = ~prevalent & (draw < 0.5 * risk + 0.6 * risk)
    index_ns = INDEX_DATE.value
    start_ns = np.maximum(index_ns - int(HISTORY_YEARS * YEAR_NS),
                          (INDEX_DATE - pd.to_timedelta((age - 18) * 365.25, unit="D")).values.astype(np.int64))
    onset = np.where(prevalent, rng.uniform(start_ns, index_ns), np.where(
        incident, index_ns + rng.uniform(0, 365, n) * DAY_NS, np.inf))
    hypertension = rng.random(n) < np.clip(0.05 + 0.008 * (age - 30), 0.02, 0.6)
    hypertension_onset = np.where(hypertension, rng.uniform(start_ns, index_ns), np.inf)
    dies = rng.random(n) < np.clip(0.002 * (age - 40), 0, 0.12)
    death = np.where(dies, rng.uniform(index_ns - 2 * YEAR_NS, index_ns), np.inf)
    end_ns = np.minimum(index_ns, death)
    patients["death_date"] = pd.to_datetime(np.where(dies, death, np.nan)).date
    patients.loc[~dies, "death_date"] = None
    patients["index_date"] = INDEX_DATE.date()
    patients["diabetes_next_year"] = (incident & ~dies).astype(int)
    baseline = np.stack([rng.normal(lab.mean, lab.sd, n) for lab in LABS], axis=1)
    baseline[:, 4] = bmi
    baseline[:, 3] = bmi * np.where(male, 1.78, 1.64) ** 2
    return Journeys(centre_name(index), patients.drop(columns="age_at_index"), _events(
        patients, profile, rng, start_ns, end_ns, onset, hypertension_onset, baseline, index))


def _events(patients: pd.DataFrame, profile: Profile, rng: np.random.Generator, start_ns: np.ndarray,
            end_ns: np.ndarray, onset: np.ndarray, hypertension_onset: np.ndarray, baseline: np.ndarray,
            index: int) -> pd.DataFrame:
    n = len(patients)
    years = np.maximum(end_ns - start_ns, DAY_NS) / YEAR_NS
    sick = np.isfinite(onset) & (onset <= end_ns)
    counts = rng.poisson(profile.visits_per_year * years * (1 + 0.6 * sick)) + 1
    owner = np.repeat(np.arange(n), counts)  # one row per encounter
    when = start_ns[owner] + rng.random(len(owner)) * (end_ns[owner] - start_ns[owner])
    # Pre-diabetes: in the two years before onset glucose and HbA1c drift up and are tested more.
    to_onset = (onset[owner] - when) / YEAR_NS
    drift = np.where(to_onset <= 0, 1.0, np.clip(1 - to_onset / 2, 0, 1))  # 0 two years before, 1 at onset
    frames = []
    for column, lab in enumerate(LABS):
        rate = np.full(len(owner), lab.rate)
        if column in (GLUCOSE, HBA1C):
            rate = np.clip(rate + 0.6 * drift, 0, 1)
        taken = rng.random(len(owner)) < rate
        rows = np.flatnonzero(taken)
        value = baseline[owner[rows], column] + rng.normal(0, lab.noise, len(rows))
        if column == GLUCOSE:
            value += 45 * drift[rows] + 35 * (to_onset[rows] <= 0)
        elif column == HBA1C:
            value += 1.0 * drift[rows] + 0.9 * (to_onset[rows] <= 0)
        elif column == 0:
            value += 14 * (hypertension_onset[owner[rows]] <= when[rows])
        code, units = lab.code, lab.units
        if column == GLUCOSE and profile.glucose_mmol:
            value, units = value / 18.016, "mmol/L"
        if column == HBA1C and profile.hba1c_mmol:
            value, units = (value - 2.15) * 10.929, "mmol/mol"
        if profile.local_codes and column in LOCALLY_CODED:
            code = lab.local_code
        frames.append(pd.DataFrame({"row": rows, "patient": owner[rows], "time": when[rows], "code": code,
                                    "description": lab.description,
                                    "value": np.round(value, 2), "units": units, "category": lab.category}))
    for (code, description), starts in ((DIABETES, onset), (HYPERTENSION, hypertension_onset)):
        diagnosed = np.flatnonzero(np.isfinite(starts) & (starts <= end_ns))  # a visit of its own
        frames.append(pd.DataFrame({"row": -1 - diagnosed, "patient": diagnosed, "time": starts[diagnosed],
                                    "code": code, "description": description, "value": np.nan, "units": "",
                                    "category": "condition"}))
    tail = tail_vocabulary()
    per_visit = rng.poisson(1.6, len(owner))
    rows = np.repeat(np.arange(len(owner)), per_visit)
    picked = rng.choice(len(tail), len(rows), p=tail["p"].to_numpy())
    frames.append(pd.DataFrame({"row": rows, "patient": owner[rows], "time": when[rows],
                                "code": tail["code"].to_numpy()[picked],
                                "description": tail["description"].to_numpy()[picked], "value": np.nan, "units": "",
                                "category": tail["category"].to_numpy()[picked]}))
    events = pd.concat(frames, ignore_index=True)
    prefix = centre_name(index)[:1].upper()
    events.insert(0, "patient_id", patients["patient_id"].to_numpy()[events.pop("patient").to_numpy()])
    events["encounter_id"] = [f"{prefix}{index:02d}-E{r:07d}" if r >= 0 else f"{prefix}{index:02d}-D{-1 - r:07d}"
                              for r in events["row"].to_numpy()]
    stamp = pd.to_datetime(events.pop("time").to_numpy().astype("int64"), utc=True).floor("min")
    events.insert(1, "timestamp", stamp.tz_convert(profile.timezone))
    events = events.drop(columns="row")
    return events.sort_values(["patient_id", "timestamp"], kind="stable").reset_index(drop=True)


def generate_journeys(centres: int = 3, patients: int = 3000, seed: int = 0) -> list[Journeys]:
    """`patients` split evenly over the centres (the tutorial's centres are of similar size)."""
    if centres < 1 or patients < centres:
        raise ValueError("need at least one centre and one patient per centre")
    sizes = [patients // centres + (i < patients % centres) for i in range(centres)]
    return [_centre(i, size, seed) for i, size in enumerate(sizes)]


def write_journeys(centres: list[Journeys], out: Path, file_format: Literal["csv", "parquet"] = "csv") -> list[Path]:
    """`<out>/<centre>/patients.<fmt>` and `events.<fmt>`; timestamps keep their UTC offset."""
    folders = []
    for centre in centres:
        folder = out / centre.name
        folder.mkdir(parents=True, exist_ok=True)
        if file_format == "parquet":
            centre.patients.to_parquet(folder / "patients.parquet", index=False)
            centre.events.to_parquet(folder / "events.parquet", index=False)
        else:
            centre.patients.to_csv(folder / "patients.csv", index=False)
            events = centre.events.assign(timestamp=centre.events["timestamp"].map(pd.Timestamp.isoformat))
            events.to_csv(folder / "events.csv", index=False)
        folders.append(folder)
    return folders
