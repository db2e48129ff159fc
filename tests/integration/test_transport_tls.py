"""The bus over a NATS server that requires TLS (a site's broker reached across networks):
the connection upgrades, and large transfers arrive intact through it."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedpod.channel import SecureChannel
from fedpod.errors import BrokerUnavailable
from fedpod.security.identity import Identity
from fedpod.transport.broker import nats_server_binary
from fedpod.transport.bus import BrokerOptions, Bus
from fedpod.wire.codec import unpack
from fedpod.wire.messages import TaskResult
from tests.conftest import wait_until
from tests.integration.test_transport import listening

pytestmark = pytest.mark.integration


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
                 issuer_key: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1)))
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        builder = builder.add_extension(x509.SubjectAlternativeName([loopback]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A nats-server on loopback that accepts TLS only, with the CA file that verifies it."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("fedpod test CA", ca_key)
    server = _certificate("127.0.0.1", server_key, ca.subject, ca_key)
    ca_file = _pem(tmp_path / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    cert_file = _pem(tmp_path / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    key_file = _pem(tmp_path / "server-key.pem", server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    config = tmp_path / "nats.conf"
    config.write_text(f'listen: "127.0.0.1:-1"\ntls {{\n  cert_file: "{cert_file}"\n  key_file: "{key_file}"\n}}\n')
    process = subprocess.Popen([str(nats_server_binary()), "-c", str(config), "--ports_file_dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ports = tmp_path / f"nats-server_{process.pid}.ports"
    try:
        wait_until(ports.exists, 10, "nats-server's ports file")
        wait_until(lambda: bool(ports.read_text().strip()), 10, "nats-server's ports")
        url = json.loads(ports.read_text())["nats"][0]
        yield url.replace("nats://", "tls://"), ca_file
    finally:
        process.terminate()
        process.wait(10)


async def test_large_transfers_arrive_intact_over_tls(tls_broker: tuple[str, Path]) -> None:
    url, ca_file = tls_broker
    sender = SecureChannel(await Bus.connect(BrokerOptions(url, tls_ca=ca_file)), Identity.generate("sender"))
    receiver, opened, _ = await listening(url, "receiver", tls_ca=ca_file)
    try:
        blob = os.urandom(5 * 1024 * 1024 + 3)
        await sender.send(receiver.identity.public, TaskResult(task_id="t", dataset="d", table=blob, seconds=0))
        message = await asyncio.wait_for(opened.get(), 30)
        assert hashlib.sha256(unpack(message.payload, TaskResult).table).digest() == hashlib.sha256(blob).digest()
    finally:
        await sender.bus.close()
        await receiver.bus.close()


async def test_a_client_without_the_ca_is_refused(tls_broker: tuple[str, Path]) -> None:
    url, _ = tls_broker
    with pytest.raises(BrokerUnavailable):
        await Bus.connect(BrokerOptions(url, connect_timeout_s=2))
