"""The messages parties exchange. Each travels as the payload of an envelope whose header
`type` is the model's `TYPE`. Unknown fields are ignored so that newer peers can add some."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

# Bulk bytes travel outside msgpack (see wire.codec) and are never copied or validated here;
# a list is one field given as parts (tensors encoded without a copy).
BulkBytes = Annotated[bytes | bytearray | memoryview, SkipValidation]
BulkParts = Annotated[bytes | bytearray | memoryview | list[bytes | bytearray | memoryview], SkipValidation]


class WireMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, arbitrary_types_allowed=True)
    TYPE: ClassVar[str]
    BULK: ClassVar[str | None] = None


class Discover(WireMessage):
    """Sent by a modeller to each pod that announced itself (after an empty ping on the discover
    subject makes every pod beat), sealed like any task. It is empty: what the modeller looks
    for (tags, identifiers) is chosen among the adverts at the modeller. Each pod answers with
    its advert, sealed for the sender only, and only as much as its `discovery` setting grants
    that sender."""

    TYPE: ClassVar[str] = "discover"


class DatasetAdvert(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    identifier: str
    name: str
    tags: list[str] = []
    kind: str = ""
    columns: dict[str, str] = {}
    rows_rounded: int = 0
    description: str = ""
    tables: dict[str, dict[str, str]] = {}  # the dataset's other tables (an events dataset's static one): schemas


class PodAdvert(WireMessage):
    """`notice` is set when the pod does not accept the modeller that asked: it then lists no
    dataset (or only their names, if its custodian chose `discovery: names`)."""

    TYPE: ClassVar[str] = "advert"
    pod: str
    fingerprint: str
    datasets: list[DatasetAdvert]
    version: str
    heartbeat_s: float = 2.0
    notice: str | None = None


class Heartbeat(WireMessage):
    """`phases`: what the pod is doing with each task it holds (task id -> "queued", "preparing",
    "training", "running" or "replying"), so a modeller can show progress; a task id means
    nothing to anyone but the modeller that chose it."""

    TYPE: ClassVar[str] = "heartbeat"
    pod: str
    fingerprint: str
    ts: float
    running_tasks: int
    uptime_s: float
    phases: dict[str, str] = {}


class SqlQueryAlgorithm(BaseModel):
    """Run `query` on the dataset. `mode="partials"` marks a rewritten aggregate query whose
    rows are mergeable partial aggregates rather than final answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["sql"] = "sql"
    query: str
    mode: Literal["rows", "partials"] = "rows"


class QuantileCountsAlgorithm(BaseModel):
    """One step of an exact federated quantile search (`fedpod.algorithms.sql.quantiles`): the
    pod counts, per argument of the quantile `query`, its values at or below each threshold.
    The pod builds the counting SQL itself from `query`; it never runs SQL the step carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["quantile_counts"] = "quantile_counts"
    query: str = Field(max_length=20_000)
    thresholds: list[Annotated[list[float], Field(max_length=4096)]] = Field(max_length=16)


class NoisyAggregateAlgorithm(BaseModel):
    """An aggregate query answered with Laplace noise (`fedpod.algorithms.sql.noisy`): `epsilon`
    for the whole query, charged to the pod's ledger; `bounds` per summed column, to clamp to.
    The pod plans and clamps the partials itself from `query`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["noisy_sql"] = "noisy_sql"
    query: str = Field(max_length=20_000)
    epsilon: float = Field(gt=0, le=100)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict, max_length=64)


Algorithm = Annotated[SqlQueryAlgorithm | QuantileCountsAlgorithm | NoisyAggregateAlgorithm,
                      Field(discriminator="kind")]


class SecAggMasking(BaseModel):
    """Step 3 of secure aggregation, riding on a TrainRequest (or an aggregate TaskRequest): the session, the sealed
    shares the other pods sent for this one (owner -> sealed bytes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    session: str = Field(pattern="^[0-9a-f]{32}$")
    sealed: dict[str, bytes] = Field(default_factory=dict, max_length=1024)


class TaskRequest(WireMessage):
    """`secagg`: an aggregate whose partials (COUNT and SUM) the pod sends masked, for a
    secure sum across pods (`fedpod.algorithms.sql.secure`), never in the clear."""

    TYPE: ClassVar[str] = "task"
    task_id: str
    dataset: str
    algorithm: Algorithm
    secagg: SecAggMasking | None = None


class PlanSpec(BaseModel):
    """Which training plan to run: a built-in model by name (no approval needed), or the
    source of a custom plan class, which a pod runs only once its custodian approved that
    exact source (sha256)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["builtin", "custom"]
    name: str
    source: str | None = None
    sha256: str | None = None


CONFIG_PREFIX = "config."  # tensor groups of a TrainRequest that are array-valued round instructions
EXTRA_PREFIX = "extra."  # tensor groups of a TrainResult beside `params` (Scaffold's control variate)
MASKED = "masked"  # the tensor group of a TrainResult under secure aggregation: `y`, uint64, instead of `params`


Purpose = Literal["train", "sql_aggregate"]  # what a secure aggregation session sums: a model update, SQL partials


class SecAggRequest(WireMessage):
    """Steps 1, 2 and 4 of secure aggregation (`fedpod.aggregation.secure.protocol`) for one
    round on one dataset: `keys` (with the participants and settings), `shares` (with every
    pod's public keys: pod -> [seal key, mask key, commitment]) and `unmask` (who survived and
    who dropped). `purpose` is the task kind the session serves, which the modeller must hold."""

    TYPE: ClassVar[str] = "secagg"
    task_id: str
    session: str = Field(pattern="^[0-9a-f]{32}$")
    dataset: str
    purpose: Purpose = "train"
    step: Literal["keys", "shares", "unmask"]
    participants: list[str] = Field(default_factory=list, max_length=1024)
    settings: dict[str, float | int | None] = {}
    keys: dict[str, list[bytes]] = Field(default_factory=dict, max_length=1024)
    survivors: list[str] = Field(default_factory=list, max_length=1024)
    dropped: list[str] = Field(default_factory=list, max_length=1024)


class SecAggReply(WireMessage):
    """A pod's answer to a SecAggRequest: its public keys, its sealed shares (holder -> bytes),
    or its unmasking shares (owner -> [kind, x, y as bytes])."""

    TYPE: ClassVar[str] = "secagg-reply"
    task_id: str
    step: Literal["keys", "shares", "unmask"]
    keys: list[bytes] = []
    sealed: dict[str, bytes] = {}
    shares: dict[str, tuple[str, int, bytes]] = {}


class TrainRequest(WireMessage):
    """One round of training on one dataset. The bulk part holds safetensors with the group
    `params` (global parameters) and any array-valued round instructions (`config.<key>`).
    With `evaluate_only`, the pod only validates the given parameters on its data (task kind
    `evaluate` in its policy) and sends them back unchanged with the metrics."""

    TYPE: ClassVar[str] = "train"
    BULK: ClassVar[str | None] = "tensors"
    task_id: str
    experiment_id: str
    round: int
    dataset: str
    plan: PlanSpec
    model_args: dict[str, Any] = {}
    training_args: dict[str, Any] = {}
    round_config: dict[str, Any] = {}
    evaluate_only: bool = False
    secagg: SecAggMasking | None = None  # set: send the update masked (group `masked`), never in the clear
    model_cast: str = ""  # set: `tensors` is empty, the pod was sent them in the ModelCast of this id
    tensors: BulkParts


class ModelCast(WireMessage):
    """A round's `tensors` (as in TrainRequest) sent once to every selected pod, which keeps them
    briefly for the TrainRequest naming `cast_id`: the modeller's link carries the model once,
    not once per pod."""

    TYPE: ClassVar[str] = "model-cast"
    BULK: ClassVar[str | None] = "tensors"
    cast_id: str = Field(max_length=64)
    tensors: BulkParts


class TrainResult(WireMessage):
    """A pod's local update: safetensors with `params` and any `extra.<key>` groups."""

    TYPE: ClassVar[str] = "train-result"
    BULK: ClassVar[str | None] = "tensors"
    task_id: str
    round: int
    dataset: str
    num_samples: int
    metrics: dict[str, float]
    seconds: float
    device: str
    tensors: BulkParts
    feature_layout: str | None = None  # a digest of the input features' names, compared across pods
    audit_checkpoint: dict[str, Any] | None = None  # the pod's latest signed audit checkpoint, for the modeller to keep


class TaskResult(WireMessage):
    TYPE: ClassVar[str] = "result"
    BULK: ClassVar[str | None] = "table"
    task_id: str
    dataset: str
    table: BulkBytes
    seconds: float
    audit_checkpoint: dict[str, Any] | None = None  # the pod's latest signed audit checkpoint, for the modeller to keep
    # what the pod's limits changed or spent: suppressed_groups, withheld_values, rows_capped_at, withheld_counts,
    # dp_epsilon...
    disclosure: dict[str, int | float] = {}


class TaskFailure(WireMessage):
    """A refusal or error, sent back instead of a result; `kind` is the pod's error class. A
    refusal names the policy `rule` and, where the custodian can grant it, the `request_id`
    of the access request it opened."""

    TYPE: ClassVar[str] = "failure"
    task_id: str
    dataset: str | None = None
    kind: str
    message: str
    hint: str | None = None
    rule: str | None = None
    request_id: int | None = None


class AccessStatusQuery(WireMessage):
    """A modeller asking a pod about its own access requests (answered even to unknown keys:
    that is who has requests)."""

    TYPE: ClassVar[str] = "access-status-query"


class AccessRequestState(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    id: int
    dataset: str
    kinds: list[str]
    status: str
    first_seen: str
    count: int
    decided: str | None = None


class AccessStatus(WireMessage):
    TYPE: ClassVar[str] = "access-status"
    pod: str
    requests: list[AccessRequestState]
    granted: dict[str, list[str]] = {}  # dataset -> task kinds this modeller holds now
