"""Certificates made by trustme, and TLS devices and HTTPS requests for the TLS tests.

A ``Pki`` writes to a directory: a server CA and the gateway's certificate
(for 127.0.0.1 and localhost), a device CA, device certificates (good,
expired, revoked by the CRL, revoked by the deny-list), one from another
CA, the CRL and the deny-list (docs/tls.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from devices.tls import fingerprint
from frames import Data
from simulators.handshake import DeviceHandshake, MessageReader, encode, error_name
from tests.support.gateway import GatewayProcess
from tests.support.metrics import Metrics, parse_metrics

UTC = datetime.UTC


def _device_cert(ca: trustme.CA, cn: str, **kwargs: Any) -> trustme.LeafCert:
    # A name that is no host: the identity is the CN alone (docs/protocol.md §9 is the
    # contract; a SAN is ignored for it).
    return ca.issue_cert(f"{cn}.devices.invalid", common_name=cn, **kwargs)


@dataclass
class Pki:
    """Every file the TLS tests use, under ``root``."""

    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.server_ca = trustme.CA()
        self.device_ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.server_ca_file = self.write("server-ca.pem", self.server_ca.cert_pem.bytes())
        self.device_ca_file = self.write("device-ca.pem", self.device_ca.cert_pem.bytes())
        self.server = self.server_ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file = self.write(
            "server.pem", b"".join(p.bytes() for p in self.server.cert_chain_pems)
        )
        self.key_file = self.write("server.key", self.server.private_key_pem.bytes())
        past = datetime.datetime.now(UTC) - datetime.timedelta(days=30)
        self.leaves = {
            "good": _device_cert(self.device_ca, "tls-dev-1"),
            "good2": _device_cert(self.device_ca, "tls-dev-2"),
            "good3": _device_cert(self.device_ca, "tls-dev-3"),
            "expired": _device_cert(
                self.device_ca,
                "tls-old",
                not_before=past - datetime.timedelta(days=30),
                not_after=past,
            ),
            "crl": _device_cert(self.device_ca, "tls-crl"),
            "deny": _device_cert(self.device_ca, "tls-deny"),
            "other": _device_cert(self.other_ca, "tls-other"),
        }
        self.devices = {
            name: self.write(f"device-{name}.pem", leaf.private_key_and_cert_chain_pem.bytes())
            for name, leaf in self.leaves.items()
        }
        self.crl_file = self.write("devices.crl", self.crl([self.leaves["crl"]]))
        deny = fingerprint(self.der("deny"))
        # As ``openssl x509 -fingerprint -sha256`` prints it: colons and a prefix.
        pretty = ":".join(deny[i : i + 2] for i in range(0, 64, 2)).upper()
        self.deny_file = self.write(
            "deny-list.txt", f"# revoked devices\nsha256 Fingerprint={pretty}\n".encode()
        )

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def der(self, name: str) -> bytes:
        pem = self.leaves[name].cert_chain_pems[0].bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)

    def crl(self, revoked: list[trustme.LeafCert]) -> bytes:
        """A PEM CRL of the device CA listing ``revoked``."""
        ca_cert = x509.load_pem_x509_certificate(self.device_ca.cert_pem.bytes())
        key = serialization.load_pem_private_key(self.device_ca.private_key_pem.bytes(), None)
        now = datetime.datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=1))
        )
        for leaf in revoked:
            cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=1))
                .build()
            )
        crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
        return crl.public_bytes(serialization.Encoding.PEM)

    def client(self, device: str | None = None) -> ssl.SSLContext:
        """A client context trusting the server CA, with ``device``'s certificate if given."""
        ctx = ssl.create_default_context(cafile=str(self.server_ca_file))
        if device is not None:
            ctx.load_cert_chain(str(self.devices[device]))
        return ctx

    def tls_table(self, **extra: Any) -> dict[str, Any]:
        """A ``[tls]`` table with everything, and ``extra`` keys over it."""
        return {
            "cert": str(self.cert_file),
            "key": str(self.key_file),
            "device_ca": str(self.device_ca_file),
            "crl": str(self.crl_file),
            "deny_list": str(self.deny_file),
            **extra,
        }


@dataclass
class Outcome:
    """How a device's attempt ended: WELCOME, an ERROR, or the link closed."""

    welcomed: bool
    error: str = ""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


async def tls_device(
    address: tuple[str, int],
    ctx: ssl.SSLContext | None,
    client_id: str,
    *,
    token: str = "",
    timeout: float = 10.0,
) -> Outcome:
    """Connect (TLS with ``ctx``), say HELLO as ``client_id``; WELCOME, ERROR or closed.

    A refused client certificate may fail the connection itself (TLS 1.2) or
    only the first read (TLS 1.3 checks it after the client's side is done):
    both are "closed".
    """
    host, port = address
    handshake = DeviceHandshake(client_id, "env-sensor", token=token)
    messages = MessageReader(strict=True)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
            writer.write(encode(handshake.hello()))
            while True:
                data = await reader.read(4096)
                if not data:
                    writer.close()
                    return Outcome(False, "closed")
                for message in messages.feed(data):
                    handshake.receive(message)
                    if handshake.refused:
                        writer.close()
                        error = handshake.error
                        return Outcome(False, error_name(error.code) if error else "refused")
                if handshake.welcomed:
                    return Outcome(True, "", reader, writer)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return Outcome(False, f"closed: {e}")


async def send_data(outcome: Outcome, body: bytes) -> None:
    """One DATA on a welcomed link."""
    assert outcome.writer is not None
    outcome.writer.write(encode(Data(1, body)))
    await outcome.writer.drain()


def https_get(gw: GatewayProcess, pki: Pki, path: str, token: str | None = None) -> tuple[int, str]:
    """``GET https://...path`` trusting the test CA: the status and the body."""
    headers = {"Authorization": f"Bearer {token or gw.token}"}
    request = urllib.request.Request(f"https://{gw.http_host}:{gw.http_port}{path}", None, headers)
    with urllib.request.urlopen(request, timeout=10, context=pki.client()) as response:
        return int(response.status), response.read().decode()


def https_json(gw: GatewayProcess, pki: Pki, path: str) -> Any:
    status, body = https_get(gw, pki, path)
    assert status == 200, (status, body)
    return json.loads(body)


def tls_metrics(gw: GatewayProcess, pki: Pki) -> Metrics:
    """``GET /metrics`` over HTTPS, parsed."""
    return parse_metrics(https_get(gw, pki, "/metrics")[1])


def failures(metrics: Metrics, port: str, reason: str) -> float:
    """``iot_tls_handshake_failures_total{port, reason}``."""
    return metrics.value("iot_tls_handshake_failures_total", port=port, reason=reason)
