"""Dashboard v2 (issue 13) in a real browser against a real gateway.

Sparklines, offline cards dimmed with their reason, natural order, the state
filter and summary bar, serial ports from the start, the phone layout, the
signed-out state after a restart with another token, and codes in words.
Every wait is on a condition on the page or on the gateway's HTTP API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect

from frames import Ack, Command
from simulators.handshake import MessageReader, encode
from tests.browser.conftest import _started
from tests.browser.support import (
    OPERATOR,
    TIMEOUT_MS,
    VIEWER,
    demo_gateway,
    hello_device,
    listed_devices,
    page_url,
    send_data,
)
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until_sync

pytestmark = pytest.mark.browser

MISSING_PORT = "/dev/ttyIOT-NOT-THERE"
READING = {"temperature_c": 21.5, "humidity_pct": 40.0, "battery_pct": 80}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The demo's devices plus a configured serial port whose device node does not exist."""
    workdir = tmp_path_factory.mktemp("gateway")
    gw = demo_gateway(workdir)
    gw.args += ["--serial", f"{MISSING_PORT},client_id=boiler-1,protocol=env-sensor"]
    yield from _started(workdir, gw)


def card(page: Page, device: str) -> Locator:
    return page.locator(f'[data-testid="device-card"][data-device="{device}"]')


def open_live(page: Page, gateway: GatewayProcess, token: str = OPERATOR) -> None:
    page.goto(page_url(gateway, token))
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    expect(card(page, "demo-1")).to_be_visible()


def visible_ids(page: Page) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(
        '[data-testid="device-card"]', "cards => cards.map((c) => c.dataset.device)"
    )
    return ids


def test_cards_draw_live_sparklines(page: Page, gateway: GatewayProcess) -> None:
    open_live(page, gateway)
    sensor = card(page, "demo-1")
    spark = sensor.locator('[data-testid="sparkline"][data-label="temperature_c"]')
    expect(spark).to_have_count(1)
    page.wait_for_function(
        """() => {
            const s = document.querySelector(
                '[data-device="demo-1"] [data-testid="sparkline"][data-label="temperature_c"]');
            return s && Number(s.dataset.points) >= 3;
        }""",
        timeout=TIMEOUT_MS,
    )
    points = spark.locator("polyline").get_attribute("points") or ""
    assert len(points.split()) >= 3
    # One sparkline per numeric value, and a step line per relay channel.
    expect(sensor.get_by_test_id("sparkline")).to_have_count(3)
    relay = card(page, "demo-2")
    expect(relay.locator('[data-testid="relay-channel"] [data-testid="sparkline"]')).to_have_count(
        4
    )
    # A card's sparklines stay inside it: the card is no taller than its neighbour's row needs.
    box = sensor.bounding_box()
    assert box is not None
    assert box["height"] < 400


def test_opened_card_takes_the_whole_row(page: Page, gateway: GatewayProcess) -> None:
    open_live(page, gateway)
    sensor = card(page, "demo-1")
    other = card(page, "demo-3")
    before = other.bounding_box()
    sensor.get_by_test_id("toggle-details").click()
    expect(sensor.get_by_test_id("history-state")).to_have_attribute("data-state", "loaded")
    opened = sensor.bounding_box()
    after = other.bounding_box()
    assert before is not None
    assert opened is not None
    assert after is not None
    # The opened card spans the row; its neighbour is not stretched to its height.
    assert after["height"] == pytest.approx(before["height"], abs=40)
    assert opened["width"] > 1.5 * after["width"]


def test_offline_card_is_dimmed_with_reason_and_since(page: Page, gateway: GatewayProcess) -> None:
    sensor = hello_device(gateway, "gone-sensor")
    send_data(sensor, "env-sensor", READING)
    wait_until_sync(
        lambda: (listed_devices(gateway).get("gone-sensor") or {}).get("last") is not None,
        "gone-sensor's reading stored",
        timeout=TIMEOUT_MS / 1000,
    )
    relay = hello_device(gateway, "gone-relay", "relay-4")
    send_data(relay, "relay-4", {"channels": [True, False, True, False]})
    wait_until_sync(
        lambda: (listed_devices(gateway).get("gone-relay") or {}).get("last") is not None,
        "gone-relay's reading stored",
        timeout=TIMEOUT_MS / 1000,
    )
    open_live(page, gateway)
    online_value = card(page, "demo-1").get_by_test_id("value-temperature_c")
    expect(card(page, "gone-sensor")).to_have_attribute("data-online", "true")
    sensor.close()
    relay.close()

    gone = card(page, "gone-sensor")
    expect(gone).to_have_attribute("data-online", "false")
    expect(gone.get_by_test_id("device-online")).to_have_text("Offline")
    info = gone.get_by_test_id("offline-info")
    expect(info).to_be_visible()
    expect(info).to_contain_text("Offline since")
    expect(gone.get_by_test_id("offline-reason")).to_contain_text("closed")
    expect(gone.get_by_test_id("offline-since")).to_have_text(re.compile(r"\d\d:\d\d:\d\d"))
    # The values are kept but muted: not bold, not in the text colour of an online card.
    value = gone.get_by_test_id("value-temperature_c")
    expect(value).to_have_text("21.50 °C")
    style = "el => [getComputedStyle(el).fontWeight, getComputedStyle(el).color]"
    assert value.evaluate(style) != online_value.evaluate(style)
    assert value.evaluate("el => getComputedStyle(el).fontWeight") == "400"
    # The relay's switches show their last state but cannot be pressed.
    switches = card(page, "gone-relay").get_by_test_id("relay-channel")
    expect(switches).to_have_count(4)
    for i in range(4):
        expect(switches.nth(i)).to_be_disabled()
    expect(switches.nth(0)).to_contain_text("On")


def test_natural_order_filters_and_summary(page: Page, gateway: GatewayProcess) -> None:
    for name in ("sim-10", "sim-2", "sim-1"):
        hello_device(gateway, name).close()
    wait_until_sync(
        lambda: all(n in listed_devices(gateway) for n in ("sim-1", "sim-2", "sim-10")),
        "the three sims known",
        timeout=TIMEOUT_MS / 1000,
    )
    open_live(page, gateway)
    group = page.locator('[data-testid="group"][data-protocol="env-sensor"]')
    expect(group.locator('[data-device="sim-10"]')).to_be_visible()
    ids = [i for i in visible_ids(page) if i.startswith("sim-")]
    assert ids == ["sim-1", "sim-2", "sim-10"]

    listed = listed_devices(gateway)
    online = sum(1 for d in listed.values() if d["online"])
    summary = page.get_by_test_id("summary")
    expect(summary.get_by_test_id("summary-total")).to_have_attribute(
        "data-count", str(len(listed))
    )
    expect(summary.get_by_test_id("summary-online")).to_have_text(f"{online} online")
    offline = len(listed) - online
    expect(summary.get_by_test_id("summary-offline")).to_have_text(f"{offline} offline")

    # The state filter, from its select and from the summary bar.
    page.get_by_label("State").select_option("offline")
    expect(card(page, "demo-1")).to_have_count(0)
    expect(card(page, "sim-2")).to_be_visible()
    assert all(
        c.get_attribute("data-online") == "false" for c in page.get_by_test_id("device-card").all()
    )
    page.get_by_label("State").select_option("")
    summary.get_by_test_id("summary-online").click()
    expect(summary.get_by_test_id("summary-online")).to_have_attribute("aria-pressed", "true")
    expect(card(page, "sim-2")).to_have_count(0)
    expect(page.get_by_test_id("device-card")).to_have_count(online)
    summary.get_by_test_id("summary-online").click()
    expect(card(page, "sim-2")).to_be_visible()

    # The search matches part of an id (names and locations: test_device_page.py).
    page.get_by_test_id("search").fill("sim-1")
    expect(page.get_by_test_id("device-card")).to_have_count(2)  # sim-1, sim-10
    assert visible_ids(page) == ["sim-1", "sim-10"]


def test_serial_ports_listed_with_their_state(page: Page, gateway: GatewayProcess) -> None:
    """A configured port that never opened is on the page, though no device ever spoke on it."""
    open_live(page, gateway, VIEWER)
    panel = page.get_by_test_id("serial-ports")
    expect(panel).to_be_visible()
    missing = panel.locator(f'[data-testid="serial-port"][data-url="{MISSING_PORT}"]')
    expect(missing).to_have_attribute("data-state", "missing")
    expect(missing).to_contain_text("Missing")
    expect(missing).to_contain_text("boiler-1")
    expect(missing.get_by_test_id("serial-error")).to_contain_text("No such file")
    ports = gateway.get_json_sync("/api/serial")["ports"]
    expect(panel.get_by_test_id("serial-port")).to_have_count(len(ports))


def test_phone_header_stays_on_one_line_in_light_and_dark(
    browser: Browser, gateway: GatewayProcess
) -> None:
    for scheme in ("light", "dark"):
        context = browser.new_context(
            viewport={"width": 375, "height": 667}, color_scheme=scheme, is_mobile=True
        )
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            open_live(page, gateway)
            bar = page.locator(".topbar")
            box = bar.bounding_box()
            heading = page.locator(".topbar h1").bounding_box()
            assert box is not None
            assert heading is not None
            # One line: the bar is as tall as one row of its controls, and nothing scrolls sideways.
            assert box["height"] < 60, box
            for name in ("connection-state", "role", "change-token"):
                item = page.get_by_test_id(name).bounding_box()
                assert item is not None
                assert item["y"] >= box["y"]
                assert item["y"] + item["height"] <= box["y"] + box["height"]
                assert item["x"] + item["width"] <= 375
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            dark = scheme == "dark"
            # rgb(14, 19, 24) in the dark scheme, rgb(243, 245, 248) in the light one.
            channel = int(re.findall(r"\d+", background)[0])
            assert (channel < 60) is dark, background
        finally:
            context.close()


def test_nack_in_words(page: Page, gateway: GatewayProcess) -> None:
    """A raw command the relay does not know is refused, and the page says what that means."""
    open_live(page, gateway)
    relay = card(page, "demo-2")
    relay.get_by_text("Commands", exact=True).click()
    hex_input = relay.get_by_test_id("hex-input")
    hex_input.fill("7f")
    hex_input.press("Enter")
    status = relay.locator('[data-testid="command-status"][data-origin="hex"]')
    expect(status).to_have_attribute("data-status", "nacked")
    expect(status).to_have_text("Raw 7f: nacked: unknown command")
    expect(page.get_by_test_id("event-log")).to_contain_text("nacked: unknown command")

    # set_interval takes 1..65535 seconds, as docs/protocols.md says the gateway does.
    sensor = card(page, "demo-1")
    sensor.get_by_text("Commands", exact=True).click()
    interval = sensor.get_by_test_id("interval-input")
    expect(interval).to_have_attribute("min", "1")
    expect(interval).to_have_attribute("max", "65535")


def test_restart_with_another_token_signs_the_page_out(page: Page, tmp_path: Path) -> None:
    gateway = demo_gateway(tmp_path)
    for _ in _started(tmp_path, gateway):
        open_live(page, gateway)
        expect(page.get_by_test_id("role")).to_have_text("Operator")
        value = card(page, "demo-1").get_by_test_id("value-temperature_c")
        expect(value).to_have_text(re.compile("°C"))

        stopped = gateway.stop_sync()
        assert stopped.code == 0, stopped
        gateway.token_flag = gateway.token = "a-new-token-after-restart"
        gateway.start_sync()

        state = page.get_by_test_id("connection-state")
        expect(state).to_have_attribute("data-state", "unauthorized")
        # No role any more: the Operator badge is gone, and so are the controls.
        expect(page.get_by_test_id("role")).to_have_text("Signed out")
        expect(page.get_by_role("switch")).to_have_count(0)
        expect(page.get_by_test_id("command-panel")).to_have_count(0)
        expect(page.get_by_test_id("auth-message")).to_contain_text("new link")
        # The old values stay on screen, marked out of date.
        stale = page.get_by_test_id("stale-note")
        expect(stale).to_be_visible()
        expect(stale).to_contain_text("out of date")
        expect(stale).to_contain_text("Signed out")
        expect(value).to_be_visible()


def test_a_command_cut_off_by_a_restart_gets_its_result(page: Page, tmp_path: Path) -> None:
    """A queued command's result reaches the page after a reconnect (GET /api/commands/{id})."""
    gateway = demo_gateway(tmp_path)
    for _ in _started(tmp_path, gateway):
        hello_device(gateway, "late-sensor").close()
        wait_until_sync(
            lambda: (
                (listed_devices(gateway).get("late-sensor") or {"online": True})["online"] is False
            ),
            "late-sensor known and offline",
            timeout=TIMEOUT_MS / 1000,
        )
        open_live(page, gateway)
        late = card(page, "late-sensor")
        late.get_by_text("Commands", exact=True).click()
        hex_input = late.get_by_test_id("hex-input")
        hex_input.fill("02")
        hex_input.press("Enter")
        status = late.locator('[data-testid="command-status"][data-origin="hex"]')
        expect(status).to_have_attribute("data-status", "queued")

        # The gateway restarts: the page's socket goes, and with it the command's statuses.
        stopped = gateway.stop_sync()
        assert stopped.code == 0, stopped
        expect(status).to_have_attribute("data-status", "error")
        expect(status).to_contain_text("asking the gateway how it ended")
        gateway.start_sync()

        # The device comes back, gets its queued command and ACKs it; nobody is told.
        device = hello_device(gateway, "late-sensor")
        try:
            reader = MessageReader(strict=True)
            command = None
            while command is None:
                data = device.recv(4096)
                assert data, "the gateway closed late-sensor's link"
                command = next((m for m in reader.feed(data) if isinstance(m, Command)), None)
            device.sendall(encode(Ack(command.seq, 0)))
            # The page asks after its reconnect and shows how the command ended.
            expect(page.get_by_test_id("connection-state")).to_have_attribute(
                "data-state", "connected"
            )
            expect(status).to_have_attribute("data-status", "acked", timeout=3 * TIMEOUT_MS)
            expect(status).to_have_text("Raw 02: acked")
            expect(page.get_by_test_id("event-log")).to_contain_text(
                "late-sensor Raw 02: acked (asked after a reconnect)"
            )
        finally:
            device.close()


def test_page_helpers_in_the_browser(page: Page, gateway: GatewayProcess) -> None:
    """The page's own modules: natural order, codes in words, CSV pages joined under one header."""
    pages = {
        None: ("offset,ts,seq,a,out_of_range\r\n1,10,0,1.5,\r\n2,20,1,2.5,a\r\n", "2"),
        "2": ('offset,ts,seq,a,b,out_of_range\r\n3,30,2,3.5,"x,y",\r\n', ""),
    }

    def telemetry(route: Route) -> None:
        since = parse_qs(urlsplit(route.request.url).query).get("since", [None])[0]
        body, following = pages[since]
        route.fulfill(status=200, content_type="text/csv", body=body, headers={"X-Next": following})

    page.route("**/api/devices/csv-dev/telemetry*", telemetry)
    open_live(page, gateway, VIEWER)
    result = page.evaluate(
        """async () => {
            const { naturalCompare } = await import('./static/store.js');
            const { nackWords, offlineReason, errorCode } = await import('./static/words.js');
            const { loadCsv, csvCells } = await import('./static/api.js');
            const ids = ['sim-10', 'sim-2', 'Sim-1', 'sim-1b', 'a-100', 'a-20'];
            return {
                sorted: [...ids].sort(naturalCompare),
                nackMessage: nackWords({ code: 2, message: 'valve stuck' }, 'env-sensor'),
                nackKnown: nackWords({ code: 2 }, 'relay-4'),
                nackUnknown: nackWords({ code: 9 }, 'boiler'),
                reasonKnown: offlineReason('lost'),
                reasonUnknown: offlineReason('cosmic-ray'),
                reasonNone: offlineReason(null),
                code: errorCode('rate_limited'),
                cells: csvCells('1,"a ""b"", c",'),
                csv: await loadCsv('csv-dev', 't', { from: 0, to: 100 }),
            };
        }"""
    )
    assert result["sorted"] == ["a-20", "a-100", "Sim-1", "sim-1b", "sim-2", "sim-10"]
    assert result["nackMessage"] == "valve stuck"  # the gateway's words come first
    assert result["nackKnown"] == "bad argument"
    assert result["nackUnknown"] == "device error code 9"
    assert result["reasonKnown"] == "the link failed (lost)"
    assert result["reasonUnknown"] == "cosmic-ray"
    assert result["reasonNone"] == "reason unknown"
    assert result["code"] == "too many commands at once, try again shortly (rate_limited)"
    assert result["cells"] == ["1", 'a "b", c', ""]
    # Two pages (X-Next), the second with a new column: one header, every row in its place.
    assert result["csv"].split("\r\n") == [
        "offset,ts,seq,a,out_of_range,b",
        "1,10,0,1.5,,",
        "2,20,1,2.5,a,",
        '3,30,2,3.5,,"x,y"',
        "",
    ]


def test_a_401_from_the_http_api_signs_the_page_out(page: Page, gateway: GatewayProcess) -> None:
    """The socket may still be open when an HTTP call learns the token is refused."""
    refused = json.dumps({"code": "unauthorized", "message": "missing or invalid token"})
    token_refused = False

    def serial(route: Route) -> None:
        if token_refused:
            route.fulfill(status=401, content_type="application/json", body=refused)
        else:
            route.continue_()

    page.route("**/api/serial", serial)
    open_live(page, gateway)
    expect(page.get_by_test_id("role")).to_have_text("Operator")
    # From now on the gateway refuses the token; the page's next serial port refresh learns it.
    token_refused = True
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "unauthorized")
    expect(page.get_by_test_id("role")).to_have_text("Signed out")
    expect(page.get_by_test_id("stale-note")).to_contain_text("out of date")
    expect(page.get_by_role("switch")).to_have_count(0)
