"""Finding 1 of the hardening issue, for a cluster fedpod does not run: NATS's decentralised JWT
authentication (operator -> account -> user JWTs) made with `fedpod broker accounts`, loaded by a
real nats-server. The same least privilege holds, and nobody without a JWT from the account gets in."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from fedpod.data.catalog import inspect
from fedpod.errors import BrokerUnavailable
from fedpod.modeller.client import Modeller
from fedpod.pod.config import PodConfig
from fedpod.pod.local import write_pod
from fedpod.security.identity import Identity
from fedpod.transport import subjects
from fedpod.transport.accounts import AccountAuthority
from fedpod.transport.broker import EmbeddedBroker, Party
from fedpod.transport.bus import BrokerOptions
from tests.conftest import start_pod_process, three_rows

pytestmark = pytest.mark.integration


def fedpod(*args: str | Path) -> str:
    done = subprocess.run([sys.executable, "-m", "fedpod.cli", *map(str, args)], capture_output=True, text=True,
                          check=True)
    return done.stdout


@pytest.fixture
def accounts(tmp_path: Path) -> Path:
    folder = tmp_path / "authority"
    fedpod("broker", "accounts", "init", "--folder", folder)
    assert oct((folder / "account.nk").stat().st_mode)[-3:] == "600"
    return folder


@pytest.fixture
def cluster(accounts: Path) -> Iterator[EmbeddedBroker]:
    """A nats-server configured as a cluster's operator would: it includes the accounts.conf written above."""
    with EmbeddedBroker(accounts=(accounts / "accounts.conf").read_text()) as server:
        yield server


def issue(accounts: Path, identity: Identity, role: str, keystore: Path) -> Path:
    out = keystore / f"{identity.name}.jwt"
    fedpod("broker", "accounts", "issue", keystore / f"{identity.name}.pub", "--role", role, "--folder", accounts,
           "--out", out)
    return out


def test_parties_with_user_jwts_work_and_no_one_else_gets_in(cluster: EmbeddedBroker, accounts: Path,
                                                             tmp_path: Path) -> None:
    keystore = tmp_path / "keys"
    modeller = Identity.generate("modeller")
    modeller.save(keystore)
    folder = tmp_path / "alice"
    spec = inspect(three_rows(tmp_path), folder)
    config_path = write_pod(folder, "alice", cluster.url, [spec], [modeller])
    alice = Identity.load("alice", folder / "keys")
    token = issue(accounts, alice, "pod", folder / "keys")
    config = PodConfig.load(config_path)
    config.broker.creds = str(token)
    config.save(config_path)
    process, _ = start_pod_process(config_path)
    try:
        # The pod logs in with a bare JWT and its own key; the modeller with a full NATS credentials
        # file (JWT and seed, as `nsc generate creds` writes it).
        creds = keystore / "modeller.creds"
        creds.write_text(f"-----BEGIN NATS USER JWT-----\n{issue(accounts, modeller, 'modeller', keystore).read_text()}"
                         f"------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{modeller.nats_seed}\n"
                         "------END USER NKEY SEED------\n")
        options = BrokerOptions(cluster.url, creds=creds)
        with Modeller(modeller, broker=options, keystore=keystore, timeout_s=20) as client:
            result = client.sql("SELECT SUM(a) AS s FROM t", datasets=["alice/t"])
        assert isinstance(result, dict) and int(result["alice/t"]["s"][0]) == 6

        # A modeller whose JWT another account signed, one without a JWT, and one holding
        # alice's JWT but not her key: all refused by the server.
        rogue_authority = AccountAuthority.create(tmp_path / "rogue")
        stranger = Identity.generate("stranger")
        foreign = tmp_path / "stranger.jwt"
        foreign.write_text(rogue_authority.user_jwt(Party.of("modeller", stranger.public)))
        for who, creds in ((stranger, foreign), (stranger, None), (stranger, token)):
            with pytest.raises(BrokerUnavailable, match="Authorization Violation"), \
                    Modeller(who, broker=BrokerOptions(cluster.url, creds=creds), keystore=tmp_path / "s"):
                pass
    finally:
        process.terminate()
        process.wait(10)
    assert asyncio.run(what_alice_may_not_hear(cluster, accounts, alice, folder / "keys")) == []


async def what_alice_may_not_hear(cluster: EmbeddedBroker, accounts: Path, alice: Identity,
                                  keystore: Path) -> list[str]:
    """Alice's pod, logged in with its JWT, tries to listen on another pod's inbox and on
    everything; the server refuses each subscription. Returns what it overheard."""
    errors: list[Exception] = []
    overheard: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        overheard.append(msg.subject)

    credentials = issue(accounts, alice, "pod", keystore)
    spy = await nats.connect(cluster.url, nkeys_seed_str=alice.nats_seed, user_jwt_cb=lambda: credentials.read_bytes(),
                             error_cb=on_error, inbox_prefix=subjects.replies(alice.fingerprint))
    try:
        for subject in (subjects.inbox("BOBB-BOBB-BOBB-BOBB"), ">", subjects.HEARTBEATS):
            await spy.subscribe(subject, cb=on_message)
        await spy.flush()
        for _ in range(100):
            if len(errors) >= 3:
                break
            await asyncio.sleep(0.02)
        assert sum("permissions violation for subscription" in str(e) for e in errors) == 3, errors
    finally:
        await spy.close()
    return overheard
