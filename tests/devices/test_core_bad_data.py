"""Malformed DATA: the ERROR a device gets says what is wrong in its protocol's terms, and
the gateway logs it at WARNING, limited (devices.max_log_lines per devices.log_window).

It used to send construct's own words ("stream read less than specified
amount, expected 2, found 1") and log nothing above info.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

import frames
from devices import DeviceTelemetry
from frames import ErrorCode
from tests.devices.core_bench import Bench, telemetry
from tests.devices.support import ENV_DATA


def _error(b: Bench) -> frames.Error:
    [error] = b.out()
    assert isinstance(error, frames.Error), error
    return error


@pytest.mark.parametrize(
    ("protocol", "body", "reason"),
    [
        ("env-sensor", ENV_DATA[:4], "env-sensor DATA is 5 bytes, got 4"),
        ("env-sensor", ENV_DATA + b"\x00", "env-sensor DATA is 5 bytes, got 6"),
        ("env-sensor", b"", "env-sensor DATA is 5 bytes, got 0"),
        ("relay-4", b"", "relay-4 DATA is 1 byte, got 0"),
        ("relay-4", b"\xf0", "relay-4 DATA field channels: bits above channel 3 are set"),
    ],
)
def test_the_error_names_the_expected_size_or_the_field(
    protocol: str, body: bytes, reason: str
) -> None:
    b = Bench()
    b.hello("d-1", protocol)
    events = b.feed(frames.Data(1, body))
    assert not telemetry(events)
    error = _error(b)
    assert error.code == ErrorCode.MALFORMED
    assert error.reason == reason
    assert "stream read" not in error.reason


@given(body=st.binary(max_size=40).filter(lambda b: len(b) != 5))
def test_any_env_sensor_body_of_the_wrong_size_is_named_by_its_size(body: bytes) -> None:
    b = Bench()
    b.hello("d-1", "env-sensor")
    assert not telemetry(b.feed(frames.Data(1, body)))
    assert _error(b).reason == f"env-sensor DATA is 5 bytes, got {len(body)}"


def test_bad_data_is_a_warning_limited_per_window(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="devices.core")
    b = Bench(max_log_lines=3, log_window=60.0)
    b.hello("noisy-1", "env-sensor")
    for seq in range(20):
        b.feed(frames.Data(seq, ENV_DATA[:3]))
    assert len(b.errors()) == 20  # every bad DATA still gets its ERROR
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings  # the log is bounded, the device is not
    assert warnings[0] == (
        "device noisy-1 sent DATA seq 0 that its protocol refuses: "
        "env-sensor DATA is 5 bytes, got 3"
    )
    # Good DATA afterwards is decoded as ever.
    events = b.feed(frames.Data(99, ENV_DATA))
    assert [type(e) for e in events] == [DeviceTelemetry]


def test_an_unknown_protocol_never_has_bad_data() -> None:
    # Unknown protocols carry DATA as hex (docs/protocol.md §3): any body is fine.
    b = Bench()
    b.hello("d-1", "acme-thing")
    events = b.feed(frames.Data(1, b"\x01\x02"))
    assert len(telemetry(events)) == 1
    assert b.out() == []
