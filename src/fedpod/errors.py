"""fedpod's exceptions: one tree, each error saying what happened, where, and what to do.

    FedpodError
    ├── ConfigError (ValueError)            a config file, keystore or argument is wrong
    ├── EnvelopeRejected (ValueError)       a message failed verification (tampered, replayed, ...)
    ├── TransportError (ConnectionError)
    │   ├── BrokerUnavailable               no NATS server at the URL, or it failed to start
    │   ├── PodUnreachable                  nobody listens on the pod's inbox (pod offline)
    │   ├── PodLost                         a pod stopped sending heartbeats while it held a task
    │   └── TaskTimeout (TimeoutError)      the pod took the task but did not answer in time
    ├── AccessDenied (PermissionError)      the pod's access decision refused the task
    ├── DiscoveryError (LookupError)
    │   ├── DatasetNotFound                 no pod answered for an identifier or tag set
    │   └── AmbiguousDatasets               tags matched more than one dataset on one pod
    ├── SqlError (ValueError)
    │   ├── SqlRejected                     the query is not a single read-only SELECT on the dataset
    │   ├── NotMergeable                    an aggregated query uses a construct that cannot merge exactly
    │   ├── SqlExecutionError               DuckDB refused or failed the query
    │   └── ResultTooLarge                  the answer exceeds the pod's max_result_rows/max_result_bytes
    ├── MissingDatasets                     several datasets a task asked for will not take part (each named)
    ├── TrustError (PermissionError)        a pod's fingerprint differs from the pinned one
    ├── PlanNotApproved (PermissionError)   a custom training plan awaits (or was refused) its custodian's approval
    └── TaskFailed                          a pod reported a failure while running a task

Errors raised by third-party libraries are mapped at the edge (`raise X(...) from exc`), so
callers only ever need `except FedpodError` (or the matching builtin).
"""

from __future__ import annotations

import re
from typing import Any

_TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|[\x00-\x08\x0b-\x1f\x7f]")


def plain(text: str) -> str:
    """Without terminal escape sequences or control characters: libraries colour their messages
    (sqlglot underlines the bad token), and a message can come from a remote pod."""
    return _TERMINAL_CONTROL.sub("", text)


class FedpodError(Exception):
    """Base of every fedpod error; carries where it happened and a hint on what to do."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.message = plain(message)
        self.where = plain(where) if where is not None else None
        self.hint = plain(hint) if hint is not None else None
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = self.message
        if self.where:
            text = f"{self.where}: {text}"
        if self.hint:
            text = f"{text} (hint: {self.hint})"
        return text


class ConfigError(FedpodError, ValueError):
    pass


class EnvelopeRejected(FedpodError, ValueError):
    """`reason` is one of REASONS, so that receivers can count rejections by kind. A replayed
    envelope names itself in `envelope` (its signer's key and nonce), so that a receiver that
    answered the original can answer the copy alike (`SecureChannel`)."""

    REASONS = (
        "malformed",
        "unsigned",
        "bad-signature",
        "tampered",
        "expired",
        "future",
        "replayed",
        "wrong-recipient",
        "fingerprint-mismatch",
    )

    def __init__(self, reason: str, detail: str = "", *, where: str | None = None,
                 envelope: tuple[bytes, bytes] | None = None) -> None:
        assert reason in self.REASONS, reason
        self.reason = reason
        self.envelope = envelope
        super().__init__(f"envelope rejected ({reason}){': ' + detail if detail else ''}", where=where)


class TransportError(FedpodError, ConnectionError):
    pass


class BrokerUnavailable(TransportError):
    pass


class CastMissing(TransportError):
    """A pod was told its round's model came in a cast it does not have: the modeller sends the
    request again with the model in it."""


class PodUnreachable(TransportError):
    pass


class TaskTimeout(TransportError, TimeoutError):
    pass


class PodLost(TransportError):
    pass


class AccessDenied(FedpodError, PermissionError):
    def __init__(self, message: str, *, where: str | None = None, rule: str | None = None,
                 hint: str | None = None) -> None:
        self.rule = rule
        self.request_id: int | None = None  # the access request a pod opened for this refusal
        super().__init__(message + (f" [rule: {rule}]" if rule else ""), where=where, hint=hint)


class DiscoveryError(FedpodError, LookupError):
    pass


class DatasetNotFound(DiscoveryError):
    pass


class MissingDatasets(FedpodError):
    """Datasets a task asked for will not take part (silent at discovery, refused, or failed while
    running): `missing` maps each identifier to why."""

    def __init__(self, missing: dict[str, str], taking_part: int, needed: str) -> None:
        self.missing = dict(missing)
        reasons = "; ".join(f"{identifier}: {why}" for identifier, why in sorted(self.missing.items()))
        super().__init__(f"{len(self.missing)} dataset(s) asked for will not take part ({taking_part} would, "
                         f"{needed} needed) — {reasons}",
                         hint="start or fix those pods, or accept a partial answer with --min-datasets N "
                              "(Python: min_datasets=N; training: min_pods)")


class AmbiguousDatasets(DiscoveryError):
    pass


class SqlError(FedpodError, ValueError):
    pass


class SqlRejected(SqlError):
    pass


class NotMergeable(SqlError):
    def __init__(self, construct: str, reason: str) -> None:
        self.construct = construct
        super().__init__(
            f"cannot merge `{construct}` exactly across datasets: {reason}",
            hint="run the query without an aggregator to get one result per dataset",
        )


class SqlExecutionError(SqlError):
    pass


class ResultTooLarge(SqlError):
    pass


class TrustError(FedpodError, PermissionError):
    pass


class PlanNotApproved(FedpodError, PermissionError):
    pass


class SecAggError(FedpodError):
    """A secure-aggregation round that cannot complete securely; the message says who and what."""


class TaskFailed(FedpodError):
    """A pod answered with a failure; `kind` is the pod-side error class name."""

    def __init__(self, message: str, *, pod: str, kind: str, hint: str | None = None) -> None:
        self.pod = pod
        self.kind = kind
        super().__init__(f"{kind}: {message}", where=f"pod {pod}", hint=hint)


def invalid_fields(exc: Exception, what: str, where: str) -> ConfigError:
    """A pydantic ValidationError as "field X in FILE: problem" lines, without links to docs."""
    problems: list[dict[str, Any]] = getattr(exc, "errors", list)()
    lines = [f"field {'.'.join(str(part) for part in problem['loc']) or '(top level)'} in {where}: {problem['msg']}"
             for problem in problems] or [str(exc)]
    return ConfigError(f"invalid {what}: " + "; ".join(lines))


def yaml_syntax(exc: Exception, where: str) -> ConfigError:
    """A YAML parser error, naming the file, line and column, with the parser's own words."""
    mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    if context and context_mark is not None:
        context = f"{context} (begun at line {context_mark.line + 1}, column {context_mark.column + 1})"
    problem = ": ".join(str(part) for part in (context, getattr(exc, "problem", None)) if part)
    return ConfigError(f"YAML syntax error in {where}{place}: {problem or exc}")
