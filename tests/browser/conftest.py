"""Fixtures for the dashboard's browser tests: a real gateway, Debian's Chromium, Playwright.

Chromium is required, not optional: CI installs it and a missing browser must
fail these tests rather than skip them (issue 6). Playwright never downloads
a browser here; it drives the system's Chromium by path.

The sync Playwright API runs its own event loop, so these tests are plain
sync functions and the gateway runs in a child process. Playwright and the
browser live for this directory's module only, so nothing of theirs is left
around when the asyncio tests of other packages run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from tests.browser.support import OPERATOR, OUTPUT, TIMEOUT_MS, VIEWER, demo_gateway
from tests.support import chromium
from tests.support.gateway import GatewayProcess

EXPECTED_CONSOLE = re.compile(r"Failed to load resource|WebSocket connection to .* failed")

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    why = chromium.missing()
    if why is not None:
        pytest.fail(why)
    browser = chromium.launch(playwright)
    yield browser
    browser.close()


# The device listing's page size of ``small_pages_gateway``: a handful of devices fill pages.
SMALL_PAGE = 2


def _started(workdir: Path, gw: GatewayProcess | None = None) -> Iterator[GatewayProcess]:
    """A gateway (the demo's by default), started; at the end it must stop cleanly on SIGTERM."""
    gw = gw or demo_gateway(workdir)
    gw.start_sync()
    yield gw
    if gw.running:
        exit = gw.stop_sync()
        assert exit.code == 0, exit


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway with the demo's devices, shared by the tests that do not restart it."""
    yield from _started(tmp_path_factory.mktemp("gateway"))


@pytest.fixture
def own_gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A gateway this test alone may stop and restart."""
    yield from _started(tmp_path)


@pytest.fixture
def small_pages_gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A gateway with no devices of its own whose device listing comes ``SMALL_PAGE`` at a time."""
    config = {"dashboards": {"devices_page_size": SMALL_PAGE}}
    gw = GatewayProcess(tmp_path, config, token=OPERATOR, viewer_token=VIEWER)
    yield from _started(tmp_path, gw)


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (its own sessionStorage) at desktop size.

    Its screenshot is saved under test-output/browser/ when the test ends,
    passed or failed, and an uncaught script error fails the test.
    """
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    def console(message: ConsoleMessage) -> None:
        # Refused connections and 401s are what some tests provoke; anything else is a bug.
        if message.type == "error" and not EXPECTED_CONSOLE.search(message.text):
            errors.append(message.text)

    page.on("console", console)
    yield page
    OUTPUT.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    try:
        # From the top: a full-page shot of a scrolled page draws the sticky bar mid-page.
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)
    finally:
        context.close()
    assert not errors, f"errors in the page: {errors}"
