"""The pod's epsilon ledger: what differential privacy has spent of each dataset's budget.

A dataset's policy sets `epsilon_budget`, spent either per modeller (`epsilon_budget_scope:
per_modeller`, the default) or by all modellers together (`total`). Every DP task is charged
here before it runs, and refused if the charge would take the spend past the budget; the refusal
names what remains. Within one experiment (or one task), rounds compose through Opacus's RDP
accountant — much tighter than adding each round's epsilon — so a charge is the increase of the
experiment's epsilon; across experiments, epsilons add (sequential composition), which is what
the ledger sums. Pure epsilon-DP charges (noisy SQL) add their epsilon as they are.

Kept in `storage/privacy-budget.jsonl`, one line per charge, written and fsynced before the task
runs: a pod that restarts (or crashes mid-task) has lost no charge; a torn last line is skipped.
Nothing is ever refunded — a task that fails after its charge spent it, the conservative side.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedpod.algorithms.training.privacy import Mechanism, Spent, epsilon
from fedpod.errors import AccessDenied, ConfigError
from fedpod.governance.policy import DatasetPolicy

Scope = Literal["per_modeller", "total"]
RULE = "epsilon_budget"


@dataclass
class _Experiment:
    delta: float
    history: list[Mechanism] = field(default_factory=list)
    pure: float = 0.0  # pure epsilon-DP charges within it

    def epsilon(self) -> float:
        return epsilon(self.history, self.delta) + self.pure


@dataclass(frozen=True)
class Budget:
    """A dataset's budget as its policy states it."""

    epsilon: float | None
    scope: Scope = "per_modeller"

    @classmethod
    def of(cls, limits: DatasetPolicy) -> Budget:
        return cls(limits.epsilon_budget, limits.epsilon_budget_scope)


class PrivacyLedger:
    """Thread-safe; read once, then appended to. `audit(event, **details)` records each charge."""

    def __init__(self, path: Path, audit: Callable[..., None]) -> None:
        self.path = path
        self._audit = audit
        self._lock = threading.Lock()
        self._spent: dict[tuple[str, str], float] | None = None  # (dataset, modeller) -> epsilon
        self._experiments: dict[tuple[str, str, str], _Experiment] = {}

    def _load(self) -> dict[tuple[str, str], float]:
        if self._spent is None:
            spent: dict[tuple[str, str], float] = {}
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        entry = json.loads(line)
                        self._apply(entry)
                        key = (entry["dataset"], entry["modeller"])
                        spent[key] = spent.get(key, 0.0) + float(entry["epsilon"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line after a crash
            self._spent = spent
        return self._spent

    def _apply(self, entry: dict[str, Any]) -> None:
        key = (entry["dataset"], entry["modeller"], entry["experiment"])
        experiment = self._experiments.setdefault(key, _Experiment(float(entry["delta"])))
        if entry.get("mechanism"):
            experiment.history.append(Mechanism(*entry["mechanism"]))
        else:
            experiment.pure += float(entry["epsilon"])

    def totals(self) -> dict[tuple[str, str], float]:
        """Epsilon spent per (dataset, modeller fingerprint): what the custodian's view lists."""
        with self._lock:
            return dict(self._load())

    def spent(self, dataset: str, modeller: str | None = None) -> float:
        """Epsilon spent on `dataset`, by `modeller` or (None) by everyone."""
        with self._lock:
            return sum(v for (d, m), v in self._load().items() if d == dataset and modeller in (None, m))

    def charge(self, *, dataset: str, modeller: str, name: str, experiment: str, budget: Budget, delta: float,
               mechanism: Mechanism | None = None, pure_epsilon: float | None = None) -> Spent:
        """Charge one Gaussian `mechanism` (composed with the experiment's earlier ones) or a
        `pure_epsilon`; raises AccessDenied, charging nothing, when the budget would be exceeded."""
        if (mechanism is None) == (pure_epsilon is None):
            raise ValueError("charge a mechanism or a pure epsilon, not both")
        experiment = experiment[:64]
        with self._lock:
            spent = self._load()
            key = (dataset, modeller, experiment)
            current = self._experiments.get(key)
            if current is not None and current.delta != delta:
                raise ConfigError(f"experiment {experiment[:12]} changed dp_args.delta from {current.delta:g} to "
                                  f"{delta:g}", hint="keep delta fixed within an experiment")
            before = current.epsilon() if current is not None else 0.0
            trial = _Experiment(delta, [*(current.history if current else [])], current.pure if current else 0.0)
            if mechanism is not None:
                trial.history.append(mechanism)
            else:
                trial.pure += float(pure_epsilon or 0.0)
            cost = max(0.0, trial.epsilon() - before)
            used = sum(v for (d, m), v in spent.items()
                       if d == dataset and (budget.scope == "total" or m == modeller))
            remaining = None if budget.epsilon is None else budget.epsilon - used
            if remaining is not None and cost > remaining:
                whose = "all modellers'" if budget.scope == "total" else f"{name}'s"
                raise AccessDenied(f"this task would spend epsilon {cost:.4g} on {dataset}, but only "
                                   f"{max(remaining, 0):.4g} remains of {whose} budget of {budget.epsilon:g} "
                                   f"(spent {used:.4g})",
                                   where=f"dataset {dataset}", rule=RULE,
                                   hint="use more noise (a larger sigma), fewer steps or rounds, or ask the custodian")
            entry = {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "dataset": dataset,
                     "modeller": modeller, "name": name[:64], "experiment": experiment, "delta": delta,
                     "mechanism": None if mechanism is None else [mechanism.noise_multiplier, mechanism.sample_rate,
                                                                   mechanism.steps],
                     "epsilon": cost}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self._apply(entry)
            spent[(dataset, modeller)] = spent.get((dataset, modeller), 0.0) + cost
            left = None if remaining is None else remaining - cost
            self._audit("privacy-charge", dataset=dataset, requester=name[:64], modeller=modeller,
                        experiment=experiment, epsilon=round(cost, 6), delta=delta,
                        experiment_epsilon=round(trial.epsilon(), 6),
                        remaining=None if left is None else round(left, 6))
            return Spent(trial.epsilon(), left)
