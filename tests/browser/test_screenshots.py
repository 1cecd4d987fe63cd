"""The pictures in docs/dashboard.md, made by the page itself (issue 13).

Desktop and phone sizes, light and dark, online and offline devices, and a
device page. With ``UPDATE_SCREENSHOTS=1`` the test writes them to ``docs/``;
otherwise it renders them to ``test-output/browser/`` only and checks they
are what docs/ needs (a PNG of the right size, small enough to commit).

    UPDATE_SCREENSHOTS=1 .venv/bin/pytest tests/browser/test_screenshots.py
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect

from tests.browser.conftest import _started
from tests.browser.support import (
    DEMO_DEVICES,
    OPERATOR,
    OUTPUT,
    ROOT,
    TIMEOUT_MS,
    VIEWER,
    hello_device,
    listed_devices,
    page_url,
    send_data,
)
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until_sync

pytestmark = pytest.mark.browser

UPDATE = os.environ.get("UPDATE_SCREENSHOTS") == "1"
DOCS = ROOT / "docs"
MAX_BYTES = 250_000  # per picture: the docs should stay light to clone
DESKTOP: ViewportSize = {"width": 1200, "height": 980}
PHONE: ViewportSize = {"width": 375, "height": 667}
LABELS = {
    "demo-2": {
        "name": "Greenhouse",
        "location": "North bed",
        "channels": ["pump", "fan", "light", "valve"],
    },
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The demo, labels for one relay, and a sensor that reported and then went offline."""
    workdir = tmp_path_factory.mktemp("gateway")
    gw = GatewayProcess(
        workdir,
        {"labels": LABELS},
        token=OPERATOR,
        viewer_token=VIEWER,
        args=["--demo", str(DEMO_DEVICES)],
    )
    for started in _started(workdir, gw):
        add_offline_sensor(started)
        yield started


def add_offline_sensor(gateway: GatewayProcess) -> None:
    """A sensor that reported once (a low battery) and then went offline."""
    sensor = hello_device(gateway, "cellar-sensor")
    reading = {"temperature_c": 11.2, "humidity_pct": 81.5, "battery_pct": 14}
    send_data(sensor, "env-sensor", reading)
    wait_until_sync(
        lambda: (listed_devices(gateway).get("cellar-sensor") or {}).get("last") is not None,
        "the cellar sensor's reading stored",
        timeout=TIMEOUT_MS / 1000,
    )
    sensor.close()
    wait_until_sync(
        lambda: not listed_devices(gateway)["cellar-sensor"]["online"],
        "the cellar sensor offline",
        timeout=TIMEOUT_MS / 1000,
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def shoot(page: Page, name: str, size: ViewportSize) -> None:
    """The viewport as test-output/browser/NAME.png, and as docs/NAME.png when updating."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    out = OUTPUT / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(out), animations="disabled", caret="hide")
    assert png_size(out) == (size["width"], size["height"])
    assert out.stat().st_size < MAX_BYTES, f"{out}: {out.stat().st_size} bytes"
    if UPDATE:
        (DOCS / f"{name}.png").write_bytes(out.read_bytes())


def settle(page: Page, gateway: GatewayProcess) -> None:
    """Live, every device drawn, sparklines with some history."""
    page.goto(page_url(gateway, OPERATOR))
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    expect(page.get_by_test_id("device-card")).to_have_count(DEMO_DEVICES + 1)
    # The pictures in docs/ show a trend (15 readings, ~15 s a page load); a
    # check run needs only a line to draw, and keeps make test short.
    points = 15 if UPDATE else 3
    page.wait_for_function(
        """(n) => [...document.querySelectorAll('[data-device="demo-1"] [data-testid="sparkline"]')]
            .every((s) => Number(s.dataset.points) >= n)""",
        arg=points,
        timeout=60_000,
    )
    expect(page.get_by_test_id("serial-ports")).to_be_visible()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_desktop_and_phone(
    browser: Browser, gateway: GatewayProcess, scheme: Literal["light", "dark"]
) -> None:
    for form, size in (("desktop", DESKTOP), ("phone", PHONE)):
        context = browser.new_context(viewport=size, color_scheme=scheme, is_mobile=form == "phone")
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            settle(page, gateway)
            offline = page.locator('[data-device="cellar-sensor"]')
            expect(offline).to_have_attribute("data-online", "false")
            if form == "phone":
                # The phone shows the first cards; the offline one is lower down.
                expect(page.locator(".topbar")).to_be_visible()
            shoot(page, f"dashboard-{form}-{scheme}", size)
            if form == "desktop" and scheme == "light":
                # The relays, with the channel labels and display name from the config.
                page.get_by_label("Protocol").select_option("relay-4")
                expect(page.get_by_test_id("device-card")).to_have_count(2)
                named = page.locator('[data-device="demo-2"]').get_by_test_id("device-name")
                expect(named).to_have_text("Greenhouse")
                shoot(page, "dashboard-relays-light", size)
        finally:
            context.close()


def test_device_page(browser: Browser, gateway: GatewayProcess) -> None:
    context = browser.new_context(viewport=DESKTOP, color_scheme="light")
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        settle(page, gateway)
        page.locator('[data-device="demo-1"]').get_by_test_id("device-link").click()
        dp = page.get_by_test_id("device-page")
        expect(dp.get_by_test_id("range-state")).to_have_attribute("data-state", "loaded")
        expect(dp.get_by_test_id("range-chart")).to_have_count(3)
        # The demo has run for a minute or two: zoom in on the end of the hour to show it.
        for _ in range(5):
            dp.get_by_test_id("zoom-in").click()
            expect(dp.get_by_test_id("range-state")).to_have_attribute("data-state", "loaded")
        expect(dp).to_have_attribute("data-zoomed", "true")
        shoot(page, "dashboard-device-page", DESKTOP)
    finally:
        context.close()
