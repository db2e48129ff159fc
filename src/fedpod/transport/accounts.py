"""NATS decentralised authentication, for clusters that fedpod does not run.

A NATS cluster run by someone else does not read fedpod's `authorization` block: it trusts an
operator, the operator signs accounts, and each account signs its users' JWTs (NATS's
"decentralised JWT authentication"). `AccountAuthority` holds an operator key and one account
key (nkeys, in files readable only by their owner; plus the system account nats-server needs
for its own traffic, JetStream's included) and issues:

- the server configuration that trusts them (`server_config`: the operator JWT and a memory
  resolver preloaded with the account JWT), for the cluster's operator to include;
- one user JWT per party (`user_jwt`) for the public NATS key of that party's identity, with
  exactly the least-privilege permissions of `broker.permissions`.

A user JWT holds no secret: the party logs in with it and signs the server's nonce with its own
identity key (`--creds FILE` accepts such a JWT as well as a full NATS credentials file made
with `nsc`). Tokens are written as NATS's own tooling writes them (header `ed25519-nkey`,
claims version 2, `jti` the SHA-512/256 of the claims) so `nsc` and `nats-server` read them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys

from fedpod.errors import ConfigError
from fedpod.transport.broker import Party, permissions

OPERATOR_SEED = "operator.nk"
ACCOUNT_SEED = "account.nk"
SYSTEM_SEED = "system.nk"
ACCOUNT_NAME = "fedpod"
NO_LIMIT = -1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(signer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any], *,
               expires_s: float | None = None) -> str:
    """A NATS JWT (v2) for `subject`, signed by `signer`."""
    claims: dict[str, Any] = {"jti": "", "iat": int(time.time()), "iss": signer.public_key.decode(), "name": name,
                              "sub": subject, "nats": {**nats, "version": 2}}
    if expires_s is not None:
        claims["exp"] = int(time.time() + expires_s)
    claims["jti"] = base64.b32encode(hashlib.new("sha512_256", json.dumps(claims).encode()).digest()) \
        .rstrip(b"=").decode()
    signed = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode()) + "." + _b64(json.dumps(claims).encode())
    return signed + "." + _b64(signer.sign(signed.encode()))


def user_permissions(party: Party) -> dict[str, Any]:
    """`broker.permissions` in a user JWT's terms."""
    granted = permissions(party)
    return {"pub": granted["publish"], "sub": granted["subscribe"], "resp": {"max": 1, "ttl": 0}}


class AccountAuthority:
    def __init__(self, folder: Path, operator: nkeys.KeyPair, account: nkeys.KeyPair, system: nkeys.KeyPair) -> None:
        self.folder = folder
        self.operator = operator
        self.account = account
        self.system = system

    @classmethod
    def create(cls, folder: Path) -> AccountAuthority:
        """Make fresh operator and account keys in `folder`; refuses to replace existing ones
        (every JWT they signed would stop working)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, prefix in ((OPERATOR_SEED, nkeys.PREFIX_BYTE_OPERATOR), (ACCOUNT_SEED, nkeys.PREFIX_BYTE_ACCOUNT),
                             (SYSTEM_SEED, nkeys.PREFIX_BYTE_ACCOUNT)):
            path = folder / name
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError as exc:
                raise ConfigError(f"{path} exists: this folder already holds an authority",
                                  hint="use it as it is, or choose another --folder") from exc
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(nkeys.encode_seed(os.urandom(32), prefix))
        return cls.load(folder)

    @classmethod
    def load(cls, folder: Path) -> AccountAuthority:
        try:
            operator, account, system = (nkeys.from_seed(bytearray((folder / name).read_bytes().strip()))
                                         for name in (OPERATOR_SEED, ACCOUNT_SEED, SYSTEM_SEED))
        except FileNotFoundError as exc:
            raise ConfigError(f"no account authority in {folder}",
                              hint="create one with `fedpod broker accounts init`") from exc
        except Exception as exc:  # nkeys raises its own error types for a damaged seed
            raise ConfigError(f"the account authority in {folder} is damaged: {exc}") from exc
        return cls(folder, operator, account, system)

    @property
    def account_public(self) -> str:
        return str(self.account.public_key.decode())

    def server_config(self) -> str:
        """What a nats-server configuration includes to trust this authority's users."""
        system = self.system.public_key.decode()
        operator = encode_jwt(self.operator, self.operator.public_key.decode(), ACCOUNT_NAME,
                              {"type": "operator", "system_account": system})
        limits = {"subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT, "imports": NO_LIMIT,
                  "exports": NO_LIMIT, "wildcards": True, "conn": NO_LIMIT, "leaf": NO_LIMIT}
        accounts = {self.account_public: encode_jwt(self.operator, self.account_public, ACCOUNT_NAME,
                                                    {"type": "account", "limits": limits}),
                    system: encode_jwt(self.operator, system, "SYS", {"type": "account", "limits": limits})}
        preload = "\n".join(f"  {key}: {json.dumps(token)}" for key, token in accounts.items())
        return (f"operator: {json.dumps(operator)}\nsystem_account: {system}\nresolver: MEMORY\n"
                f"resolver_preload: {{\n{preload}\n}}\n")

    def user_jwt(self, party: Party, *, expires_s: float | None = None) -> str:
        nats = {"type": "user", **user_permissions(party), "subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT}
        return encode_jwt(self.account, party.nats_user, party.name, nats, expires_s=expires_s)
