"""Options shared by every command that talks to a broker or uses an identity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedpod.transport.bus import BrokerOptions

ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="pod config YAML")]
BrokerUrl = Annotated[str, typer.Option("--broker", envvar="FEDPOD_BROKER", help="NATS URL (nats:// or tls://)")]
TlsCa = Annotated[Path | None, typer.Option("--tls-ca", help="CA bundle to verify the broker's TLS certificate")]
TlsCert = Annotated[Path | None, typer.Option("--tls-cert", help="client certificate for mutual TLS")]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help="client key for mutual TLS")]
Creds = Annotated[Path | None, typer.Option(
    "--creds", envvar="FEDPOD_CREDS",
    help="NATS credentials file (JWT + nkey), or a user JWT issued for this identity's key")]
Keystore = Annotated[Path | None, typer.Option("--keystore", envvar="FEDPOD_KEYSTORE",
                                               help="folder of identities (default $FEDPOD_HOME/keys)")]
IdentityName = Annotated[str, typer.Option("--identity", envvar="FEDPOD_IDENTITY", help="modeller identity name")]
Timeout = Annotated[float, typer.Option("--timeout", help="seconds to wait for each pod")]
MinDatasets = Annotated[int | None, typer.Option(
    "--min-datasets", min=1, help="go on if at least N datasets answer; the others are listed as missing")]
RequirePinned = Annotated[bool, typer.Option("--require-pinned", envvar="FEDPOD_REQUIRE_PINNED",
                                             help="use only pods pinned with `fedpod known-pods add`")]


def broker_options(url: str, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
                   creds: Path | None) -> BrokerOptions:
    return BrokerOptions(url, tls_ca, tls_cert, tls_key, creds)
