"""The device page (issue 13) against a real gateway: ranged chart, zoom, CSV,
labels (from the config and edited by an operator), counters, out-of-range
values, and Delete for an offline device.

Every wait is on a condition on the page or on the gateway's HTTP API.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import _started
from tests.browser.support import (
    DEMO_DEVICES,
    OPERATOR,
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

CHANNELS = ["pump", "fan", "light", "valve"]
LABELS: dict[str, Any] = {
    "demo-2": {"name": "Greenhouse relays", "location": "North bed", "channels": CHANNELS}
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The demo's devices, with labels for demo-2 in the config file."""
    workdir = tmp_path_factory.mktemp("gateway")
    gw = GatewayProcess(
        workdir,
        {"labels": LABELS},
        token=OPERATOR,
        viewer_token=VIEWER,
        args=["--demo", str(DEMO_DEVICES)],
    )
    yield from _started(workdir, gw)


def card(page: Page, device: str) -> Locator:
    return page.locator(f'[data-testid="device-card"][data-device="{device}"]')


def open_device_page(
    page: Page, gateway: GatewayProcess, device: str, token: str = OPERATOR
) -> Locator:
    page.goto(page_url(gateway, token))
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    card(page, device).get_by_test_id("device-link").click()
    dp = page.get_by_test_id("device-page")
    expect(dp).to_be_visible()
    expect(page.get_by_test_id("list-view")).to_be_hidden()
    assert page.url.endswith(f"#device={device}")
    return dp


def test_chart_over_a_range_zoom_and_csv(page: Page, gateway: GatewayProcess) -> None:
    wait_until_sync(
        lambda: len(gateway.stored_offsets_sync("demo-1", -1, 2**62)) >= 5,
        "five stored readings of demo-1",
        timeout=TIMEOUT_MS / 1000,
    )
    dp = open_device_page(page, gateway, "demo-1")
    expect(dp.get_by_test_id("dp-name")).to_have_text("demo-1")
    expect(dp.get_by_test_id("range-hour")).to_have_attribute("aria-pressed", "true")
    expect(dp.get_by_test_id("range-state")).to_have_attribute("data-state", "loaded")
    chart = dp.locator('[data-testid="range-chart"][data-field="temperature_c"]')
    expect(chart).to_be_visible()
    expect(dp.get_by_test_id("range-chart")).to_have_count(3)
    points = int(chart.get_attribute("data-points") or "0")
    assert points >= 5
    frm, to = int(chart.get_attribute("data-from") or 0), int(chart.get_attribute("data-to") or 0)
    assert 3_599_000 <= to - frm <= 3_601_000  # the last hour
    # Live readings extend the chart while it shows the latest range.
    page.wait_for_function(
        """(n) => Number(document.querySelector(
            '[data-testid="range-chart"][data-field="temperature_c"]').dataset.points) > n""",
        arg=points,
        timeout=TIMEOUT_MS,
    )

    # A longer range: the same readings, over a day.
    dp.get_by_test_id("range-day").click()
    expect(dp.get_by_test_id("range-day")).to_have_attribute("aria-pressed", "true")
    expect(dp.get_by_test_id("range-hour")).to_have_attribute("aria-pressed", "false")
    page.wait_for_function(
        """() => { const c = document.querySelector(
            '[data-testid="range-chart"][data-field="temperature_c"]');
            return Number(c.dataset.to) - Number(c.dataset.from) > 86_000_000; }""",
        timeout=TIMEOUT_MS,
    )
    dp.get_by_test_id("range-hour").click()
    expect(dp.get_by_test_id("range-state")).to_have_attribute("data-state", "loaded")

    # Drag across the plot's right half: the chart zooms into that span.
    plot = chart.get_by_test_id("range-plot")
    box = plot.bounding_box()
    assert box
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.5, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, y, steps=5)
    # Past the right edge: the span ends at the range's end (the readings are all recent).
    page.mouse.move(box["x"] + box["width"] + 20, y, steps=5)
    page.mouse.up()
    expect(dp).to_have_attribute("data-zoomed", "true")
    expect(dp.get_by_test_id("range-hour")).to_have_attribute("aria-pressed", "false")
    expect(dp.get_by_test_id("range-state")).to_have_attribute("data-state", "loaded")
    zoomed_from = int(chart.get_attribute("data-from") or 0)
    zoomed_to = int(chart.get_attribute("data-to") or 0)
    assert zoomed_to - zoomed_from < 0.55 * (to - frm)
    assert zoomed_from >= frm + 0.45 * (to - frm)

    # The CSV holds exactly the stored readings of the zoomed span, oldest first.
    with page.expect_download() as info:
        dp.get_by_test_id("csv-download").click()
    download = info.value
    assert download.suggested_filename.startswith("demo-1_")
    assert download.suggested_filename.endswith(".csv")
    path = download.path()
    rows = list(csv.reader(io.StringIO(path.read_text())))
    assert rows[0][:3] == ["offset", "ts", "seq"]
    assert "temperature_c" in rows[0]
    assert rows[0][-1] == "out_of_range"
    body = gateway.get_json_sync(
        f"/api/devices/demo-1/telemetry?from={zoomed_from}&to={zoomed_to}&limit=1000"
    )
    assert [int(r[0]) for r in rows[1:]] == [m["offset"] for m in body["telemetry"]]
    expect(dp.get_by_test_id("csv-status")).to_contain_text("downloaded")

    # Zoom out goes back to the whole hour; the back link to the list.
    dp.get_by_test_id("zoom-out").click()
    expect(dp).to_have_attribute("data-zoomed", "false")
    expect(dp.get_by_test_id("range-hour")).to_have_attribute("aria-pressed", "true")
    expect(dp.get_by_test_id("range-state")).to_have_attribute("data-state", "loaded")
    # Zoom in by the button: half the hour, still ending now, so the newest readings stay.
    hour_to = int(chart.get_attribute("data-to") or 0)
    dp.get_by_test_id("zoom-in").click()
    expect(dp).to_have_attribute("data-zoomed", "true")
    expect(dp.get_by_test_id("range-state")).to_have_attribute("data-state", "loaded")
    half_from = int(chart.get_attribute("data-from") or 0)
    half_to = int(chart.get_attribute("data-to") or 0)
    assert half_to - half_from == pytest.approx(1_800_000, abs=2_000)
    assert half_to >= hour_to - 1_000
    assert int(chart.get_attribute("data-points") or "0") > 0
    dp.get_by_test_id("back-to-list").click()
    expect(page.get_by_test_id("list-view")).to_be_visible()
    expect(dp).to_be_hidden()


def test_labels_shown_everywhere_and_edited(page: Page, gateway: GatewayProcess) -> None:
    page.goto(page_url(gateway, OPERATOR))
    relay = card(page, "demo-2")
    expect(relay.get_by_test_id("device-name")).to_have_text("Greenhouse relays")
    expect(relay.get_by_test_id("device-id")).to_have_text("demo-2")
    expect(relay.get_by_test_id("device-location")).to_contain_text("North bed")
    expect(relay.get_by_test_id("channel-name")).to_have_text(CHANNELS)
    # The search finds a device by its name and its location.
    page.get_by_test_id("search").fill("north bed")
    expect(page.get_by_test_id("device-card")).to_have_count(1)
    page.get_by_test_id("search").fill("")

    dp = open_device_page(page, gateway, "demo-2")
    expect(dp.get_by_test_id("dp-name")).to_have_text("Greenhouse relays")
    form = dp.get_by_test_id("labels-form")
    expect(form.get_by_label("Display name")).to_have_value("Greenhouse relays")
    form.get_by_label("Display name").fill("Pump house")
    form.get_by_label("Location").fill("South yard")
    form.get_by_label("Channel 3 label").fill("mister")
    form.get_by_test_id("save-labels").click()
    expect(dp.get_by_test_id("labels-status")).to_have_text("Labels saved.")
    expect(dp.get_by_test_id("dp-name")).to_have_text("Pump house")
    entry = gateway.get_json_sync("/api/devices/demo-2")
    assert entry["labels"] == {
        "name": "Pump house",
        "location": "South yard",
        "channels": ["pump", "fan", "light", "mister"],
    }

    # Another dashboard hears of it ({"op":"labels"}) and shows it on the card.
    other = page.context.new_page()
    try:
        other.goto(page_url(gateway, VIEWER))
        expect(card(other, "demo-2").get_by_test_id("device-name")).to_have_text("Pump house")
        gateway.request_sync(
            "PUT", "/api/devices/demo-2/labels", {"name": "Relay shed", "channels": CHANNELS}
        )
        expect(card(other, "demo-2").get_by_test_id("device-name")).to_have_text("Relay shed")
        expect(card(other, "demo-2").get_by_test_id("channel-name")).to_have_text(CHANNELS)
        # A viewer reads the labels but has no form to change them, and no Delete.
        card(other, "demo-2").get_by_test_id("device-link").click()
        viewer_dp = other.get_by_test_id("device-page")
        expect(viewer_dp.get_by_test_id("dp-labels")).to_contain_text("Relay shed")
        expect(viewer_dp.get_by_test_id("labels-form")).to_have_count(0)
        expect(viewer_dp.get_by_test_id("delete-device")).to_have_count(0)
    finally:
        other.close()
    expect(dp.get_by_test_id("dp-name")).to_have_text("Relay shed")


def test_counters_and_out_of_range_values(page: Page, gateway: GatewayProcess) -> None:
    sensor = hello_device(gateway, "hot-battery")
    try:
        send_data(
            sensor, "env-sensor", {"temperature_c": 20.0, "humidity_pct": 40.0, "battery_pct": 255}
        )
        wait_until_sync(
            lambda: (listed_devices(gateway).get("hot-battery") or {}).get("last") is not None,
            "the reading stored",
            timeout=TIMEOUT_MS / 1000,
        )
        page.goto(page_url(gateway, OPERATOR))
        hot = card(page, "hot-battery")
        value = hot.get_by_test_id("value-battery_pct")
        expect(value).to_contain_text("255 %")  # kept as sent ...
        mark = value.get_by_test_id("out-of-range")  # ... and flagged
        expect(mark).to_be_visible()
        expect(mark).to_have_attribute("title", re.compile("outside the range"))
        expect(hot).to_have_attribute("data-errors", "true")
        expect(page.get_by_test_id("summary-errors")).not_to_have_attribute("data-count", "0")
        page.get_by_test_id("summary-errors").click()
        expect(hot).to_be_visible()
        expect(card(page, "demo-1")).to_have_count(0)
        page.get_by_test_id("summary-errors").click()

        dp = open_device_page(page, gateway, "hot-battery")
        expect(dp.get_by_test_id("counter-telemetry")).to_have_text("1")
        expect(dp.get_by_test_id("counter-out_of_range")).to_have_text("1")
        # On a phone the device page fits the width: nothing scrolls sideways.
        page.set_viewport_size({"width": 375, "height": 667})
        expect(dp.get_by_test_id("range-state")).to_have_attribute("data-state", "loaded")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        sensor.close()


def test_delete_an_offline_device(page: Page, gateway: GatewayProcess) -> None:
    hello_device(gateway, "old-1").close()
    wait_until_sync(
        lambda: (listed_devices(gateway).get("old-1") or {"online": True})["online"] is False,
        "old-1 known and offline",
        timeout=TIMEOUT_MS / 1000,
    )
    # An online device cannot be deleted: the button says why.
    dp = open_device_page(page, gateway, "demo-1")
    expect(dp.get_by_test_id("delete-device")).to_be_disabled()
    expect(dp.get_by_test_id("delete-note")).to_contain_text("online")
    dp.get_by_test_id("back-to-list").click()

    # Another dashboard shows old-1 too; it will hear of the deletion ({"op":"removed"}).
    other = page.context.new_page()
    other.goto(page_url(gateway, VIEWER))
    expect(card(other, "old-1")).to_be_visible()

    dp = open_device_page(page, gateway, "old-1")
    delete = dp.get_by_test_id("delete-device")
    expect(delete).to_be_enabled()
    # Cancelled in the confirm dialog: nothing happens.
    page.once("dialog", lambda dialog: dialog.dismiss())
    delete.click()
    assert "old-1" in listed_devices(gateway)
    expect(dp).to_be_visible()

    questions: list[str] = []

    def accept(dialog: Any) -> None:
        questions.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    delete.click()
    expect(page.get_by_test_id("list-view")).to_be_visible()
    expect(card(page, "demo-1")).to_be_visible()
    expect(card(page, "old-1")).to_have_count(0)
    assert questions
    assert "Delete old-1?" in questions[0]
    assert "old-1" not in listed_devices(gateway)
    status, _ = gateway.request_sync("GET", "/api/devices/old-1")
    assert status == 404
    expect(page.get_by_test_id("event-log")).to_contain_text("old-1 deleted")
    expect(card(other, "old-1")).to_have_count(0)
    expect(other.get_by_test_id("event-log")).to_contain_text("old-1 deleted")
    other.close()
