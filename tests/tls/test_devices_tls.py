"""The device port over TLS, with client certificates (docs/tls.md, docs/protocol.md §9).

One gateway for the module: TLS on both ports, a device CA, a CRL and a
deny-list, a device token every device without a certificate would need, and
a handshake timeout turned down to 1 s; on uvloop and on asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections.abc import Iterator

import pytest

from frames import Hello
from simulators.handshake import encode
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until
from tests.tls.support import Pki, failures, https_json, send_data, tls_device, tls_metrics

TOKEN = "operator-token"
HANDSHAKE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[GatewayProcess]:
    """The gateway on each event loop: their TLS layers differ (devices/tls.py)."""
    config = {
        "tls": pki.tls_table(handshake_timeout=HANDSHAKE_TIMEOUT),
        # A token every device would need: a certificate replaces it.
        "devices": {"token": "device-secret"},
    }
    gw = GatewayProcess(
        tmp_path_factory.mktemp("gw"),
        config,
        token=TOKEN,
        env={"IOT_GATEWAY_LOOP": request.param},
    )
    gw.start_sync()
    yield gw
    gone = gw.stop_sync()
    assert gone.code == 0, gone


def failed(gw: GatewayProcess, pki: Pki, reason: str) -> float:
    return failures(tls_metrics(gw, pki), "devices", reason)


async def test_a_good_certificate_is_welcomed_without_a_token(
    gateway: GatewayProcess, pki: Pki
) -> None:
    outcome = await tls_device(gateway.device_address, pki.client("good"), "tls-dev-1")
    try:
        assert outcome.welcomed, outcome.error
        await send_data(outcome, struct.pack(">hHB", 2137, 4550, 97))

        async def stored() -> bool:
            body = await asyncio.to_thread(https_json, gateway, pki, "/api/devices")
            online = {d["device"]: d for d in body["devices"]}
            return "tls-dev-1" in online and online["tls-dev-1"]["online"]

        await wait_until(stored, "tls-dev-1 listed online over HTTPS")
    finally:
        await outcome.close()
    metrics = tls_metrics(gateway, pki)
    assert metrics.value("iot_tls_handshakes_total", port="devices") >= 1


async def test_a_hello_with_another_client_id_gets_auth_failed(
    gateway: GatewayProcess, pki: Pki
) -> None:
    before = tls_metrics(gateway, pki).value("iot_device_auth_failed_total")
    outcome = await tls_device(
        gateway.device_address, pki.client("good"), "someone-else", token="device-secret"
    )
    assert not outcome.welcomed
    assert outcome.error == "AUTH_FAILED"
    after = tls_metrics(gateway, pki).value("iot_device_auth_failed_total")
    assert after == before + 1


@pytest.mark.parametrize(
    ("device", "client_id", "reason"),
    [
        (None, "tls-anon", "no_certificate"),
        ("other", "tls-other", "unknown_ca"),
        ("expired", "tls-old", "expired"),
        ("crl", "tls-crl", "revoked"),
        ("deny", "tls-deny", "revoked"),
    ],
)
async def test_a_refused_certificate_is_counted_by_reason(
    gateway: GatewayProcess, pki: Pki, device: str | None, client_id: str, reason: str
) -> None:
    before = failed(gateway, pki, reason)
    outcome = await tls_device(
        gateway.device_address, pki.client(device), client_id, token="device-secret"
    )
    assert not outcome.welcomed
    assert outcome.error.startswith("closed"), outcome.error
    await wait_until(lambda: failed(gateway, pki, reason) == before + 1, f"{reason} counted once")
    devices = https_json(gateway, pki, "/api/devices")["devices"]
    assert client_id not in {d["device"] for d in devices}


async def test_plain_bytes_on_the_tls_port_are_counted_and_closed(
    gateway: GatewayProcess, pki: Pki
) -> None:
    before = failed(gateway, pki, "not_tls")
    host, port = gateway.device_address
    reader, writer = await asyncio.open_connection(host, port)
    # A device that does not speak TLS: its HELLO frame, in the clear.
    writer.write(encode(Hello(0, "tls-plain", "env-sensor", "device-secret")))
    await writer.drain()
    async with asyncio.timeout(10):
        rest = await reader.read()  # until the gateway closes it
    assert b"\xa5" not in rest[:1]  # no frame came back: at most a TLS alert
    writer.close()
    await wait_until(lambda: failed(gateway, pki, "not_tls") == before + 1, "not_tls counted")
    assert gateway.alive()
    outcome = await tls_device(gateway.device_address, pki.client("good2"), "tls-dev-2")
    assert outcome.welcomed, outcome.error
    await outcome.close()


async def test_a_stalled_handshake_is_closed_at_the_timeout_while_others_go_on(
    gateway: GatewayProcess, pki: Pki
) -> None:
    before = failed(gateway, pki, "timeout")
    host, port = gateway.device_address
    stalled = socket.create_connection((host, port))
    stalled.setblocking(False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        # Meanwhile another device handshakes and is welcomed at once.
        outcome = await tls_device(gateway.device_address, pki.client("good2"), "tls-dev-2")
        assert outcome.welcomed, outcome.error
        assert loop.time() - started < HANDSHAKE_TIMEOUT * 5
        async with asyncio.timeout(HANDSHAKE_TIMEOUT + 10):
            data = await loop.sock_recv(stalled, 4096)
        assert data == b""  # closed by the gateway, nothing sent
        assert loop.time() - started >= HANDSHAKE_TIMEOUT * 0.9
        await wait_until(lambda: failed(gateway, pki, "timeout") == before + 1, "timeout counted")
        # The welcomed device is still there.
        await send_data(outcome, struct.pack(">hHB", 2100, 4000, 90))
        await outcome.close()
    finally:
        stalled.close()


async def test_the_https_port_counts_plain_http(gateway: GatewayProcess, pki: Pki) -> None:
    before = failures(tls_metrics(gateway, pki), "http", "not_tls")
    reader, writer = await asyncio.open_connection(*gateway.http_address)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(10):
        rest = await reader.read()
    assert not rest.startswith(b"HTTP/")
    writer.close()

    def counted() -> bool:
        return failures(tls_metrics(gateway, pki), "http", "not_tls") == before + 1

    await wait_until(counted, "not_tls counted on the http port")
    assert https_json(gateway, pki, "/healthz")["status"] == "ok"


def test_the_ready_line_is_the_same_with_tls(gateway: GatewayProcess) -> None:
    assert re.fullmatch(
        r"ready http=127\.0\.0\.1:\d+ devices=127\.0\.0\.1:\d+\n", gateway.ready_line
    )
