"""The dashboard page over https and wss, in Debian's Chromium (docs/tls.md).

A gateway with TLS on both ports and ``--demo 3``: its TCP demo devices
connect with TLS too. The browser context ignores certificate errors (in
this test only): the test CA is not in Chromium's store. Chromium is launched
as tests/browser/conftest.py launches it, by path, never a downloaded one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, ConsoleMessage, expect, sync_playwright

from tests.browser.support import OPERATOR, TIMEOUT_MS, VIEWER
from tests.support import chromium
from tests.support.gateway import GatewayProcess
from tests.tls.support import Pki, failures, tls_metrics

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    why = chromium.missing()
    if why is not None:
        pytest.fail(why)
    with sync_playwright() as p:
        browser = chromium.launch(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    config = {"tls": {"cert": str(pki.cert_file), "key": str(pki.key_file)}}
    gw = GatewayProcess(
        tmp_path_factory.mktemp("gw"),
        config,
        token=OPERATOR,
        viewer_token=VIEWER,
        args=["--demo", "3"],
    )
    gw.pki = pki  # type: ignore[attr-defined]
    gw.start_sync()
    yield gw
    assert gw.stop_sync().code == 0


def test_the_page_works_over_https_and_wss(browser: Browser, gateway: GatewayProcess) -> None:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sockets: list[str] = []
    errors: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.on("pageerror", lambda error: errors.append(str(error)))

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", console)
    try:
        page.goto(f"https://{gateway.http_host}:{gateway.http_port}/#token={OPERATOR}")
        expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
        # Demo devices on TLS and on the pseudo-terminal, live through wss.
        expect(page.get_by_test_id("device-card")).to_have_count(3)
        sensor = page.locator('[data-testid="device-card"][data-device="demo-1"]')
        expect(sensor.get_by_test_id("device-online")).to_have_text("Online")
        offset = sensor.get_attribute("data-offset")
        assert offset
        expect(sensor).not_to_have_attribute("data-offset", offset)
    finally:
        context.close()
    # --demo prints the page's address (without the configured token): https now.
    assert f"dashboard: https://127.0.0.1:{gateway.http_port}/\n" in gateway.log()
    assert sockets, "the page opened no WebSocket"
    assert all(re.match(rf"wss://{re.escape(gateway.http_host)}:\d+/", url) for url in sockets)
    assert not errors, errors
    pki: Pki = gateway.pki  # type: ignore[attr-defined]
    metrics = tls_metrics(gateway, pki)
    assert metrics.value("iot_tls_handshakes_total", port="http") >= 1
    assert metrics.value("iot_tls_handshakes_total", port="devices") >= 2  # demo-1, demo-2
    assert failures(metrics, "devices", "not_tls") == 0
