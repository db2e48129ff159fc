"""A pod's SQL tasks, run within the dataset's disclosure limits: plain aggregates and row
queries, secure sums, quantile steps and noisy aggregates.

Apart from the service because what they need — DuckDB, sqlglot, numpy, pyarrow — is most of an
idle pod's memory: the service imports this module, and builds its engine, on the first SQL task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedpod.algorithms.sql.dialect import parse_statement
from fedpod.algorithms.sql.disclosure import (
    QueryShape,
    Release,
    disclosed_query,
    read_columns,
    shape,
    suppress_small_groups,
)
from fedpod.algorithms.sql.engine import SqlEngine
from fedpod.algorithms.sql.noisy import add_noise, plan_noisy
from fedpod.algorithms.sql.quantiles import check_thresholds, count_sql, plan_quantiles, pod_counts
from fedpod.algorithms.sql.secure import encode_partials, secure_partials
from fedpod.errors import AccessDenied, FedpodError, ResultTooLarge, SqlRejected
from fedpod.governance.differencing import CohortLedger, released_cohorts
from fedpod.governance.privacy_budget import Budget, PrivacyLedger
from fedpod.security.digest import bulk_digest
from fedpod.wire.codec import table_to_bytes
from fedpod.wire.messages import (
    NoisyAggregateAlgorithm,
    QuantileCountsAlgorithm,
    SecAggMasking,
    SqlQueryAlgorithm,
    TaskRequest,
    TaskResult,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from fedpod.governance.policy import DatasetPolicy
    from fedpod.pod.config import PodConfig
    from fedpod.pod.secure_aggregation import SecAggSessions

Outcome = tuple[TaskResult, dict[str, Any]]  # the reply, and what the audit log records about it


def query_shape(algorithm: SqlQueryAlgorithm | QuantileCountsAlgorithm | NoisyAggregateAlgorithm,
                columns: list[str]) -> QueryShape:
    """What kind of task a query is, judged from its SQL. A quantile step releases counts (its own
    disclosure rule applies: `SqlTasks._quantile_counts`), so it is judged as an aggregate when
    its query is one the search accepts."""
    try:
        if isinstance(algorithm, QuantileCountsAlgorithm):
            return QueryShape("sql_aggregate", read_columns(parse_statement(algorithm.query), columns), "") \
                if plan_quantiles(algorithm.query) else QueryShape("sql_rows", frozenset(), "")
        return shape(algorithm.query, tuple(columns))
    except FedpodError:  # unreadable SQL: judged as the most revealing kind; the engine says why later
        return QueryShape("sql_rows", frozenset(), "it does not parse or search")


class SqlTasks:
    def __init__(self, engine: SqlEngine, cohorts: CohortLedger, secagg: Callable[[], SecAggSessions],
                 privacy: Callable[[], PrivacyLedger]) -> None:
        self.engine = engine
        self.cohorts = cohorts
        self._secagg = secagg
        self._privacy = privacy

    def run(self, request: TaskRequest, requester: str, kind: str, limits: DatasetPolicy,
            config: PodConfig) -> Outcome:
        """Run a SQL task in a worker thread; `kind` is the pod's own judgement of it (`query_shape`)."""
        started = time.perf_counter()
        if isinstance(request.algorithm, QuantileCountsAlgorithm):
            return self._quantile_counts(request, request.algorithm, limits, config, started)
        if isinstance(request.algorithm, NoisyAggregateAlgorithm):
            return self._noisy_aggregate(request, request.algorithm, requester, limits, config, started)
        aggregate = kind == "sql_aggregate"
        query, release = request.algorithm.query, None
        if aggregate:
            if limits.protect_differencing and request.dataset in self.engine.rowid_hidden:
                raise AccessDenied(f"{request.dataset} has a column named rowid, which hides the row ids the pod "
                                   "tells cohorts apart by, so it cannot check aggregates against differencing "
                                   "[rule: protect_differencing]", where=f"dataset {request.dataset}",
                                   hint="the custodian can rename that column, or set protect_differencing: false")
            try:
                query, release = disclosed_query(query, self.engine.non_null[request.dataset],
                                                 cohorts=limits.protect_differencing)
            except ValueError as exc:
                raise AccessDenied(f"the pod cannot check this aggregate against differencing ({exc}) "
                                   "[rule: protect_differencing]", where=f"dataset {request.dataset}",
                                   hint="use plain GROUP BY keys, or ask the custodian") from exc
        table = self.engine.run(query, request.dataset, timeout_s=config.sql_timeout_s,
                                max_rows=config.max_result_rows, cap_rows=None if aggregate else limits.max_rows)
        disclosure: dict[str, int | float] = {}
        if release is not None:
            if release.cohorts is not None:
                self._check_differencing(table, release, request, requester, limits.min_group_size, config)
            table, suppressed, withheld = suppress_small_groups(table, limits.min_group_size, release)
            if request.secagg is not None:
                return self._masked_partials(request, request.secagg, requester, table, suppressed + withheld, limits,
                                             config, started)
            if limits.max_groups is not None and table.num_rows > limits.max_groups:
                raise AccessDenied(f"the answer has {table.num_rows} groups; {request.dataset} releases at most "
                                   f"{limits.max_groups} per aggregate", rule="max_groups",
                                   where=f"dataset {request.dataset}",
                                   hint="group by fewer or coarser keys, filter with WHERE, or ask the custodian to "
                                        "raise max_groups")
            if suppressed or withheld:
                disclosure = {**({"suppressed_groups": suppressed} if suppressed else {}),
                              **({"withheld_values": withheld} if withheld else {}),
                              "min_group_size": limits.min_group_size}
        elif limits.max_rows is not None and table.num_rows > limits.max_rows:
            table = table.slice(0, limits.max_rows)
            disclosure = {"rows_capped_at": limits.max_rows}
        return _answer(request, table, disclosure, config, started)

    def _masked_partials(self, request: TaskRequest, masking: SecAggMasking, requester: str, table: pa.Table,
                         suppressed: int, limits: DatasetPolicy, config: PodConfig, started: float) -> Outcome:
        """An aggregate's partials, masked for a secure sum (`algorithms.sql.secure`): the pod's
        cell passed its disclosure rules first; only the masked vector leaves."""
        import pyarrow as pa

        try:
            _, kinds = secure_partials(request.algorithm.query)
        except FedpodError as exc:
            raise SqlRejected(exc.message, where=f"dataset {request.dataset}", hint=exc.hint) from exc
        if suppressed or table.num_rows != 1:
            raise AccessDenied(f"its cell holds fewer than {limits.min_group_size} rows here, too few to add "
                               "to a secure sum [rule: min_group_size]", where=f"dataset {request.dataset}",
                               hint="widen the WHERE selection")
        try:
            encoded = encode_partials(table.to_pylist()[0], kinds)
        except ValueError as exc:
            raise SqlRejected(str(exc), where=f"dataset {request.dataset}") from exc
        masked = self._secagg().mask_encoded(masking, requester, request.dataset, encoded, "sql_aggregate")
        return _answer(request, pa.table({"masked": pa.array(masked, pa.uint64())}), {}, config, started)

    def _quantile_counts(self, request: TaskRequest, algorithm: QuantileCountsAlgorithm, limits: DatasetPolicy,
                         config: PodConfig, started: float) -> Outcome:
        """One step of a federated quantile search: the pod builds its own counting query from
        the quantile query and releases counts only where both sides of a threshold hold at
        least `min_group_size` of its values (`algorithms.sql.quantiles`). Exempt from the
        differencing ledger, whose one-row differences a search is made of: see the README."""
        try:
            plan = plan_quantiles(algorithm.query)
            thresholds = check_thresholds(plan, algorithm.thresholds)
        except FedpodError as exc:
            raise SqlRejected(exc.message, where=f"dataset {request.dataset}", hint=exc.hint) from exc
        sql, params = count_sql(plan, thresholds)
        table = self.engine.run(sql, request.dataset, timeout_s=config.sql_timeout_s, max_rows=1, params=params)
        try:
            counts, withheld = pod_counts(table.to_pylist()[0], plan, thresholds, limits.min_group_size)
        except PermissionError as exc:
            raise AccessDenied(f"{exc} [rule: min_group_size]", where=f"dataset {request.dataset}",
                               hint="widen the WHERE selection") from exc
        disclosure: dict[str, int | float] = {"withheld_counts": withheld,
                                              "min_group_size": limits.min_group_size} if withheld else {}
        return _answer(request, counts, disclosure, config, started)

    def _noisy_aggregate(self, request: TaskRequest, algorithm: NoisyAggregateAlgorithm, requester: str,
                         limits: DatasetPolicy, config: PodConfig, started: float) -> Outcome:
        """An aggregate with Laplace noise (`algorithms.sql.noisy`), its epsilon charged to the
        dataset's budget before the query runs; a charge beyond it is refused naming what remains."""
        try:
            plan = plan_noisy(algorithm.query, algorithm.bounds)
        except FedpodError as exc:
            raise SqlRejected(exc.message, where=f"dataset {request.dataset}", hint=exc.hint) from exc
        spent = self._privacy().charge(dataset=request.dataset, modeller=requester,
                                       name=config.policies.name_of(requester) or requester,
                                       experiment=f"sql:{request.task_id}", delta=0.0, pure_epsilon=algorithm.epsilon,
                                       budget=Budget.of(limits))
        table = self.engine.run(plan.partial_sql, request.dataset, timeout_s=config.sql_timeout_s, max_rows=1)
        disclosure: dict[str, int | float] = {"dp_epsilon": algorithm.epsilon,
                      **({"dp_epsilon_remaining": spent.remaining} if spent.remaining is not None else {})}
        return _answer(request, add_noise(table, plan, algorithm.epsilon), disclosure, config, started)

    def _check_differencing(self, table: pa.Table, release: Release, request: TaskRequest, requester: str,
                            min_size: int, config: PodConfig) -> None:
        """Refuse an answer whose released cohorts differ from ones this modeller already got by 1
        to `min_size - 1` rows (`governance.differencing`); keep them otherwise."""
        engine, dataset = self.engine, request.dataset
        why = self.cohorts.check_and_keep(
            requester, dataset, engine.versions[dataset], released_cohorts(table, release, min_size), min_size,
            lambda sql, params: engine.row_ids(sql, params, dataset, timeout_s=config.sql_timeout_s),
            lambda sql, params: engine.sketch(sql, params, dataset, timeout_s=config.sql_timeout_s))
        if why:
            raise AccessDenied(f"{why} [rule: protect_differencing]", where=f"dataset {dataset}",
                               hint="query cohorts that differ by at least min_group_size rows from those you "
                                    "already have")


def _answer(request: TaskRequest, table: pa.Table, disclosure: dict[str, int | float], config: PodConfig,
            started: float) -> Outcome:
    """The reply to a SQL task, within `max_result_bytes`, and what the audit log records."""
    payload = table_to_bytes(table)
    if len(payload) > config.max_result_bytes:
        raise ResultTooLarge(f"the result is {len(payload):,} bytes, over this pod's max_result_bytes "
                             f"({config.max_result_bytes:,})", where=f"dataset {request.dataset}",
                             hint="select fewer columns or rows, or aggregate")
    seconds = time.perf_counter() - started
    returned = {"returned_rows": table.num_rows, "returned_columns": table.column_names,
                "result_blake3": bulk_digest(payload).hex(), "seconds": round(seconds, 4), **disclosure}
    return TaskResult(task_id=request.task_id, dataset=request.dataset, table=payload, seconds=seconds,
                      disclosure=disclosure), returned
