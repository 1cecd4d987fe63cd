"""The batch format of the cluster's log round-trips any telemetry (property tests)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cluster.wire import decode_batch, decode_line, encode_batch

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
_line = st.tuples(
    st.text(min_size=1),
    st.text(),
    st.integers(min_value=0, max_value=2**53),
    st.integers(min_value=0, max_value=255),
    _json.map(lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False)),
)


@given(st.lists(_line, min_size=1, max_size=20))
def test_a_batch_round_trips(lines: list[tuple[str, str, int, int, str]]) -> None:
    heads, data = encode_batch(lines)
    assert decode_batch(heads, data) == lines


@pytest.mark.parametrize(
    ("heads", "data"),
    [
        ("", "{}"),
        ("{}", "{}"),
        ('[["d","p",1,2]]', "{}\n{}"),  # two data lines for one header
        ('[["d","p",1]]', "{}"),
        ('[["d","p","1",2]]', "{}"),
        ('[["d",3,1,2]]', "{}"),
        ('["d"]', "{}"),
    ],
)
def test_a_malformed_batch_is_a_value_error(heads: str, data: str) -> None:
    with pytest.raises(ValueError, match="malformed telemetry batch"):
        decode_batch(heads, data)


@pytest.mark.parametrize("bad", ["", "no tab", '["d","p",1]\t{}', '["d","p","1",2]\t{}', "[\t{}"])
def test_a_malformed_line_of_the_previous_format_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="malformed telemetry line"):
        decode_line(bad)
