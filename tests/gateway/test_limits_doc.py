"""docs/limits.md names real settings with their real defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig

DOC = Path(__file__).parents[2] / "docs" / "limits.md"


def _default(section: str, key: str) -> Any:
    config = GatewayConfig()
    return getattr(getattr(config, section), key)


def test_every_setting_named_in_the_limits_table_exists() -> None:
    names = set(re.findall(r"`(devices|dashboards|storage|http)\.([a-z_]+)`", DOC.read_text()))
    assert len(names) > 30
    config = GatewayConfig()
    missing = [f"{s}.{k}" for s, k in sorted(names) if not hasattr(getattr(config, s), k)]
    assert not missing, f"docs/limits.md names settings that do not exist: {missing}"


def test_each_rows_first_setting_has_its_default_written() -> None:
    # The rows whose default is a plain number: "| `section.key` | 1234 | ..."
    rows = re.findall(
        r"^\| `(devices|dashboards|storage|http)\.([a-z_]+)` \| ([0-9.]+) \|",
        DOC.read_text(),
        flags=re.MULTILINE,
    )
    assert len(rows) > 10
    wrong = [
        f"{s}.{k}: doc {v}, code {_default(s, k)}"
        for s, k, v in rows
        if float(v) != float(_default(s, k))
    ]
    assert not wrong, wrong
