"""Fuzzing every parser a stranger can reach: at least 10,000 generated inputs each (hypothesis)
for envelope opening, transfer tickets and chunk headers, task files, the SQL guard and the
pod's own SQL planners. The
property is the same everywhere: a hostile input ends in the entry point's own refusal
(EnvelopeRejected, TicketRefused, TransportError, ConfigError, SqlError) — never in another
exception, a crash, or acceptance of something that was altered. Each test counts the inputs it
actually ran; the counts are in the README's security section.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpod.errors import ConfigError, EnvelopeRejected, SqlError, TransportError
from fedpod.security import envelope
from fedpod.security.digest import bulk_digest
from fedpod.security.envelope import MAGIC, VERSION, ReplayGuard, open_envelope, seal_bytes
from fedpod.security.identity import Identity, x25519, x25519_public
from fedpod.security.tickets import TicketRefused, check_ticket, issue_ticket
from fedpod.tasks.yaml_front import load_task

pytestmark = pytest.mark.fuzz
INPUTS = 10_000
FUZZ = settings(max_examples=INPUTS, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
SENDER, RECEIVER = Identity.generate("sender"), Identity.generate("receiver")
GENUINE = seal_bytes(SENDER, "task", b"payload " * 64, recipients=[RECEIVER.public], task_id="t1")
EXAMPLES = Path(__file__).parents[2] / "examples"


class Count:
    """How many inputs a fuzz target really ran (hypothesis may stop early if it runs out)."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, function: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(function)
        def counted(*args: Any, **kwargs: Any) -> None:
            self.runs += 1
            function(*args, **kwargs)
        return counted


def mutations(original: bytes) -> st.SearchStrategy[bytes]:
    """Bit flips, truncations, insertions and splices of a genuine message, and plain noise."""
    flips = st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 7)), min_size=1, max_size=4).map(
        lambda changes: _flip(original, changes))
    cuts = st.integers(0, len(original) - 1).map(lambda n: original[:n])
    inserts = st.tuples(st.integers(0, len(original)), st.binary(min_size=1, max_size=64)).map(
        lambda x: original[: x[0]] + x[1] + original[x[0]:])
    return st.one_of(flips, cuts, inserts, st.binary(max_size=2048))


def _flip(original: bytes, changes: list[tuple[int, int]]) -> bytes:
    data = bytearray(original)
    for index, bit in changes:
        data[index] ^= 1 << bit
    return bytes(data)


GENUINE_HEADER = open_envelope(GENUINE, RECEIVER, ReplayGuard()).header.model_dump()


def header_with(changes: dict[str, Any]) -> bytes:
    """An envelope whose sealed header has fields replaced — signed by the sender and sealed for
    the receiver, as an accepted party gone rogue could send (built as `envelope.seal` does)."""
    header = {**GENUINE_HEADER, **changes}
    key, base, ephemeral = os.urandom(32), os.urandom(8), os.urandom(32)
    ephemeral_public = x25519_public(ephemeral)
    kek, tag = envelope._wrap_keys(x25519(ephemeral, RECEIVER.public.box_public), ephemeral_public,
                                   RECEIVER.public.box_public)
    header_bytes = msgpack.packb(header, use_bin_type=True)
    outer = msgpack.packb({"v": VERSION, "ephemeral": ephemeral_public, "base": base,
                           "header_len": len(header_bytes) + 80,
                           "wraps": [tag + AESGCM(kek).encrypt(b"\0" * 12, key, ephemeral_public)], "keys": None},
                          use_bin_type=True)
    cipher = AESGCM(key)
    sealed = cipher.encrypt(envelope._gcm_nonce(base, 0xFFFFFFFF), header_bytes + SENDER.sign(outer + header_bytes),
                            outer)
    nonce = header["nonce"] if isinstance(header["nonce"], bytes) else b""
    body = cipher.encrypt(envelope._gcm_nonce(base, 0), b"payload " * 64, envelope._segment_aad(nonce, 0, True))
    return MAGIC + len(outer).to_bytes(4, "big") + outer + sealed + body


def outer_with(changes: dict[str, Any]) -> bytes:
    """The genuine envelope with its plaintext (outer) fields replaced, as anyone on the broker can."""
    length = int.from_bytes(GENUINE[4:8], "big")
    outer = {**msgpack.unpackb(GENUINE[8 : 8 + length]), **changes}
    packed = msgpack.packb(outer, use_bin_type=True)
    return MAGIC + len(packed).to_bytes(4, "big") + packed + GENUINE[8 + length :]


header_values = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                          st.binary(max_size=64), st.text(max_size=64), st.lists(st.integers(-2**63, 2**63 - 1),
                                                                                 max_size=4),
                          st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**63 - 1), max_size=3))
header_fields = st.sampled_from(["v", "type", "sender_name", "sign_public", "box_public", "to", "task", "seq", "ts",
                                 "nonce", "segments", "digest", "extra"])
outer_fields = st.sampled_from(["v", "ephemeral", "base", "wraps", "header_len", "keys", "extra"])
outer_values = st.one_of(header_values, st.lists(st.binary(min_size=55, max_size=57), max_size=3))


def test_envelope_opening_refuses_every_altered_or_random_frame() -> None:
    count = Count()

    @FUZZ
    @given(st.one_of(mutations(GENUINE), st.dictionaries(header_fields, header_values, min_size=1).map(header_with),
                     st.dictionaries(outer_fields, outer_values, min_size=1).map(outer_with)))
    @count
    def opening(frame: bytes) -> None:
        try:
            opened = open_envelope(frame, RECEIVER, ReplayGuard())
        except EnvelopeRejected:
            return
        assert opened.payload == b"payload " * 64  # only an unaltered body can open

    opening()
    assert count.runs >= INPUTS
    FUZZ_COUNTS["envelope opening"] = count.runs


def test_transfer_tickets_refuse_every_altered_or_random_ticket() -> None:
    genuine = issue_ticket(SENDER, RECEIVER.public, "t", 3 * 1024 * 1024, [b"\1" * 32] * 3)
    count = Count()

    @FUZZ
    @given(mutations(genuine))
    @count
    def checking(ticket: bytes) -> None:
        try:
            checked = check_ticket(ticket, RECEIVER, ReplayGuard(), max_size=2**32, min_chunk=4096)
        except TicketRefused:
            return
        assert ticket == genuine and checked.sender.fingerprint == SENDER.fingerprint

    checking()
    assert count.runs >= INPUTS
    FUZZ_COUNTS["transfer tickets (begin requests)"] = count.runs


class FakeMsg:
    """Just what the bus reads of a NATS message: headers, data and a reply subject."""

    def __init__(self, headers: dict[str, str], data: bytes) -> None:
        self.headers, self.data, self.reply = headers, data, ""


async def test_chunk_headers_never_complete_or_break_a_transfer() -> None:
    from fedpod.transport.bus import H_INDEX, H_TRANSFER, Bus, _Transfer

    bus = Bus.__new__(Bus)  # the chunk path alone, without a connection
    Bus.__init__(bus, client=None)  # type: ignore[arg-type]
    chunk = b"c" * 4096
    count = Count()

    @FUZZ
    @given(st.dictionaries(st.sampled_from([H_TRANSFER, H_INDEX, "Fedpod-Begin", "Other"]),
                           st.one_of(st.sampled_from(["x", "0", "1", "-1", "99999999999999999999"]),
                                     st.text(max_size=12)), max_size=4),
           st.binary(max_size=8192))
    @count
    def absorbing(headers: dict[str, str], data: bytes) -> None:
        bus._transfers = {"x": _Transfer("sender", 2 * len(chunk), [bulk_digest(chunk)] * 2)}
        try:
            whole = bus._absorb(FakeMsg(headers, data))  # type: ignore[arg-type]
        except TransportError:
            return
        if H_TRANSFER in headers:
            assert whole is None  # a forged chunk never completes a transfer
            assert bus._transfers.get("x", _Transfer("", 0, [])).received <= len(chunk)

    absorbing()
    assert count.runs >= INPUTS
    FUZZ_COUNTS["chunk headers"] = count.runs


def yaml_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                        st.sampled_from(["bitfount.SqlQuery", "FederatedAveraging", "ResultsOnly", "fedavg",
                                         "SELECT 1", "alice/t", "Modeller"]))
    keys = st.one_of(st.text(max_size=12), st.sampled_from(
        ["pods", "task", "identifiers", "tags", "protocol", "algorithm", "aggregator", "data_structure", "name",
         "arguments", "query", "model", "hyperparameters", "steps", "epochs", "save_location", "secure",
         "steps_between_parameter_updates", "epochs_between_parameter_updates", "assign", "target", "select"]))
    return st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                            st.dictionaries(keys, children, max_size=5)),
                        max_leaves=25)


def mutate_task(original: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """The example task file with one value (found by following `path` as far as it goes) replaced."""
    document: Any = yaml.safe_load(yaml.safe_dump(original))
    node = document
    for key in path[:-1]:
        if isinstance(node, dict) and isinstance(node.get(key), dict):
            node = node[key]
    if isinstance(node, dict) and path:
        node[path[-1]] = value
    return dict(document) if isinstance(document, dict) else {}


def test_task_files_are_refused_with_a_config_error_never_a_crash(tmp_path_factory: pytest.TempPathFactory) -> None:
    examples = [yaml.safe_load(f.read_text()) for f in sorted(EXAMPLES.glob("*.yaml"))]
    path = tmp_path_factory.mktemp("fuzz") / "task.yaml"
    count = Count()

    @FUZZ
    @given(st.one_of(
        yaml_values(),
        st.tuples(st.sampled_from(examples), st.lists(st.sampled_from(
            ["pods", "task", "protocol", "algorithm", "arguments", "aggregator", "data_structure", "name", "query",
             "identifiers", "hyperparameters", "model", "assign", "target"]), min_size=1, max_size=4),
            yaml_values()).map(lambda x: mutate_task(*x))))
    @count
    def parsing(document: Any) -> None:
        path.write_text(yaml.safe_dump(document))
        with contextlib.suppress(ConfigError):
            load_task(path)

    parsing()
    assert count.runs >= INPUTS
    FUZZ_COUNTS["task files"] = count.runs


SQL_WORDS = ["SELECT", "FROM", "WHERE", "GROUP BY", "ORDER BY", "LIMIT", "UNION", "JOIN", "t", "`t`", '"t"', "*",
             "COUNT(*)", "read_csv('/etc/passwd')", "(", ")", ",", ";", "DROP TABLE t", "COPY", "ATTACH 'x'",
             "a", "1", "'x'", "--", "/*", "*/", "WITH c AS (SELECT 1)", "c", "glob('*')", "main.t", "x.t", "PRAGMA",
             "SET", "=", "<", "AND", "OR", "NOT", "getenv('HOME')", "t.a", "AS", "DISTINCT", "INSTALL httpfs"]


def test_the_sql_guard_refuses_or_accepts_only_a_select_on_the_dataset() -> None:
    from sqlglot import exp

    from fedpod.algorithms.sql.guard import check_read_only

    count = Count()

    @FUZZ
    @given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(SQL_WORDS), max_size=16).map(" ".join)))
    @count
    def guarding(query: str) -> None:
        try:
            tree = check_read_only(query, {"t"})
        except SqlError:
            return
        tables = {table.name.lower() for table in tree.find_all(exp.Table)}
        ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
        assert tables <= {"t"} | ctes, query

    guarding()
    assert count.runs >= INPUTS
    FUZZ_COUNTS["SQL guard"] = count.runs


PLANNER_WORDS = [*SQL_WORDS, "MEDIAN(a)", "QUANTILE_CONT(a, 0.5)", "QUANTILE_DISC(a, 2)", "SUM(a)", "AVG(a)",
                 "MIN(a)", "PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY a)", "FILTER (WHERE a > 1)", "-1", "1e308",
                 "'nan'", "CAST(a AS DOUBLE)"]


def test_the_pods_own_sql_planners_refuse_or_plan_never_crash() -> None:
    """Quantile steps, noisy SQL and secure SQL sums plan from the modeller's query at the pod
    (issue 10): anything they cannot plan is an SqlError naming it, never another exception."""
    from fedpod.algorithms.sql.noisy import plan_noisy
    from fedpod.algorithms.sql.quantiles import check_thresholds, plan_quantiles
    from fedpod.algorithms.sql.secure import secure_partials
    from fedpod.errors import FedpodError

    count = Count()

    @FUZZ
    @given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(PLANNER_WORDS), max_size=16).map(" ".join)),
           st.lists(st.floats(), max_size=8))
    @count
    def planning(query: str, thresholds: list[float]) -> None:
        with contextlib.suppress(SqlError):
            plan = plan_quantiles(query)
            with contextlib.suppress(FedpodError):
                checked = check_thresholds(plan, [thresholds] * len(plan.arguments))
                assert all(values == sorted(values) for values in checked)
        with contextlib.suppress(SqlError):
            plan_noisy(query, {"a": (0.0, 1.0)})
        with contextlib.suppress(SqlError):
            secure_partials(query)

    planning()
    assert count.runs >= INPUTS
    FUZZ_COUNTS["the pod's quantile, noisy and secure SQL planners"] = count.runs


FUZZ_COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def report() -> Any:
    started = time.monotonic()
    yield
    if FUZZ_COUNTS:
        lines = [f"| {target} | {runs:,} |" for target, runs in FUZZ_COUNTS.items()]
        header = f"\nfuzz inputs ({time.monotonic() - started:.0f}s):\n| target | inputs |\n|---|---:|\n"
        print(header + "\n".join(lines))
