"""The TOML writer round-trips through ``tomllib``, the reader the gateway itself uses."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import build_config, load_file
from tests.support.toml_writer import dumps

keys = st.text(max_size=8)
scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
# Inline values: scalars, arrays, and tables inside arrays.
inline = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=12,
)
documents: st.SearchStrategy[dict[str, Any]] = st.recursive(
    st.dictionaries(keys, inline, max_size=4),
    # Sub-tables and arrays of tables, nested.
    lambda tables: st.dictionaries(
        keys, tables | st.lists(tables, min_size=1, max_size=3) | inline, max_size=4
    ),
    max_leaves=20,
)


@given(documents)
def test_any_document_round_trips(table: dict[str, Any]) -> None:
    assert tomllib.loads(dumps(table)) == table


def test_a_gateway_config_round_trips_and_loads(tmp_path: Path) -> None:
    table = {
        "log_level": "warning",
        "devices": {"max_connections": 60_000, "max_frames_per_second": 1e6},
        "dashboards": {"max_dashboards": 20},
        "serial": [
            {"url": "/dev/ttyUSB0", "client_id": "meter-1", "protocol": "env-sensor"},
            {"url": "socket://127.0.0.1:4000", "baud": 9600},
        ],
    }
    path = tmp_path / "gateway.toml"
    path.write_text(dumps(table))
    assert load_file(path) == table
    config = build_config(load_file(path), environ={})
    assert [p.url for p in config.serial] == ["/dev/ttyUSB0", "socket://127.0.0.1:4000"]
    assert config.dashboards.max_dashboards == 20


def test_strings_that_need_escapes_and_odd_keys() -> None:
    table = {'a "key"': 'quote " backslash \\ newline \n tab \t del \x7f nul \x00 é ✓ 😀', "": 1}
    assert tomllib.loads(dumps(table)) == table


def test_special_floats() -> None:
    back = tomllib.loads(dumps({"inf": math.inf, "ninf": -math.inf, "nan": math.nan}))
    assert back["inf"] == math.inf
    assert back["ninf"] == -math.inf
    assert math.isnan(back["nan"])


@pytest.mark.parametrize("value", [None, b"bytes", 2**63, (1, 2), {1: "x"}])
def test_what_toml_cannot_say_is_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        dumps({"k": value})
