"""SIGHUP reloads certificates and the deny-list: new connections get them, open ones stay.

docs/tls.md, "Rotating and revoking".
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devices.tls import fingerprint
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until
from tests.tls.support import Outcome, Pki, failures, https_get, send_data, tls_device, tls_metrics

TOKEN = "operator-token"


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _served(outcome: Outcome) -> bytes:
    assert outcome.writer is not None
    sslobj: ssl.SSLObject = outcome.writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True)
    assert der is not None
    return der


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (as a certificate tool should)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def gateway(tmp_path: Path, pki: Pki) -> Iterator[GatewayProcess]:
    pki.deny_file.write_text("# nothing revoked yet\n")
    config = {"tls": pki.tls_table(handshake_timeout=2.0)}
    gw = GatewayProcess(tmp_path / "gw", config, token=TOKEN)
    gw.workdir.mkdir()
    gw.start_sync()
    yield gw
    gone = gw.stop_sync()
    assert gone.code == 0, gone


async def test_sighup_gives_new_connections_the_new_certificate_and_keeps_open_ones(
    gateway: GatewayProcess, pki: Pki
) -> None:
    old = await tls_device(gateway.device_address, pki.client("good"), "tls-dev-1")
    assert old.welcomed, old.error
    first = pki.server.cert_chain_pems[0].bytes()
    assert _served(old) == _der(first)

    # Rotate: a new certificate and key from the same CA, and revoke tls-dev-2 by fingerprint.
    new = pki.server_ca.issue_cert("127.0.0.1", "localhost")
    _replace(pki.cert_file, b"".join(p.bytes() for p in new.cert_chain_pems))
    _replace(pki.key_file, new.private_key_pem.bytes())
    _replace(pki.deny_file, f"{fingerprint(pki.der('good2'))}\n".encode())
    os.kill(gateway.pid, signal.SIGHUP)
    await wait_until(lambda: "TLS certificates reloaded" in gateway.stderr(), "the reload")

    again = await tls_device(gateway.device_address, pki.client("good3"), "tls-dev-3")
    try:
        assert again.welcomed, again.error
        assert _served(again) == _der(new.cert_chain_pems[0].bytes())
    finally:
        await again.close()
    refused = await tls_device(gateway.device_address, pki.client("good2"), "tls-dev-2")
    assert not refused.welcomed
    assert failures(tls_metrics(gateway, pki), "devices", "revoked") == 1

    # The link opened before the reload is still there: its DATA is stored.
    await send_data(old, struct.pack(">hHB", 2137, 4550, 97))

    def stored() -> bool:
        status, body = https_get(gateway, pki, "/api/devices/tls-dev-1/telemetry")
        return status == 200 and '"telemetry":[{' in body.replace(" ", "")

    await wait_until(stored, "the old link's DATA stored")
    await old.close()


async def test_a_bad_file_at_sighup_keeps_the_certificates_in_use(
    gateway: GatewayProcess, pki: Pki
) -> None:
    _replace(pki.key_file, b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    os.kill(gateway.pid, signal.SIGHUP)
    await wait_until(lambda: "TLS reload failed" in gateway.stderr(), "the failed reload")
    assert gateway.alive()
    outcome = await tls_device(gateway.device_address, pki.client("good"), "tls-dev-1")
    assert outcome.welcomed, outcome.error
    assert _served(outcome) == _der(pki.server.cert_chain_pems[0].bytes())
    await outcome.close()


async def test_a_stop_does_not_wait_for_handshakes_in_progress(tmp_path: Path, pki: Pki) -> None:
    config = {"tls": pki.tls_table(handshake_timeout=60.0)}
    gw = GatewayProcess(tmp_path / "gw-stop", config, token=TOKEN)
    gw.workdir.mkdir()
    await gw.start()
    stalled = [
        socket.create_connection(gw.device_address),
        socket.create_connection(gw.http_address),
    ]
    try:

        def handshaking() -> bool:
            metrics = tls_metrics(gw, pki)
            return all(
                metrics.value("iot_tls_handshakes_in_progress", port=port) == 1
                for port in ("devices", "http")
            )

        await wait_until(handshaking, "both connections in their handshakes")
        exit = await gw.stop(timeout=30)
    finally:
        for s in stalled:
            s.close()
    assert exit.code == 0, exit
    assert exit.elapsed < 10, exit  # not the 60 s handshake timeout
