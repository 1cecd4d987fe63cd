"""The dashboard page with 10,000 devices in headless Chromium (issue 13).

``python -m benchmarks.page`` starts a gateway, connects 10,000 devices to it
with the load generator (``benchmarks.loadgen``: 9,000 that send one reading,
reconnect and then only PING, and 1,000 that send a reading each second), so
every device has a latest value in the listing, then opens the dashboard in Debian's
headless Chromium a few times and measures, each time:

- **first paint**: from the start of navigation until the first device card
  is on screen (the frame after it entered the DOM);
- **time to interactive**: until the whole fleet is listed and counted in the
  summary bar, and the page answers input (the frame after);
- **frame rate** while the 1,000 devices update at 1 Hz: animation frames per
  second over ``--fps-seconds``, with the longest gap between two frames,
  first with the first page of the fleet on screen (the updating devices
  elsewhere), then with the search showing updating devices only.

It prints the medians over ``--runs`` (and each run) and writes
``benchmarks/results/page.json``. A benchmark, not a test: it asserts nothing,
and its figures go to docs/benchmarks.md. Chromium is the system's
(``/usr/bin/chromium`` or ``IOT_GATEWAY_CHROMIUM``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, async_playwright

from benchmarks import harness
from tests.support.chromium import CHROMIUM, CHROMIUM_ARGS

TOKEN = "bench-token"

# Installed before the page's own scripts: records when the first card is
# painted and when the whole fleet is counted, in ms since navigation start.
PROBE = """
(() => {
  const bench = (window.__bench = { firstCard: null, listed: null, expected: %d });
  const afterPaint = (key) =>
    requestAnimationFrame(() => setTimeout(() => { bench[key] = performance.now(); }, 0));
  const poll = setInterval(() => {
    if (bench.firstCard === null && document.querySelector('[data-testid="device-card"]')) {
      bench.firstCard = -1;
      afterPaint('firstCard');
    }
    const total = document.querySelector('[data-testid="summary-total"]');
    if (bench.listed === null && total && Number(total.dataset.count) >= bench.expected) {
      bench.listed = -1;
      afterPaint('listed');
      clearInterval(poll);
    }
  }, 5);
})();
"""

# Counts animation frames for `seconds` while the page runs; returns fps and the longest gap.
FRAMES = """
(seconds) => new Promise((resolve) => {
  const times = [];
  const start = performance.now();
  const step = (t) => {
    times.push(t);
    if (t - start < seconds * 1000) requestAnimationFrame(step);
    else {
      let gap = 0;
      for (let i = 1; i < times.length; i += 1) gap = Math.max(gap, times[i] - times[i - 1]);
      resolve({ frames: times.length, seconds: (t - start) / 1000, longest_gap_ms: gap });
    }
  };
  requestAnimationFrame(step);
})
"""


async def one_run(browser: Browser, url: str, devices: int, fps_seconds: float) -> dict[str, Any]:
    """Open the page once in a fresh context and measure it."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = await context.new_page()
        await page.add_init_script(PROBE % devices)
        await page.goto(url)
        await page.wait_for_function(
            "() => window.__bench.listed > 0", timeout=120_000, polling=100
        )
        marks = await page.evaluate("({...window.__bench})")
        # Interactive: the page answers a click (the next page of cards) within a frame or so.
        t0 = await page.evaluate("performance.now()")
        await page.get_by_test_id("page-next").click()
        await page.wait_for_function(
            "() => document.querySelector('[data-testid=\"devices\"]').dataset.page === '2'",
            timeout=30_000,
        )
        click_ms = await page.evaluate("performance.now()") - t0
        await page.get_by_test_id("page-prev").click()
        frames = await page.evaluate(FRAMES, fps_seconds)
        # Again with the updating devices on screen: the cards shown redraw each second.
        await page.get_by_test_id("search").fill("live-")
        await page.wait_for_function(
            "() => document.querySelector('[data-testid=\"device-card\"]')"
            "?.dataset.device.startsWith('live-')",
            timeout=30_000,
        )
        live = await page.evaluate(FRAMES, fps_seconds)
        return {
            "first_paint_ms": round(marks["firstCard"], 1),
            "interactive_ms": round(marks["listed"], 1),
            "next_page_click_ms": round(click_ms, 1),
            "fps": round(frames["frames"] / frames["seconds"], 1),
            "longest_frame_gap_ms": round(frames["longest_gap_ms"], 1),
            "fps_updating_cards_shown": round(live["frames"] / live["seconds"], 1),
            "longest_gap_updating_ms": round(live["longest_gap_ms"], 1),
            "dom_elements": await page.evaluate("document.querySelectorAll('*').length"),
        }
    finally:
        await context.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-page-"))
    idle = args.devices - args.live
    server = await harness.start_gateway(
        workdir, loop="uvloop", config=harness.bench_gateway_config(), token=TOKEN
    )
    children: list[harness.Child] = []
    try:
        host, port = server.devices
        duration = 3600.0  # stopped when done; bounded all the same
        common = ["--gateway", f"{host}:{port}", "--duration", duration, "--concurrency", 200]
        if idle:
            # Every idle device first sends one reading and disconnects, so that the
            # listing carries a latest value for each (as a real fleet's does) ...
            warm = await harness.spawn(
                "loadgen-warm",
                harness.module(
                    "loadgen",
                    "--gateway",
                    f"{host}:{port}",
                    "--devices",
                    idle,
                    "--rate",
                    1.0,
                    "--duration",
                    1.5,
                    "--linger",
                    0.5,
                    "--prefix",
                    "idle",
                    "--concurrency",
                    200,
                ),
                workdir,
            )
            await warm.event("done", timeout=300)
            await warm.wait(30)
            # ... then comes back to stay online with PINGs only.
            children.append(
                await harness.spawn(
                    "loadgen-idle",
                    harness.module(
                        "loadgen",
                        *common,
                        "--devices",
                        idle,
                        "--rate",
                        0,
                        "--ping-interval",
                        20,
                        "--prefix",
                        "idle",
                    ),
                    workdir,
                )
            )
        children.append(
            await harness.spawn(
                "loadgen-live",
                harness.module(
                    "loadgen", *common, "--devices", args.live, "--rate", 1.0, "--prefix", "live"
                ),
                workdir,
            )
        )
        t0 = time.monotonic()
        for child in children:
            ready = await child.event("ready", timeout=300)
            if ready["failed"]:
                raise harness.ChildFailed(f"{child.name}: {ready['failed']} devices not welcomed")
        connect_s = time.monotonic() - t0
        assert server.http is not None
        url = f"http://{server.http[0]}:{server.http[1]}/#token={TOKEN}"
        runs = []
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                for i in range(args.runs):
                    run = await one_run(browser, url, args.devices, args.fps_seconds)
                    print(json.dumps({"run": i + 1, **run}), flush=True)
                    runs.append(run)
            finally:
                await browser.close()
    finally:
        for child in children:
            await child.stop()
        await server.stop()
    keys = [k for k in runs[0] if k != "dom_elements"]
    medians = {k: round(statistics.median(r[k] for r in runs), 1) for k in keys}
    return {
        "devices": args.devices,
        "updating_at_1hz": args.live,
        "connect_s": round(connect_s, 1),
        "runs": runs,
        "median": medians,
        "dom_elements": runs[-1]["dom_elements"],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=10_000, help="devices connected in all")
    p.add_argument("--live", type=int, default=1_000, help="of which send a reading each second")
    p.add_argument("--runs", type=int, default=3, help="page loads measured; medians reported")
    p.add_argument("--fps-seconds", type=float, default=10.0, help="frame rate measured over")
    args = p.parse_args(argv)
    if not 0 < args.live <= args.devices:
        p.error("--live must be between 1 and --devices")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(CHROMIUM).is_file():
        print(f"Chromium is not at {CHROMIUM}: apt-get install chromium", file=sys.stderr)
        return 2
    result = asyncio.run(main_async(args))
    m = result["median"]
    print(
        f"{result['devices']:,} devices ({result['updating_at_1hz']:,} at 1 Hz), "
        f"median of {len(result['runs'])}: first paint {m['first_paint_ms']:.0f} ms, "
        f"interactive {m['interactive_ms']:.0f} ms, next page {m['next_page_click_ms']:.0f} ms, "
        f"{m['fps']:.0f} frames/s (longest gap {m['longest_frame_gap_ms']:.0f} ms), "
        f"{m['fps_updating_cards_shown']:.0f} frames/s with updating cards on screen "
        f"(longest gap {m['longest_gap_updating_ms']:.0f} ms)",
        flush=True,
    )
    print(f"results: {harness.write_result('page', result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
