"""Failed TLS handshakes count as failed links (devices.max_failed_links, docs/devices.md):
past the limit an address is closed before its handshake, which costs no CPU."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from frames import Hello
from simulators.handshake import encode
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until
from tests.tls.support import Pki, failures, tls_device, tls_metrics


async def test_an_address_failing_handshakes_is_held_back_before_the_next(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki")
    config = {
        "tls": pki.tls_table(),
        "devices": {"max_failed_links": 3, "failed_links_window": 60.0},
    }
    gw = GatewayProcess(tmp_path / "gw", config, token="operator")
    gw.workdir.mkdir()
    await gw.start()
    try:
        host, port = gw.device_address
        for _ in range(3):  # a device that does not speak TLS, reconnecting
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(encode(Hello(0, "plain", "env-sensor", "")))
            async with asyncio.timeout(10):
                await reader.read()
            writer.close()
        await wait_until(
            lambda: failures(tls_metrics(gw, pki), "devices", "not_tls") == 3, "3 counted"
        )
        # From the same address, even a good certificate is closed before its handshake.
        outcome = await tls_device(gw.device_address, pki.client("good"), "tls-dev-1")
        assert not outcome.welcomed
        metrics = tls_metrics(gw, pki)
        assert metrics.value("iot_device_refused_total", limit="max_failed_links") >= 1
        assert sum(failures(metrics, "devices", r) for r in ("not_tls", "closed")) >= 3
        assert metrics.value("iot_tls_handshakes_total", port="devices") == 0
    finally:
        exit = await gw.stop()
    assert exit.code == 0, exit


async def test_connections_in_their_handshake_count_towards_max_connections(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki")
    config = {"tls": pki.tls_table(handshake_timeout=30.0), "devices": {"max_connections": 2}}
    gw = GatewayProcess(tmp_path / "gw", config, token="operator")
    gw.workdir.mkdir()
    await gw.start()
    stalled = [socket.create_connection(gw.device_address) for _ in range(2)]
    try:

        def both_handshaking() -> bool:
            metrics = tls_metrics(gw, pki)
            return metrics.value("iot_tls_handshakes_in_progress", port="devices") == 2

        await wait_until(both_handshaking, "two connections in their handshakes")
        outcome = await tls_device(gw.device_address, pki.client("good"), "tls-dev-1")
        assert not outcome.welcomed
        metrics = tls_metrics(gw, pki)
        assert metrics.value("iot_device_refused_total", limit="max_connections") == 1
        for s in stalled:
            s.close()
        # Room again once they are gone.
        await wait_until(
            lambda: (
                tls_metrics(gw, pki).value("iot_tls_handshakes_in_progress", port="devices") == 0
            ),
            "the stalled handshakes gone",
        )
        outcome = await tls_device(gw.device_address, pki.client("good"), "tls-dev-1")
        assert outcome.welcomed, outcome.error
        await outcome.close()
    finally:
        for s in stalled:
            s.close()
        exit = await gw.stop()
    assert exit.code == 0, exit
