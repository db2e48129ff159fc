"""Deterministic synthetic multi-centre patient data, so the demo and benchmarks need no download.

Each centre gets a static patient table and a long-format observation log
(patient_id, time, code, value). Centres differ the way hospitals do:

- size: each centre is about 0.65x the previous one;
- case mix: mean age rises from centre to centre, smoking and diabetes rates differ;
- coding habits: centres record the same measurements under LOINC codes or local codes,
  with different measurement frequencies (and one reports HbA1c in mmol/mol, not %).

The target `outcome` (a 1-year cardiovascular event) follows a logistic model of age, sex,
BMI, smoking, blood pressure, cholesterol, diabetes and HbA1c, so models can genuinely learn
it; centres share the model but not the feature distribution (non-IID).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CENTRE_NAMES = ["alice", "bob", "charlie", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]

# measurement -> (LOINC code, local code)
CODES = {
    "systolic_bp": ("8480-6", "SBP"),
    "cholesterol": ("2093-3", "CHOL"),
    "hba1c": ("4548-4", "HBA1C"),
    "heart_rate": ("8867-4", "HR"),
}
COEFFICIENTS = {"intercept": -1.6, "age": 0.045, "male": 0.35, "bmi": 0.06, "smoker": 0.7,
                "systolic_bp": 0.018, "cholesterol": 0.25, "diabetes": 0.5, "hba1c": 0.3}


@dataclass(frozen=True)
class Centre:
    name: str
    patients: pd.DataFrame
    observations: pd.DataFrame


def centre_name(index: int) -> str:
    return CENTRE_NAMES[index] if index < len(CENTRE_NAMES) else f"centre{index + 1}"


def centre_sizes(centres: int, patients: int) -> list[int]:
    weights = np.array([0.65**i for i in range(centres)])
    sizes = np.floor(weights / weights.sum() * patients).astype(int)
    sizes[0] += patients - sizes.sum()
    return [int(s) for s in sizes]


def outcome_probability(frame: pd.DataFrame) -> np.ndarray:
    c = COEFFICIENTS
    logit = (c["intercept"] + c["age"] * (frame["age"] - 60) + c["male"] * (frame["sex"] == "M")
             + c["bmi"] * (frame["bmi"] - 27) + c["smoker"] * frame["smoker"]
             + c["systolic_bp"] * (frame["systolic_bp"] - 130) + c["cholesterol"] * (frame["cholesterol"] - 5.2)
             + c["diabetes"] * frame["diabetes"] + c["hba1c"] * (frame["hba1c"] - 5.8))
    return np.asarray(1.0 / (1.0 + np.exp(-(logit - 1.0))))


def _centre(index: int, size: int, seed: int) -> Centre:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    name = centre_name(index)
    age = np.clip(rng.normal(50 + 7 * index, 14, size), 18, 95).round().astype(int)
    sex = np.where(rng.random(size) < 0.48 + 0.03 * (index % 3), "M", "F")
    bmi = np.clip(rng.normal(26 + 0.8 * (index % 4), 4.5, size), 15, 55).round(1)
    smoker = rng.random(size) < (0.28 - 0.05 * (index % 3))
    diabetes = rng.random(size) < np.clip(0.05 + 0.004 * (age - 40), 0.02, 0.45)
    systolic = np.clip(rng.normal(118 + 0.45 * (age - 40) + 8 * smoker, 14), 85, 220).round(0)
    cholesterol = np.clip(rng.normal(4.6 + 0.015 * (age - 40) + 0.03 * (bmi - 25), 0.9), 2.0, 10.0).round(2)
    hba1c = np.clip(rng.normal(5.4 + 1.6 * diabetes + 0.02 * (bmi - 25), 0.5), 4.0, 13.0).round(1)
    patients = pd.DataFrame({
        "patient_id": [f"{name[:1].upper()}{index:02d}-{i:06d}" for i in range(size)],
        "age": age, "sex": sex, "bmi": bmi, "smoker": smoker.astype(int), "diabetes": diabetes.astype(int),
        "systolic_bp": systolic, "cholesterol": cholesterol, "hba1c": hba1c,
    })
    patients["outcome"] = (rng.random(size) < outcome_probability(patients)).astype(int)
    patients["centre"] = name
    return Centre(name, patients, _observations(patients, index, rng))


def _observations(patients: pd.DataFrame, index: int, rng: np.random.Generator) -> pd.DataFrame:
    uses_loinc = index % 2 == 0
    hba1c_in_mmol = index % 3 == 2
    visits_per_year = 2.0 + 1.5 * (index % 3)
    counts = rng.poisson(visits_per_year, len(patients)) + 1
    rows = np.repeat(np.arange(len(patients)), counts)
    start = np.datetime64("2024-01-01T00:00")
    minutes = rng.integers(0, 365 * 24 * 60, len(rows))
    frames: list[pd.DataFrame] = []
    for measurement, (loinc, local) in CODES.items():
        base = rng.normal(72, 9, len(patients)) if measurement == "heart_rate" else patients[measurement].to_numpy()
        noise = {"systolic_bp": 8.0, "cholesterol": 0.3, "hba1c": 0.2, "heart_rate": 6.0}[measurement]
        values = base[rows] + rng.normal(0, noise, len(rows))
        if measurement == "hba1c" and hba1c_in_mmol:
            values = (values - 2.15) * 10.929
        frames.append(pd.DataFrame({
            "patient_id": patients["patient_id"].to_numpy()[rows],
            "time": start + (minutes + len(frames)).astype("timedelta64[m]"),
            "code": loinc if uses_loinc else local,
            "value": values.round(2),
        }))
    events = pd.concat(frames, ignore_index=True)
    return events.sort_values(["patient_id", "time"], kind="stable").reset_index(drop=True)


def generate(centres: int = 3, patients: int = 3000, seed: int = 0) -> list[Centre]:
    if centres < 1 or patients < centres:
        raise ValueError("need at least one centre and one patient per centre")
    return [_centre(i, size, seed) for i, size in enumerate(centre_sizes(centres, patients))]


def write(centres: list[Centre], out: Path) -> list[Path]:
    """Write `<out>/<centre>/patients.csv` and `observations.csv`; returns the centre folders."""
    folders = []
    for centre in centres:
        folder = out / centre.name
        folder.mkdir(parents=True, exist_ok=True)
        centre.patients.to_csv(folder / "patients.csv", index=False)
        centre.observations.to_csv(folder / "observations.csv", index=False)
        folders.append(folder)
    return folders
