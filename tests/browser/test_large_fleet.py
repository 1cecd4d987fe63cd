"""10,000 devices on the page (issue 13), with the gateway's WebSocket played by the test.

The page is the real one, served by a real gateway; only its WebSocket is
answered by the test (Playwright's ``route_web_socket``), which lists a fleet
of 10,000 devices a page of 1,000 at a time, as docs/api.md §3 describes, and
then sends live readings, labels, removals and command statuses. That makes
the fleet's size and every device's state exact, and the test fast: a real
fleet of 10,000 is what ``python -m benchmarks.page`` measures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, Page, WebSocketRoute, expect

from tests.browser.support import OPERATOR, TIMEOUT_MS, page_url
from tests.support.gateway import GatewayProcess

pytestmark = pytest.mark.browser

SENSORS = 9_000
RELAYS = 1_000
FLEET = SENSORS + RELAYS
LISTING_PAGE = 1_000
NOW = 1_764_300_000_000  # a fixed "now" in the readings: the test compares text, not clocks


def entry(n: int) -> dict[str, Any]:
    """Device n of the fleet: sim-1..sim-9000 sensors, then relay-1..relay-1000."""
    sensor = n <= SENSORS
    device = f"sim-{n}" if sensor else f"relay-{n - SENSORS}"
    online = n % 10 != 0  # every tenth is offline
    data: dict[str, Any] = (
        {"temperature_c": 20.0, "humidity_pct": 50.0, "battery_pct": 90}
        if sensor
        else {"channels": [True, False, False, True]}
    )
    last: dict[str, Any] = {
        "op": "telemetry",
        "device": device,
        "protocol": "env-sensor" if sensor else "relay-4",
        "offset": n,
        "ts": NOW,
        "seq": 0,
        "data": data,
    }
    if sensor and n % 1000 == 7:  # nine sensors with a battery of 255 %
        data["battery_pct"] = 255
        last["out_of_range"] = ["battery_pct"]
    return {
        "device": device,
        "protocol": last["protocol"],
        "online": online,
        "transport": "tcp",
        "peer": "127.0.0.1:1",
        "session": None,
        "connected_at": NOW,
        "last_seen": NOW,
        "last": last,
        "labels": {"name": None, "location": None, "channels": None},
        "offline_since": None if online else NOW - 60_000,
        "offline_reason": None if online else "silent",
        "counters": {"telemetry": 1, "out_of_range": 0, "commands": 0, "nacks": 0},
    }


ENTRIES = [entry(n) for n in range(1, FLEET + 1)]
BY_ID = sorted(ENTRIES, key=lambda e: str(e["device"]))  # the gateway lists by id


class FakeGateway:
    """The gateway's side of the dashboard socket: welcome, subscribe, devices, commands."""

    def __init__(self) -> None:
        self.socket: WebSocketRoute | None = None
        self.commands: list[dict[str, Any]] = []

    def handle(self, ws: WebSocketRoute) -> None:
        self.socket = ws
        ws.on_message(lambda message: self.receive(ws, message))
        ws.send(json.dumps({"op": "welcome", "session": "s", "role": "operator"}))

    def receive(self, ws: WebSocketRoute, message: str | bytes) -> None:
        request = json.loads(message)
        op = request["op"]
        if op == "subscribe":
            ws.send(json.dumps({"op": "subscribed", "all": True}))
        elif op == "devices":
            start = 0
            if request.get("after"):
                start = 1 + next(i for i, e in enumerate(BY_ID) if e["device"] == request["after"])
            chunk = BY_ID[start : start + LISTING_PAGE]
            more = start + LISTING_PAGE < len(BY_ID)
            reply = {
                "op": "devices",
                "id": request.get("id"),
                "devices": chunk,
                "next": chunk[-1]["device"] if more else None,
            }
            ws.send(json.dumps(reply))
        elif op == "command":
            self.commands.append(request)
            status = {
                "op": "command_status",
                "id": request["id"],
                "device": request["device"],
                "command_id": "abc123",
                "status": "nacked",
                "code": 2,
                "message": "bad argument",
            }
            ws.send(json.dumps(status))

    def send(self, *messages: dict[str, Any]) -> None:
        assert self.socket is not None
        self.socket.send("\n".join(json.dumps(m) for m in messages))


@pytest.fixture
def fleet_page(browser: Browser, gateway: GatewayProcess) -> Iterator[tuple[Page, FakeGateway]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    fake = FakeGateway()
    page.route_web_socket(re.compile(r"/ws$"), fake.handle)
    page.goto(page_url(gateway, OPERATOR))
    expect(page.get_by_test_id("summary-total")).to_have_attribute("data-count", str(FLEET))
    yield page, fake
    context.close()
    assert not errors, errors


def cards(page: Page) -> Locator:
    return page.get_by_test_id("device-card")


def shown_ids(page: Page) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(
        '[data-testid="device-card"]', "cards => cards.map((c) => c.dataset.device)"
    )
    return ids


def page_size(page: Page) -> int:
    size: int = page.evaluate("async () => (await import('./static/view.js')).PAGE_SIZE")
    return size


def test_ten_thousand_devices_render_one_page(fleet_page: tuple[Page, FakeGateway]) -> None:
    page, _ = fleet_page
    size = page_size(page)
    assert 20 <= size <= 200
    # Only one page of cards exists; the rest is in the summary and the pager.
    expect(cards(page)).to_have_count(size)
    assert page.evaluate("document.querySelectorAll('*').length") < 60 * size
    # Natural order within the first protocol: sim-1, sim-2, ..., not sim-1, sim-10, sim-100.
    assert shown_ids(page) == [f"sim-{n}" for n in range(1, size + 1)]
    offline = FLEET // 10
    expect(page.get_by_test_id("summary-total")).to_have_text("10,000 devices")
    expect(page.get_by_test_id("summary-online")).to_have_text(f"{FLEET - offline:,} online")
    expect(page.get_by_test_id("summary-offline")).to_have_text(f"{offline:,} offline")
    expect(page.get_by_test_id("summary-errors")).to_have_text("9 with errors")
    expect(page.get_by_test_id("pager-text")).to_have_text(
        re.compile(rf"^1\u2013{size} of 10,000 \(page 1 of {-(-FLEET // size)}\)$")
    )

    # The next page holds the next devices in order.
    page.get_by_test_id("page-next").click()
    expect(cards(page).first).to_have_attribute("data-device", f"sim-{size + 1}")
    assert shown_ids(page) == [f"sim-{n}" for n in range(size + 1, 2 * size + 1)]
    expect(cards(page)).to_have_count(size)

    # Filters work over the whole fleet, not only the page.
    page.get_by_label("Protocol").select_option("relay-4")
    expect(cards(page).first).to_have_attribute("data-device", "relay-1")
    expect(page.get_by_test_id("device-count")).to_have_text("1,000 of 10,000 devices shown")
    page.get_by_label("Protocol").select_option("")
    page.get_by_test_id("summary-errors").click()
    expect(cards(page)).to_have_count(9)
    expect(cards(page).first.get_by_test_id("out-of-range")).to_be_visible()
    mark = cards(page).first.get_by_test_id("out-of-range")
    expect(mark).to_have_attribute("title", re.compile("Battery 255 % is outside the range"))
    expect(cards(page).first.get_by_test_id("device-errors")).to_be_visible()
    page.get_by_test_id("summary-errors").click()
    page.get_by_test_id("search").fill("sim-9999")
    expect(cards(page)).to_have_count(0)  # sim-9999 is not in a fleet of 9,000 sensors
    page.get_by_test_id("search").fill("sim-8999")
    expect(cards(page)).to_have_count(1)


def test_live_updates_labels_and_removals_at_scale(fleet_page: tuple[Page, FakeGateway]) -> None:
    page, fake = fleet_page
    size = page_size(page)
    # 1,000 devices report at once: the cards on screen show it, the DOM stays one page.
    readings = [
        {
            "op": "telemetry",
            "device": f"sim-{n}",
            "protocol": "env-sensor",
            "offset": FLEET + n,
            "ts": NOW + 1000,
            "seq": 1,
            "data": {"temperature_c": 30.5, "humidity_pct": 50.0, "battery_pct": 90},
        }
        for n in range(1, 1001)
    ]
    fake.send(*readings)
    first = page.locator('[data-device="sim-1"]')
    expect(first.get_by_test_id("value-temperature_c")).to_have_text("30.50 °C")
    expect(
        first.locator('[data-testid="sparkline"][data-label="temperature_c"]')
    ).to_have_attribute("data-points", "2")
    expect(cards(page)).to_have_count(size)

    # Labels from the gateway: the name replaces the id on the card, and the search finds it.
    fake.send(
        {
            "op": "labels",
            "device": "sim-2",
            "labels": {"name": "Greenhouse", "location": "North bed", "channels": None},
        },
        {
            "op": "labels",
            "device": "relay-1",
            "labels": {
                "name": None,
                "location": None,
                "channels": ["pump", "fan", "light", "valve"],
            },
        },
    )
    named = page.locator('[data-device="sim-2"]')
    expect(named.get_by_test_id("device-name")).to_have_text("Greenhouse")
    expect(named.get_by_test_id("device-id")).to_have_text("sim-2")
    expect(named.get_by_test_id("device-location")).to_contain_text("North bed")
    page.get_by_test_id("search").fill("north")
    expect(cards(page)).to_have_count(1)
    page.get_by_test_id("search").fill("relay-1")
    relay = page.locator('[data-device="relay-1"]')
    expect(relay.get_by_test_id("channel-name")).to_have_text(["pump", "fan", "light", "valve"])
    expect(relay.locator('[data-channel="0"]')).to_have_attribute("aria-label", "Channel 0 (pump)")

    # An offline device's card says since when and why, in words.
    page.get_by_test_id("search").fill("sim-10")
    offline = page.locator('[data-device="sim-10"]')
    expect(offline.get_by_test_id("offline-reason")).to_have_text(
        "nothing heard for too long (heartbeat missed) (silent)"
    )

    # A NACK with the gateway's message in words.
    page.get_by_test_id("search").fill("relay-1")
    relay.locator('[data-channel="1"]').click()
    status = relay.locator('[data-testid="command-status"][data-origin="relay"]')
    expect(status).to_have_text("Channel 1 on: nacked: bad argument")

    # Removed devices leave the page and the counts.
    page.get_by_test_id("search").fill("")
    fake.send(
        {"op": "removed", "device": "sim-1", "reason": "deleted"},
        {"op": "removed", "device": "sim-3", "reason": "unseen"},
    )
    expect(page.get_by_test_id("summary-total")).to_have_text("9,998 devices")
    expect(page.locator('[data-device="sim-1"]')).to_have_count(0)
    assert shown_ids(page)[:3] == ["sim-2", "sim-4", "sim-5"]
    log = page.get_by_test_id("event-log")
    expect(log).to_contain_text("sim-1 deleted")
    expect(log).to_contain_text("sim-3 forgotten (unseen for too long)")
