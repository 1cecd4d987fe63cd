"""Debian's Chromium, as every browser test and benchmark launches it (never a downloaded one)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from playwright.sync_api import Browser, Playwright

CHROMIUM = os.environ.get("IOT_GATEWAY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def missing() -> str | None:
    """Why Chromium cannot be launched (one line), or None when it is there."""
    if Path(CHROMIUM).is_file():
        return None
    return (
        f"Chromium is not at {CHROMIUM}: install it (apt-get install chromium) "
        "or point IOT_GATEWAY_CHROMIUM at it. The browser tests are required."
    )


def launch(playwright: Playwright, extra_args: Sequence[str] = ()) -> Browser:
    """Headless Chromium with the project's flags, plus ``extra_args``."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=[*CHROMIUM_ARGS, *extra_args]
    )
