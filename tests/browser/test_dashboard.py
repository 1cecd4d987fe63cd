"""The live dashboard page in a real browser against a real gateway (issue 6).

Every wait is on a condition on the page (Playwright's ``expect`` and
``wait_for_function``) or on the gateway's HTTP API, never on a clock.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Locator, Page, Request, Route, expect

from tests.browser.conftest import SMALL_PAGE
from tests.browser.support import (
    OPERATOR,
    OUTPUT,
    TIMEOUT_MS,
    VIEWER,
    hello_device,
    listed_devices,
    page_url,
)
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until_sync

pytestmark = pytest.mark.browser


def card(page: Page, device: str) -> Locator:
    return page.locator(f'[data-testid="device-card"][data-device="{device}"]')


def open_dashboard(page: Page, gateway: GatewayProcess, token: str, *, query: bool = False) -> None:
    """Load the page with ``#token=`` (``?token=``) and wait until it is live with four devices."""
    page.goto(page_url(gateway, token, query=query))
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    expect(page.get_by_test_id("device-card")).to_have_count(4)


def snapshot(page: Page) -> dict[str, Any]:
    """The page's own account of what it received (``window.__dashboard``)."""
    state: dict[str, Any] = page.evaluate("window.__dashboard.snapshot()")
    return state


def test_devices_appear_and_values_update(page: Page, gateway: GatewayProcess) -> None:
    open_dashboard(page, gateway, OPERATOR)

    # The token left the address bar and lives in this tab's sessionStorage.
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('iot-gateway.token')") == OPERATOR

    # Grouped by protocol, with online state and transport.
    for protocol, devices in {
        "env-sensor": ["demo-1", "demo-3"],
        "relay-4": ["demo-2", "demo-serial-1"],
    }.items():
        group = page.locator(f'[data-testid="group"][data-protocol="{protocol}"]')
        expect(group.get_by_test_id("device-card")).to_have_count(len(devices))
        for device in devices:
            expect(group.locator(f'[data-device="{device}"]')).to_be_visible()
    expect(card(page, "demo-serial-1").get_by_test_id("device-transport")).to_have_text("serial")
    expect(card(page, "demo-1").get_by_test_id("device-transport")).to_have_text("tcp")
    for device in ("demo-1", "demo-2", "demo-3", "demo-serial-1"):
        expect(card(page, device).get_by_test_id("device-online")).to_have_text("Online")

    # Current values, and they move on.
    sensor = card(page, "demo-1")
    expect(sensor.get_by_test_id("value-temperature_c")).to_have_text(
        re.compile(r"^-?\d+\.\d\d °C$")
    )
    expect(sensor.get_by_test_id("value-humidity_pct")).to_have_text(re.compile(r"^\d+\.\d %$"))
    expect(sensor.get_by_test_id("value-battery_pct")).to_have_text(re.compile(r"^\d+ %"))
    offset = sensor.get_attribute("data-offset")
    assert offset
    expect(sensor).not_to_have_attribute("data-offset", offset)
    relay = card(page, "demo-2")
    expect(relay.get_by_test_id("relay-channel")).to_have_count(4)

    # Filter by protocol, then search by id; "/" jumps to the search box and Escape clears it.
    visible = page.locator('[data-testid="device-card"] >> visible=true')
    page.get_by_label("Protocol").select_option("relay-4")
    expect(visible).to_have_count(2)
    page.get_by_label("Protocol").select_option("")
    page.locator("body").click(position={"x": 5, "y": 200})
    page.keyboard.press("/")
    expect(page.get_by_test_id("search")).to_be_focused()
    page.keyboard.type("serial")
    expect(visible).to_have_count(1)
    expect(card(page, "demo-serial-1")).to_be_visible()
    page.keyboard.press("Escape")
    expect(visible).to_have_count(4)

    # 360 px wide: everything fits, nothing scrolls sideways.
    page.set_viewport_size({"width": 360, "height": 800})
    expect(card(page, "demo-1")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "dashboard-360px.png"), full_page=True)


def test_chart_is_seeded_from_history_and_gains_points(page: Page, gateway: GatewayProcess) -> None:
    # Some history before the page opens, so seeding has something to find.
    wait_until_sync(
        lambda: len(gateway.stored_offsets_sync("demo-1", -1, 2**62)) >= 3,
        "three stored readings of demo-1",
        timeout=TIMEOUT_MS / 1000,
    )
    open_dashboard(page, gateway, OPERATOR)
    sensor = card(page, "demo-1")
    first_received = min(snapshot(page)["devices"]["demo-1"]["offsets"])

    toggle = sensor.get_by_test_id("toggle-details")
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(sensor.get_by_test_id("history-state")).to_have_attribute("data-state", "loaded")
    chart = sensor.locator('[data-testid="chart"][data-field="temperature_c"]')
    expect(chart).to_be_visible()
    expect(sensor.get_by_test_id("chart")).to_have_count(3)  # temperature, humidity, battery

    # Seeded from the HTTP history: it starts before anything the socket brought.
    assert int(chart.get_attribute("data-first-offset") or "0") < first_received
    points = int(chart.get_attribute("data-points") or "0")
    assert points >= 3
    last = chart.get_attribute("data-last-offset")
    assert last

    # Live readings extend it.
    expect(chart).not_to_have_attribute("data-last-offset", last)
    assert int(chart.get_attribute("data-points") or "0") > points
    polyline = chart.locator("polyline")
    assert len((polyline.get_attribute("points") or "").split()) >= points


def test_relay_switch_shows_acked_and_new_state(page: Page, gateway: GatewayProcess) -> None:
    open_dashboard(page, gateway, OPERATOR)
    relay = card(page, "demo-2")
    switch = relay.locator('[data-testid="relay-channel"][data-channel="2"]')
    expect(switch).to_have_attribute("role", "switch")
    expect(switch).to_have_attribute("aria-checked", re.compile("^(true|false)$"))
    before = switch.get_attribute("aria-checked")
    after = "false" if before == "true" else "true"
    status = relay.locator('[data-testid="command-status"][data-origin="relay"]')

    switch.click()
    expect(status).to_have_attribute("data-status", "acked")
    expect(status).to_have_text(f"Channel 2 {'on' if after == 'true' else 'off'}: acked")
    expect(switch).to_have_attribute("aria-checked", after)
    expect(page.get_by_test_id("event-log")).to_contain_text("demo-2 Channel 2")
    # The device itself reported the new state to the gateway.
    assert listed_devices(gateway)["demo-2"]["last"]["data"]["channels"][2] is (after == "true")

    # And back again from the keyboard.
    switch.focus()
    page.keyboard.press("Space")
    expect(status).to_have_text(f"Channel 2 {'on' if before == 'true' else 'off'}: acked")
    expect(switch).to_have_attribute("aria-checked", before or "false")


def test_viewer_sees_no_command_controls(page: Page, gateway: GatewayProcess) -> None:
    # An old link with ?token= still works, and the token leaves the address bar too.
    open_dashboard(page, gateway, VIEWER, query=True)
    assert "token" not in page.url
    expect(page.get_by_test_id("role")).to_have_text(re.compile("Viewer"))
    # The relays' state is shown, read only.
    expect(page.get_by_test_id("relay-channel")).to_have_count(8)
    expect(card(page, "demo-1").get_by_test_id("value-temperature_c")).to_be_visible()
    expect(page.get_by_role("switch")).to_have_count(0)
    expect(page.get_by_test_id("command-panel")).to_have_count(0)
    expect(page.get_by_test_id("group-commands")).to_have_count(0)
    expect(page.get_by_test_id("command-status")).to_have_count(0)
    expect(page.get_by_role("button", name=re.compile("Reboot|Send|Set interval"))).to_have_count(0)


def test_bad_token_shows_unauthorized(page: Page, gateway: GatewayProcess) -> None:
    # No token at all: the page asks for one.
    page.goto(page_url(gateway, None))
    expect(page.get_by_test_id("auth-panel")).to_be_visible()
    expect(page.get_by_test_id("auth-message")).to_contain_text("needs an access token")

    page.goto(page_url(gateway, "not-the-token"))
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "unauthorized")
    expect(page.get_by_test_id("connection-state")).to_have_text("Unauthorized")
    message = page.get_by_test_id("auth-message")
    expect(message).to_contain_text("refused this token")
    expect(message).to_have_attribute("role", "alert")
    assert "token" not in page.url
    expect(page.get_by_test_id("device-card")).to_have_count(0)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "unauthorized.png"))

    # The form takes a good token and the page goes live.
    page.get_by_label("Access token").fill(OPERATOR)
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    expect(page.get_by_test_id("device-card")).to_have_count(4)
    expect(page.get_by_test_id("auth-panel")).to_be_hidden()


def test_the_page_never_sends_its_token_in_a_url(page: Page, gateway: GatewayProcess) -> None:
    """docs/api.md §1: the token comes in the fragment; the page sends it in headers only."""
    requests: list[Request] = []
    sockets: list[str] = []
    page.on("request", lambda request: requests.append(request))
    page.on("websocket", lambda ws: sockets.append(ws.url))
    open_dashboard(page, gateway, OPERATOR)
    # The fragment is gone from the address bar; the tab keeps the token.
    assert "token" not in page.url
    assert urlsplit(page.url).fragment == ""
    assert page.evaluate("sessionStorage.getItem('iot-gateway.token')") == OPERATOR

    # Everything the page does: history over HTTP, a command over the WebSocket.
    sensor = card(page, "demo-1")
    sensor.get_by_test_id("toggle-details").click()
    expect(sensor.get_by_test_id("history-state")).to_have_attribute("data-state", "loaded")
    relay = card(page, "demo-2")
    status = relay.locator('[data-testid="command-status"][data-origin="relay"]')
    relay.locator('[data-testid="relay-channel"][data-channel="1"]').click()
    expect(status).to_have_attribute("data-status", "acked")

    encoded = base64.urlsafe_b64encode(OPERATOR.encode()).decode().rstrip("=")
    urls = [r.url for r in requests] + sockets
    assert sockets, "the page opened no WebSocket"
    assert any("/api/devices/demo-1/telemetry" in u for u in urls)
    for url in urls:
        assert OPERATOR not in url, url
        assert encoded not in url, url
        assert "token=" not in url, url
    # Its API calls carry the token in the Authorization header.
    api = [r for r in requests if urlsplit(r.url).path.startswith("/api/")]
    assert api
    assert all(r.headers.get("authorization") == f"Bearer {OPERATOR}" for r in api)

    # Its WebSocket offers the token as a subprotocol; the gateway picks "iot-gateway".
    picked = page.evaluate(
        """async (token) => {
            const { socketProtocols, socketUrl } = await import('./static/api.js');
            const ws = new WebSocket(socketUrl(), socketProtocols(token));
            const protocol = await new Promise((resolve, reject) => {
                ws.onopen = () => resolve(ws.protocol);
                ws.onerror = () => reject(new Error('refused'));
            });
            ws.close();
            return protocol;
        }""",
        OPERATOR,
    )
    assert picked == "iot-gateway"
    # A configured token is never printed or logged by the gateway.
    assert OPERATOR not in gateway.log()


def test_gateway_restart_reconnects_without_a_gap(page: Page, own_gateway: GatewayProcess) -> None:
    gateway = own_gateway
    open_dashboard(page, gateway, OPERATOR)
    page.wait_for_function(
        """() => {
            const devices = Object.values(window.__dashboard.snapshot().devices);
            return devices.length === 4 && devices.every((d) => d.offsets.length >= 3);
        }""",
        timeout=TIMEOUT_MS,
    )
    http_port = gateway.http_port

    stopped = gateway.stop_sync()
    assert stopped.code == 0, stopped
    state = page.get_by_test_id("connection-state")
    expect(state).to_have_attribute("data-state", "reconnecting")
    expect(state).to_have_text("Reconnecting")
    expect(page.get_by_test_id("reconnect-countdown")).to_have_text(
        re.compile(r"retrying in \d+ s|trying now")
    )
    expect(page.get_by_test_id("stale-note")).to_be_visible()
    page.screenshot(path=str(OUTPUT / "reconnecting.png"))
    # What the first run stored last: the page must get past it after the restart.
    stopped_at = max(max(d["offsets"]) for d in snapshot(page)["devices"].values())

    # Keep the page off the network while the gateway restarts and its devices
    # report, so readings pile up that only the replay (since = last offset) can bring.
    page.context.set_offline(True)
    gateway.start_sync()
    assert gateway.http_port == http_port
    stored_at_restart = max(d["last"]["offset"] for d in listed_devices(gateway).values())
    wait_until_sync(
        lambda: all(
            len(gateway.stored_offsets_sync(device, stored_at_restart, 2**62)) >= 2
            for device in listed_devices(gateway)
        ),
        "two readings of every device after the restart",
        timeout=TIMEOUT_MS / 1000,
    )
    stored = {device: d["last"]["offset"] for device, d in listed_devices(gateway).items()}
    expect(state).to_have_attribute("data-state", "reconnecting")
    page.context.set_offline(False)  # the page's "online" handler retries at once

    expect(state).to_have_attribute("data-state", "connected")
    page.wait_for_function(
        """(stored) => {
            const devices = window.__dashboard.snapshot().devices;
            return Object.entries(stored).every(
                ([id, offset]) => devices[id] && Math.max(...devices[id].offsets) >= offset);
        }""",
        arg=stored,
        timeout=TIMEOUT_MS,
    )

    state_now = snapshot(page)
    assert state_now["connects"] == 2
    for device, d in state_now["devices"].items():
        seen: list[int] = d["offsets"]
        assert seen == sorted(set(seen)), f"{device}: duplicates or disorder"
        # Every stored reading from the first one the page saw to the last: no gap.
        expected = gateway.stored_offsets_sync(device, seen[0] - 1, seen[-1])
        assert seen == expected, f"{device}: page {seen} != storage {expected}"
        assert seen[0] <= stopped_at < seen[-1], f"{device}: the restart is not inside {seen}"
    expect(page.get_by_test_id("event-log")).to_contain_text("replaying after offset")


def test_screenshot_of_the_demo(page: Page, gateway: GatewayProcess) -> None:
    """The demo's devices, one opened with its charts (docs/'s pictures: test_screenshots.py)."""
    open_dashboard(page, gateway, OPERATOR)
    sensor = card(page, "demo-1")
    sensor.get_by_test_id("toggle-details").click()
    expect(sensor.get_by_test_id("history-state")).to_have_attribute("data-state", "loaded")
    page.wait_for_function(
        "() => window.__dashboard.snapshot().devices['demo-1'].points.temperature_c >= 20",
        timeout=TIMEOUT_MS,
    )
    relay = card(page, "demo-serial-1")
    switch = relay.locator('[data-testid="relay-channel"][data-channel="0"]')
    if switch.get_attribute("aria-checked") == "true":
        switch.click()  # off first, so the picture shows a fresh "on: acked"
        expect(switch).to_have_attribute("aria-checked", "false")
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "true")
    # A command given from a device's own panel shows its status there.
    other = card(page, "demo-3")
    other.get_by_text("Commands", exact=True).click()
    interval = other.get_by_label("Report interval, seconds")
    interval.fill("1")
    interval.press("Enter")
    status = other.locator('[data-testid="command-status"][data-origin="interval"]')
    expect(status).to_have_text("Interval 1 s: acked")
    interval.blur()
    expect(page.get_by_test_id("event-log")).to_contain_text("demo-serial-1 Channel 0 on: acked")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "dashboard.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot), full_page=True)


def test_replay_bookkeeping_in_the_page(page: Page, gateway: GatewayProcess) -> None:
    """The page's own modules: de-duplication by offset, the lag watermark, the backoff."""
    page.goto(page_url(gateway, VIEWER))
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    result = page.evaluate(
        """async () => {
            const { Store } = await import('./static/store.js');
            const { Backoff } = await import('./static/connection.js');
            const reading = (offset) => ({
                op: 'telemetry', device: 'x', protocol: 'env-sensor', offset, ts: offset * 1000,
                seq: 0, data: { temperature_c: offset },
            });
            const s = new Store();
            const out = {};
            out.first = s.applyTelemetry(reading(10)) !== null;
            out.duplicate = s.applyTelemetry(reading(10)) === null;
            s.applyTelemetry(reading(14));
            out.hole_filled = s.applyTelemetry(reading(12)) !== null;
            out.offsets = [...s.devices.get('x').offsets];
            out.points = s.devices.get('x').series.get('temperature_c').map((p) => p.offset);
            out.resume = s.resumeOffset();
            out.lag_from = s.noteLag({ op: 'lagged', dropped: 3, resume_from: 20 });
            s.applyTelemetry(reading(30));
            out.resume_in_lag = s.resumeOffset();
            s.synced();
            out.resume_after = s.resumeOffset();
            const high = new Backoff({ initial: 500, max: 10000, random: () => 1 });
            out.high = Array.from({ length: 7 }, () => high.next());
            high.reset();
            out.after_reset = high.next();
            const low = new Backoff({ initial: 500, max: 10000, random: () => 0 });
            out.low = Array.from({ length: 3 }, () => low.next());
            return out;
        }"""
    )
    assert result["first"]
    assert result["duplicate"]
    assert result["hole_filled"]  # a replayed reading older than the newest still counts
    assert result["offsets"] == [10, 12, 14]
    assert result["points"] == [10, 12, 14]
    assert result["resume"] == 14
    # After a lag, a reconnect must start below the hole even though newer data came in.
    assert result["lag_from"] == 19
    assert result["resume_in_lag"] == 19
    assert result["resume_after"] == 30
    # Capped exponential backoff; the jitter spans the upper half of each step.
    assert result["high"] == [500, 1000, 2000, 4000, 8000, 10000, 10000]
    assert result["after_reset"] == 500
    assert result["low"] == [250, 500, 1000]


# Synthetic stored histories for chart seeding: offsets of one device.
RESTART_GAP = list(range(3, 6000, 4)) + list(range(1_048_576, 1_049_376, 4))
BUSY_FLEET = list(range(1, 20_000, 4))  # one device of four, in turn
ALONE = list(range(0, 50_000))  # the only device that talks


def test_chart_history_seeding_finds_the_newest_readings(
    page: Page, gateway: GatewayProcess
) -> None:
    """The page asks for "the last 300 readings" in few requests, across a restart's jump."""
    histories = {"hist-gap": RESTART_GAP, "hist-busy": BUSY_FLEET, "hist-alone": ALONE}
    requests = dict.fromkeys(histories, 0)

    def telemetry(route: Route) -> None:
        url = urlsplit(route.request.url)
        device = url.path.split("/")[3]
        query = parse_qs(url.query)
        since, limit = int(query["since"][0]), int(query["limit"][0])
        requests[device] += 1
        rows = [o for o in histories[device] if o > since][:limit]
        body = {
            "device": device,
            "telemetry": [
                {"op": "telemetry", "device": device, "offset": o, "ts": o, "data": {"v": o}}
                for o in rows
            ],
        }
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route("**/api/devices/hist-*/telemetry*", telemetry)
    page.goto(page_url(gateway, VIEWER))
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    for device, offsets in histories.items():
        got = page.evaluate(
            """async ([device, newest]) => {
                const { loadHistory } = await import('./static/api.js');
                const options = { newest, deviceCount: 4, wanted: 300 };
                const rows = await loadHistory(device, 't', options);
                return rows.map((row) => row.offset);
            }""",
            [device, offsets[-1]],
        )
        assert got == offsets[-300:], device
    assert requests == {"hist-gap": 4, "hist-busy": 1, "hist-alone": 2}


def test_a_fleet_beyond_one_page_is_listed_whole(
    page: Page, small_pages_gateway: GatewayProcess
) -> None:
    """The device listing comes a page at a time (docs/api.md §3.2); the page follows ``next``.

    The devices are offline and silent before the page opens, so only the
    listing can tell of them: the page that read the first page alone showed 2.
    """
    gateway = small_pages_gateway
    fleet = [f"fleet-{n}" for n in range(3 * SMALL_PAGE + 1)]
    for name in fleet:
        hello_device(gateway, name).close()
    wait_until_sync(
        lambda: sorted(d for d, e in listed_devices(gateway).items() if not e["online"]) == fleet,
        "the whole fleet known and offline",
        timeout=TIMEOUT_MS / 1000,
    )
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(str(payload))))
    page.goto(page_url(gateway, VIEWER))
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    expect(page.get_by_test_id("device-card")).to_have_count(len(fleet))
    for name in fleet:
        expect(card(page, name).get_by_test_id("device-online")).to_have_text("Offline")
    # One request a page, each after the one before: no page asked twice.
    afters = [json.loads(f).get("after") for f in sent if '"devices"' in f]
    assert afters == [None, "fleet-1", "fleet-3", "fleet-5"], afters

    # A device new to the page comes online: its presence makes the page list
    # again, to the last page, where this one is, to learn its link.
    late = hello_device(gateway, "zz-late")
    try:
        expect(card(page, "zz-late").get_by_test_id("device-online")).to_have_text("Online")
        expect(card(page, "zz-late").get_by_test_id("device-transport")).to_have_text("tcp")
    finally:
        late.close()
    expect(page.get_by_test_id("device-card")).to_have_count(len(fleet) + 1)
