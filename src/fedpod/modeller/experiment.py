"""`Experiment`: multi-round federated training with Fed-BioMed's semantics and method names.

    exp = Experiment(tags=["ehr"], training_plan_class="logistic_regression",
                     model_args={"target": "outcome", "features": [...]},
                     training_args={"num_updates": 50, "optimizer_args": {"lr": 0.05}},
                     round_limit=10, aggregator=FedAverage())
    exp.run()
    exp.training_plan().model()

Rounds are numbered from 0; `round_current()` is the number of completed rounds. A round
needs replies from at least `min_pods` pods (default: every selected pod); otherwise it
fails with the pods and reasons named, and the last good global model is kept. Setters
(`set_training_args`, `set_tags`, ...) apply from the next round. With `save_breakpoints`,
every round leaves a breakpoint that `Experiment.load_breakpoint` resumes from after the
modeller process died.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpod.aggregation import Aggregator, FedAverage, Reply, aggregator_from_config
from fedpod.aggregation.screening import DEFAULT_NORM_LIMIT, screen_updates
from fedpod.aggregation.secure.fixedpoint import apply_update
from fedpod.aggregation.secure.protocol import Settings
from fedpod.algorithms.training.args import TrainingArgs
from fedpod.algorithms.training.layout import disagreement
from fedpod.algorithms.training.local import seed_everything
from fedpod.algorithms.training.plans import TrainingPlan
from fedpod.errors import CastMissing, ConfigError, FedpodError, SecAggError, TaskFailed
from fedpod.modeller.client import Modeller
from fedpod.modeller.discovery import Target, Targets
from fedpod.modeller.history import Phases, Replies, RoundHistory, RoundRecord, read_rounds
from fedpod.modeller.plan_source import load_plan_class, plan_spec
from fedpod.modeller.progress import RoundProgress
from fedpod.modeller.results import (
    EPSILON,
    TensorboardLog,
    aggregated_files,
    append_metrics,
    latest_experiment,
    load_params,
    next_experiment_folder,
    plot_metrics,
    read_breakpoint,
    save_aggregated,
    save_breakpoint,
    write_metrics,
)
from fedpod.modeller.secure_round import secagg_settings, secure_round
from fedpod.modeller.selection import AllNodes, NodeSelectionStrategy
from fedpod.transport.bus import BrokerOptions
from fedpod.wire.codec import Buffer
from fedpod.wire.messages import (
    CONFIG_PREFIX,
    EXTRA_PREFIX,
    PlanSpec,
    SecAggMasking,
    SecAggReply,
    TrainRequest,
    TrainResult,
)
from fedpod.wire.tensors import decode_groups, encode_parts

log = logging.getLogger(__name__)


class RoundFailed(FedpodError):
    pass


class Experiment:
    def __init__(
        self,
        tags: list[str] | None = None,
        nodes: list[str] | None = None,
        training_plan_class: type[TrainingPlan] | str | None = None,
        training_plan_path: str | Path | None = None,
        model_args: dict[str, Any] | None = None,
        training_args: dict[str, Any] | TrainingArgs | None = None,
        round_limit: int | None = None,
        aggregator: Aggregator | None = None,
        node_selection_strategy: NodeSelectionStrategy | None = None,
        save_breakpoints: bool = False,
        experimentation_folder: str | None = None,
        tensorboard: bool = False,
        *,
        datasets: list[str] | None = None,
        min_pods: int | None = None,
        update_norm_limit: float | None = DEFAULT_NORM_LIMIT,
        standardize: bool = True,
        secagg: bool | dict[str, Any] = False,
        broker: str | BrokerOptions | None = None,
        identity: str | None = None,
        keystore: Path | None = None,
        timeout_s: float = 600.0,
        experiments_root: Path = Path("experiments"),
        modeller: Modeller | None = None,
        console: Console | None = None,
    ) -> None:
        if training_plan_class is None:
            raise ConfigError("Experiment needs training_plan_class (a plan class, or a built-in model name)")
        if bool(tags) == bool(datasets):
            raise ConfigError("Experiment needs either tags or datasets (owner/name identifiers)")
        self._tags = list(tags or [])
        self._datasets = list(datasets or [])
        self._nodes = list(nodes) if nodes else None
        self._plan_spec, self._plan_class = plan_spec(training_plan_class,
                                                      Path(training_plan_path) if training_plan_path else None)
        self._model_args = dict(model_args or {})
        self._training_args = TrainingArgs.parse(training_args)
        self._round_limit = round_limit
        self._round = 0
        self._aggregator = aggregator or FedAverage()
        self._secagg = secagg_settings(secagg)
        self._check_aggregator_fits(self._training_args)
        self._strategy = node_selection_strategy or AllNodes()
        self._save_breakpoints = save_breakpoints
        self._min_pods = min_pods
        self._update_norm_limit = update_norm_limit
        self._standardize = standardize
        self._console = console or Console()
        root = Path(experiments_root).resolve()
        self._folder = root / experimentation_folder if experimentation_folder else next_experiment_folder(root)
        # Unique, because pods key what they remember between rounds (Scaffold's control variate)
        # by it: two experiments in different folders are both "Experiment_0001". Kept in breakpoints.
        self._experiment_id = f"{self._folder.name}-{os.urandom(6).hex()}"
        self._owns_modeller = modeller is None
        self._modeller = modeller or Modeller(identity, broker=broker, keystore=keystore, timeout_s=timeout_s)
        self._history = RoundHistory(self._folder)
        self._resolved: Targets | None = None
        self._live: tuple[int, Phases] | None = None  # the round under way (or the last, if it failed)
        self._plan = self._build_plan()
        self._global = self._plan.get_params()
        self._plan.adopt_params(self._global)  # the plan's model is the global model, held once
        self._board = TensorboardLog(self._folder) if tensorboard else None

    def round_progress(self) -> dict[int, Phases]:
        """Per round, per pod: each phase it went through and when it began, in seconds from the
        round's start — sending model, waiting, preparing, training, uploading, done or failed.
        The round under way is there too, as it goes, and a round that failed until the next
        begins."""
        progress = {record.number: record.progress for record in self._history.records()}
        if self._live is not None:
            progress[self._live[0]] = self._live[1]
        return {round_number: {pod: list(steps) for pod, steps in pods.items()}
                for round_number, pods in progress.items()}

    # --- Fed-BioMed's accessors and setters --------------------------------------------------
    def round_current(self) -> int:
        return self._round

    def round_limit(self) -> int | None:
        return self._round_limit

    def set_round_limit(self, round_limit: int | None) -> None:
        if round_limit is not None and round_limit < self._round:
            raise ConfigError(f"round_limit {round_limit} is below the {self._round} rounds already run")
        self._round_limit = round_limit

    def tags(self) -> list[str]:
        return list(self._tags)

    def set_tags(self, tags: list[str]) -> None:
        self._tags, self._datasets, self._resolved = list(tags), [], None

    def set_datasets(self, datasets: list[str]) -> None:
        self._datasets, self._tags, self._resolved = list(datasets), [], None

    def nodes(self) -> list[str] | None:
        return self._nodes

    def set_nodes(self, nodes: list[str] | None) -> None:
        self._nodes, self._resolved = (list(nodes) if nodes else None), None

    def training_args(self) -> dict[str, Any]:
        return self._training_args.model_dump(exclude_none=True)

    def set_training_args(self, training_args: dict[str, Any]) -> None:
        parsed = TrainingArgs.parse(training_args)
        self._check_aggregator_fits(parsed)
        self._training_args = parsed

    def model_args(self) -> dict[str, Any]:
        return dict(self._model_args)

    def set_model_args(self, model_args: dict[str, Any]) -> None:
        self._model_args = dict(model_args)
        self._rebuild_plan()

    def set_training_plan_class(self, training_plan_class: type[TrainingPlan] | str,
                                training_plan_path: str | Path | None = None) -> None:
        self._plan_spec, self._plan_class = plan_spec(training_plan_class,
                                                      Path(training_plan_path) if training_plan_path else None)
        self._rebuild_plan()

    def _rebuild_plan(self) -> None:
        """A new plan from the current class and arguments. The global model carries over when
        its tensor names and shapes still fit the new plan; otherwise (another architecture)
        the next round starts from the new plan's initial weights."""
        self._plan = self._build_plan()
        fresh = self._plan.get_params()
        fits = fresh.keys() == self._global.keys() and all(
            np.shape(fresh[k]) == np.shape(self._global[k]) for k in fresh)
        if fits:
            self._plan.adopt_params(self._global)
        else:
            log.info("the new training plan has other parameters: the next round starts from its initial weights")
            self._global = fresh

    def set_test_ratio(self, ratio: float) -> None:
        self.set_training_args({**self.training_args(), "test_ratio": ratio})

    def set_test_metric(self, metric: str, **metric_args: Any) -> None:
        self.set_training_args({**self.training_args(), "test_metric": metric, "test_metric_args": metric_args})

    def set_test_on_local_updates(self, flag: bool = True) -> None:
        self.set_training_args({**self.training_args(), "test_on_local_updates": flag})

    def set_test_on_global_updates(self, flag: bool = True) -> None:
        self.set_training_args({**self.training_args(), "test_on_global_updates": flag})

    def save_breakpoints(self) -> bool:
        return self._save_breakpoints

    def set_save_breakpoints(self, save_breakpoints: bool) -> None:
        self._save_breakpoints = save_breakpoints

    def tensorboard(self) -> bool:
        return self._board is not None

    def set_tensorboard(self, tensorboard: bool) -> None:
        if tensorboard and self._board is None:
            self._board = TensorboardLog(self._folder)
        elif not tensorboard and self._board is not None:
            self._board.close()
            self._board = None

    def aggregator(self) -> Aggregator:
        return self._aggregator

    def set_aggregator(self, aggregator: Aggregator) -> None:
        self._aggregator = aggregator
        self._check_aggregator_fits(self._training_args)

    def set_node_selection_strategy(self, strategy: NodeSelectionStrategy) -> None:
        self._strategy = strategy

    def set_min_pods(self, min_pods: int | None) -> None:
        self._min_pods = min_pods

    def set_update_norm_limit(self, limit: float | None) -> None:
        """Updates larger than `limit` x the round's median update norm are set aside (None: off)."""
        self._update_norm_limit = limit

    def training_replies(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Per round, per pod: loss, validation metrics, sample count, timings."""
        return {r: {pod: dict(reply) for pod, reply in pods.items()} for r, pods in self._history.replies().items()}

    def aggregated_params(self) -> dict[int, dict[str, Any]]:
        """Per round: `params` (read from the experiment folder on each call) and `params_path`."""
        files = aggregated_files(self._folder)
        return {r: {"params": load_params(path), "params_path": path} for r, path in files.items()}

    def round_seconds(self) -> dict[int, float]:
        """Wall-clock seconds of each completed round, from sending the tasks to aggregating."""
        return {record.number: record.seconds for record in self._history.records()}

    def training_plan(self) -> TrainingPlan:
        return self._plan

    def experimentation_path(self) -> Path:
        return self._folder

    def experiment_id(self) -> str:
        return self._experiment_id

    def info(self) -> dict[str, Any]:
        return {"experiment": self._experiment_id, "folder": str(self._folder), "plan": self._plan_spec.name,
                "plan_kind": self._plan_spec.kind, "tags": self._tags, "datasets": self._datasets,
                "nodes": self._nodes, "round_current": self._round, "round_limit": self._round_limit,
                "aggregator": self._aggregator.get_config(), "training_args": self.training_args(),
                "model_args": self._model_args, "min_pods": self._min_pods,
                "update_norm_limit": self._update_norm_limit,
                "save_breakpoints": self._save_breakpoints, "tensorboard": self.tensorboard()}

    # --- running -----------------------------------------------------------------------------
    def run(self, rounds: int | None = None, increase: bool = False) -> int:
        """Run `rounds` rounds (default: up to the round limit); returns how many ran. Past the
        limit, `increase=True` raises the limit, otherwise only the rounds left are run."""
        if rounds is None:
            if self._round_limit is None:
                raise ConfigError("give `rounds` or set a round_limit")
            rounds = self._round_limit - self._round
        if self._round_limit is not None and self._round + rounds > self._round_limit:
            if increase:
                self._round_limit = self._round + rounds
            else:
                log.warning("round limit %s reached: running %s of %s rounds", self._round_limit,
                            self._round_limit - self._round, rounds)
                rounds = self._round_limit - self._round
        try:
            for _ in range(max(rounds, 0)):
                self._run_round()
        finally:
            self._plot()
        return max(rounds, 0)

    def run_once(self, increase: bool = False) -> int:
        try:
            return self._run_round(increase)
        finally:
            self._plot()

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """Validate the current global model at every pod of the experiment without training:
        task kind `evaluate`, which a custodian may grant without `train`. Each pod scores it on
        its test split (all its rows when `test_ratio` is 0) with the experiment's `test_metric`;
        returns pod -> {"dataset", "num_samples", metrics...}, or {"error"} for a pod that did not."""
        targets = list(self._targets())
        tensors = encode_parts({"params": self._global})
        progress = RoundProgress(self._round, [t.pod.name for t in targets], self._console)
        with progress.shown():
            outcomes = self._modeller._call(self._train_all(targets, self._round, {}, tensors, progress,
                                                            evaluate_only=True))
        return {target.pod.name: {"dataset": target.identifier, "num_samples": outcome.num_samples, **outcome.metrics}
                if isinstance(outcome, TrainResult) else {"dataset": target.identifier, "error": str(outcome)}
                for target, outcome in zip(targets, outcomes, strict=True)}

    def _plot(self) -> None:
        """Drawn once per `run`/`run_once` call: it costs more than a small model's round, and
        grows with the rounds."""
        if (self._folder / "metrics.csv").exists():
            plot_metrics(self._folder)

    def _run_round(self, increase: bool = False) -> int:
        if self._round_limit is not None and self._round >= self._round_limit:
            if not increase:
                log.warning("round limit %s reached; use increase=True to go on", self._round_limit)
                return 0
            self._round_limit = self._round + 1
        round_number = self._round
        started = time.perf_counter()
        seed_everything(self._training_args.random_seed)
        targets = self._targets()
        rng = np.random.default_rng([self._training_args.random_seed or 0, round_number])
        selected = self._strategy.select(round_number, targets, rng)
        if not selected:
            raise RoundFailed(f"round {round_number}: the node selection strategy chose no pod")
        config = self._aggregator.configure_round(round_number, self._global)
        scalars = {k: v for k, v in config.items() if not isinstance(v, dict)}
        arrays = {f"{CONFIG_PREFIX}{k}": v for k, v in config.items() if isinstance(v, dict)}
        tensors = encode_parts({"params": self._global, **arrays})
        progress = RoundProgress(round_number, [t.pod.name for t in selected], self._console)
        self._live = (round_number, progress.transitions)
        failures: dict[str, object] = {identifier.partition("/")[0]: f"did not take part: {why}"
                                       for identifier, why in targets.reasons().items()}
        if self._secagg is not None:
            successes, replies = self._secure_replies(selected, round_number, scalars, tensors, progress, failures)
        else:
            with progress.shown():
                outcomes = self._modeller._call(self._train_all(selected, round_number, scalars, tensors, progress))
            successes = [(t, o) for t, o in zip(selected, outcomes, strict=True) if isinstance(o, TrainResult)]
            failures.update({t.pod.name: o for t, o in zip(selected, outcomes, strict=True)
                             if not isinstance(o, TrainResult)})
            replies = []
            for target, result in successes:
                groups = decode_groups(result.tensors)
                extra = {k[len(EXTRA_PREFIX):]: v for k, v in groups.items() if k.startswith(EXTRA_PREFIX)}
                replies.append(Reply(target.pod.name, groups["params"], result.num_samples, result.metrics, extra))
            replies, set_aside = screen_updates(replies, self._global, self._update_norm_limit)
            failures.update({pod: f"update set aside: {reason}" for pod, reason in set_aside.items()})
            successes = [(t, r) for t, r in successes if t.pod.name not in set_aside]
        needed = self._min_pods if self._min_pods is not None else len(selected)
        if len(successes) < needed:
            details = "; ".join(f"{pod}: {error}" for pod, error in failures.items())
            awaiting = [pod for pod, error in failures.items()
                        if isinstance(error, TaskFailed) and error.kind == "PlanNotApproved"]
            hint = (f"the plan awaits its custodians' approval on {', '.join(awaiting)} (each error above gives "
                    "the command); the global model of the previous round is kept" if awaiting else
                    "the global model of the previous round is kept; fix the pods or lower min_pods")
            raise RoundFailed(f"round {round_number}: {len(successes)} of {len(selected)} pods replied, "
                              f"{needed} needed (min_pods) — {details}", hint=hint)
        mismatch = disagreement({target.pod.name: result.feature_layout for target, result in successes})
        if mismatch:
            raise RoundFailed(
                f"round {round_number}: the pods built their inputs from different feature lists ({mismatch}); "
                "averaging their models would add up weights of different codes",
                hint="give every pod the same vocabulary, in the same order: leave model_args['codes'] out and "
                     "Experiment agrees it by federated count, or compute it with "
                     "fedpod.modeller.vocabulary.federated_vocabulary(...) and pass codes= to to_tensor in "
                     "your plan; never pick top codes per pod")
        try:
            self._global = self._aggregator.aggregate(round_number, self._global, replies)
        except ValueError as exc:
            raise RoundFailed(f"round {round_number}: {self._aggregator.name} cannot aggregate: {exc}",
                              hint="the global model of the previous round is kept") from exc
        self._plan.adopt_params(self._global)
        answers: Replies = {
            target.pod.name: {"dataset": target.identifier, "num_samples": result.num_samples, **result.metrics,
                              "seconds": result.seconds, "device": result.device}
            for target, result in successes}
        for pod, error in failures.items():
            answers[pod] = {"dataset": "", "error": str(error)}
        self._round += 1
        self._record(RoundRecord(round_number, time.perf_counter() - started, answers, progress.transitions))
        return 1

    def _secure_replies(self, selected: list[Target], round_number: int, scalars: dict[str, Any],
                        tensors: list[Buffer], progress: RoundProgress,
                        failures: dict[str, object]) -> tuple[list[tuple[Target, TrainResult]], list[Reply]]:
        """The round under secure aggregation: one reply, the survivors' weighted mean update
        (no update is screened: none is seen; clipping bounds each value instead)."""
        core = self._modeller._core
        cast, received = self._modeller._call(core.cast_model([t.pod for t in selected], tensors))

        async def train(target: Target, masking: SecAggMasking) -> TrainResult:
            return await self._train_one(target, round_number, scalars, tensors, progress, secagg=masking,
                                         cast=cast if target.pod.fingerprint in received else "")

        with progress.shown():
            try:
                outcome = self._modeller._call(secure_round(
                    selected, self._secagg or Settings(),
                    lambda target, build: core.exchange(target, build, SecAggReply), train))
            except SecAggError as exc:
                raise RoundFailed(f"round {round_number}: secure aggregation failed: {exc.message}",
                                  hint="the global model of the previous round is kept") from exc
        for identifier, why in outcome.dropped.items():
            if identifier in outcome.results:  # its masked update is in the sum; only its unmasking answer was lost
                log.info("round %d: %s did not answer the unmasking (%s); its share group made up for it",
                         round_number, identifier, why)
            else:
                failures[identifier.partition("/")[0]] = f"dropped out: {why}"
        successes = [(t, outcome.results[t.identifier]) for t in selected if t.identifier in outcome.results]
        mean = apply_update(self._global, outcome.mean_update)
        return successes, [Reply("secure-sum", mean, outcome.total_samples, {})]

    async def _train_one(self, target: Target, round_number: int, scalars: dict[str, Any], tensors: list[Buffer],
                         progress: RoundProgress, evaluate_only: bool = False,
                         secagg: SecAggMasking | None = None, cast: str = "") -> TrainResult:
        """One pod's part of a round; `cast`: the id of the ModelCast that brought it `tensors`."""
        name = target.pod.name

        def message(task_id: str) -> TrainRequest:
            return TrainRequest(task_id=task_id, experiment_id=self._experiment_id, round=round_number,
                                dataset=target.dataset.name, plan=self._plan_spec, model_args=self._model_args,
                                training_args=self._training_args.model_dump(exclude_none=True),
                                round_config=scalars, tensors=[] if cast else tensors, evaluate_only=evaluate_only,
                                secagg=secagg, model_cast=cast)
        try:
            result = await self._modeller._core.exchange(target, message, TrainResult,
                                                         on_phase=lambda phase: progress.update(name, phase))
        except TaskFailed as failed:
            if not (cast and failed.kind == CastMissing.__name__):
                progress.update(name, "failed")
                raise
            log.info("round %d: %s lacks the cast model (%s); sending it the model directly", round_number, name,
                     failed.message)
            return await self._train_one(target, round_number, scalars, tensors, progress, evaluate_only, secagg)
        except BaseException:
            progress.update(name, "failed")
            raise
        progress.update(name, "done")
        return result

    async def _train_all(self, selected: list[Target], round_number: int, scalars: dict[str, Any],
                         tensors: list[Buffer], progress: RoundProgress,
                         evaluate_only: bool = False) -> list[TrainResult | BaseException]:
        cast, received = await self._modeller._core.cast_model([t.pod for t in selected], tensors)
        return await asyncio.gather(*(self._train_one(t, round_number, scalars, tensors, progress, evaluate_only,
                                                      cast=cast if t.pod.fingerprint in received else "")
                                      for t in selected), return_exceptions=True)

    def _targets(self) -> Targets:
        """The experiment's datasets, found once (as Fed-BioMed fixes its federated dataset) and
        again only after `set_tags`, `set_datasets` or `set_nodes`: discovery by tags must wait
        out its collection window, which would otherwise dominate every round."""
        if self._resolved is None:
            self._resolved = self._resolve_targets()
            self._standardise(self._resolved)
        return self._resolved

    def _standardise(self, targets: Targets) -> None:
        """A built-in tabular model learns on features scaled by their global means and standard
        deviations (federated SQL, exact), unless the model_args carry their own or
        `standardize=False`: raw features of different scales made the README's example stall."""
        if self._plan_spec.kind == "builtin" and self._round == 0 and not self._model_args.get("codes") and \
                getattr(self._plan, "needs_vocabulary", False):
            self._agree_vocabulary(targets)
        if not (self._standardize and self._plan_spec.kind == "builtin" and self._round == 0
                and getattr(self._plan, "standardisable", False)
                and "feature_means" not in self._model_args and "target" in self._model_args):
            return
        from fedpod.modeller.standardise import global_standardisation, numeric_features

        features = numeric_features(targets[0], self._model_args)
        self._model_args |= global_standardisation(self._modeller, list(targets), features)
        self._plan.model_args = dict(self._model_args)  # the model's shape is unchanged: no rebuild

    def _agree_vocabulary(self, targets: Targets) -> None:
        """A journey model's `codes`: the `top_k` (30) most frequent codes over every dataset of
        the experiment, counted once through federated SQL — never each pod's own top codes."""
        from fedpod.modeller.vocabulary import federated_vocabulary

        vocabulary = federated_vocabulary(self._modeller, int(self._model_args.get("top_k", 30)),
                                          table=targets[0].dataset.name, datasets=[t.identifier for t in targets],
                                          code_column=self._model_args.get("code_column", "code"))
        self._model_args["codes"] = vocabulary.codes
        self._rebuild_plan()  # the model's input width is the vocabulary's size
        log.info("vocabulary agreed over %d dataset(s): %d codes", len(vocabulary.datasets), len(vocabulary.codes))

    def _resolve_targets(self) -> Targets:
        """Every dataset asked for must take part (each missing one is named), unless `min_pods`
        accepts fewer: then the missing ones are reported in every round's replies."""
        found = self._modeller.resolve(self._datasets or None, self._tags or None, min_datasets=self._min_pods)
        targets = Targets([t for t in found if self._nodes is None or t.pod.name in self._nodes], found.missing)
        pods = [t.pod.name for t in targets]
        duplicated = sorted({p for p in pods if pods.count(p) > 1})
        if duplicated:
            raise ConfigError(f"an experiment takes one dataset per pod; pods {duplicated} were given several")
        if not targets:
            raise ConfigError("no pod offers the requested datasets")
        return targets

    def _record(self, record: RoundRecord) -> None:
        self._history.add(record)
        self._live = None
        append_metrics(self._folder, record.number, record.replies, self._history.replies)
        if self._board is not None:
            self._board.write(record.number, record.replies)
        params_file = save_aggregated(self._folder, record.number, self._global)
        if self._save_breakpoints:
            save_breakpoint(self._folder, record.number, self._state(), params_file, self._aggregator.state(),
                            self._plan_spec.source)
        self._show(record)

    def _show(self, record: RoundRecord) -> None:
        """One compact table per round: samples, training loss, validation metrics, the epsilon
        each pod has spent on the experiment (under DP), seconds. Not even built for a quiet
        console: rich renders before it discards, a tenth of the modeller's time in 40 ms rounds."""
        if self._console.quiet:
            return
        pods = record.replies
        validation = sorted({k for reply in pods.values() for k in reply
                             if k.startswith(("global_", "local_")) and not k.endswith("_samples")})
        validation += [EPSILON] if any(EPSILON in reply for reply in pods.values()) else []
        last = self._round_limit - 1 if self._round_limit else "?"
        title = f"round {record.number} [0..{last}] ({record.seconds:.2f}s)"
        table = Table(title=escape(title), title_justify="left")
        for column in ["pod", "samples", "loss", *validation, "seconds"]:
            table.add_column(column, justify="left" if column == "pod" else "right")
        for pod, reply in sorted(pods.items()):
            if "error" in reply:
                table.add_row(pod, f"[red]{escape(str(reply['error']))}[/red]")
                continue
            cells = [str(reply["num_samples"]), f"{reply['loss']:.4f}" if "loss" in reply else "",
                     *[f"{reply[k]:.4f}" if k in reply else "" for k in validation], f"{reply['seconds']:.2f}"]
            table.add_row(pod, *cells)
        self._console.print(table)

    # --- breakpoints -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"experiment_id": self._experiment_id, "folder": str(self._folder), "round": self._round,
                "broker": self._modeller.broker.as_dict(),
                "round_limit": self._round_limit, "tags": self._tags, "datasets": self._datasets,
                "nodes": self._nodes, "plan": self._plan_spec.model_dump(exclude={"source"}),
                "model_args": self._model_args, "training_args": self.training_args(),
                "aggregator": self._aggregator.get_config(), "min_pods": self._min_pods,
                "update_norm_limit": self._update_norm_limit,
                "secagg": None if self._secagg is None else dataclasses.asdict(self._secagg)}

    @classmethod
    def load_breakpoint(cls, path: str | Path | None = None, **connection: Any) -> Experiment:
        """Resume from a breakpoint folder, an experiment folder (its latest breakpoint), a folder
        of experiments (its latest), or — with no path, as in Fed-BioMed — the latest breakpoint
        of the latest experiment under `experiments_root` (default ./experiments). It reconnects
        to the broker it was made with (URL, TLS and credentials files) unless `connection` says
        otherwise; `connection` takes the constructor's keyword arguments (broker, identity,
        keystore, modeller, ...)."""
        folder = Path(path) if path is not None else Path(connection.pop("experiments_root", "experiments"))
        connection.pop("experiments_root", None)
        if path is None or not ((folder / "state.json").exists() or (folder / "breakpoints").exists()):
            path = latest_experiment(folder)  # a folder of experiments: its latest one
        state, params, aggregator_state, source = read_breakpoint(Path(path))
        if "broker" in state and not {"broker", "modeller"} & set(connection):
            connection["broker"] = BrokerOptions.from_dict(state["broker"])
        plan = PlanSpec.model_validate({**state["plan"], "source": source})
        plan_class: type[TrainingPlan] | str = load_plan_class(source, plan.name) if source else plan.name
        aggregator = aggregator_from_config(state["aggregator"])
        aggregator.load_state(aggregator_state)
        folder = Path(state["folder"])
        recorded = read_rounds(folder) or [RoundRecord(int(number), 0.0, replies, {})  # older breakpoints
                                           for number, replies in state.get("replies", {}).items()]  # kept them
        earlier = [r for r in recorded if r.number < state["round"]]  # the rounds after it are run again
        experiment = cls(tags=state["tags"] or None, datasets=state["datasets"] or None, nodes=state["nodes"],
                         training_plan_class=plan_class, model_args=state["model_args"],
                         training_args=state["training_args"], round_limit=state["round_limit"],
                         aggregator=aggregator, save_breakpoints=True, experimentation_folder=folder.name,
                         experiments_root=folder.parent, min_pods=state["min_pods"],
                         update_norm_limit=state.get("update_norm_limit", DEFAULT_NORM_LIMIT),
                         secagg=state.get("secagg") or False, **connection)
        experiment._experiment_id = state["experiment_id"]
        experiment._round = state["round"]
        experiment._global = params
        experiment._plan.adopt_params(params)
        experiment._history.restore(earlier)
        write_metrics(folder, experiment._history.replies())
        return experiment

    def _build_plan(self) -> TrainingPlan:
        """The plan at the modeller (it holds the global model). Its code is the user's: what it
        raises is reported as one line naming the plan, the traceback kept for --debug."""
        seed_everything(self._training_args.random_seed)
        try:
            plan = self._plan_class()
            plan.post_init(self._model_args, self._training_args)
        except FedpodError:
            raise
        except Exception as exc:
            raise ConfigError(f"training plan {self._plan_spec.name} failed while being set up at the modeller: "
                              f"{type(exc).__name__}: {exc}",
                              hint="check the model_args and training_args the plan reads") from exc
        return plan

    def _check_aggregator_fits(self, args: TrainingArgs) -> None:
        if getattr(self._aggregator, "requires_num_updates", False) and not args.uses_updates:
            raise ConfigError(f"{type(self._aggregator).__name__} needs `num_updates` in training_args")
        if self._secagg is not None and self._aggregator.sees_each_update:
            raise ConfigError(f"{type(self._aggregator).__name__} needs each pod's update, which secure aggregation "
                              "hides", hint="use fedavg, fedprox, fedadam, fedyogi or fedadagrad with secagg")

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
        if self._owns_modeller:
            self._modeller.close()

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
