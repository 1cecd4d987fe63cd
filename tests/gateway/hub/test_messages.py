"""gateway.hub.messages: what a dashboard request may be, and the shape of every reply.

Pins the rules of docs/api.md §3 that live in the parsing and encoding part alone:
which targets, ``since`` values and command requests are accepted (everything
else is a ``ClientError`` with code ``bad_request``, never another exception),
which request ids are echoed, and the JSON shape of ``error``, replies,
``command_status`` and ``telemetry`` (built once as text, equal to the object
encoded whole).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices import CommandStatus
from gateway.hub import (
    ClientError,
    CommandRequest,
    ErrorCode,
    Target,
    TargetKind,
    dumps,
    error_message,
    parse_command,
    parse_target,
    telemetry_message,
    telemetry_text,
)
from gateway.hub.messages import (
    ALL,
    MAX_OFFSET,
    command_status,
    parse_since,
    presence_text,
    reply,
    request_id_of,
)
from gateway.storage import TelemetryRecord

# ---- JSON-like values, for the property tests --------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(st.one_of(json_values, st.floats(), st.text()))
def test_dumps_is_compact_json_dumps(value: Any) -> None:
    # dumps sets the C encoder up once instead of per call (gateway/hub/messages.py):
    # the same text as json.dumps with the wire's options, NaN and infinities included.
    assert dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_dumps_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"a": object()})
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        dumps(deep)


valid_ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,64}", fullmatch=True)
valid_protocols = st.from_regex(r"[a-z0-9._\-]{1,32}", fullmatch=True)
# The keys the parsers read, with values that are sometimes right and often not.
request_keys = st.sampled_from(["op", "id", "device", "protocol", "all", "since", "command"])
request_values = json_values | valid_ids | valid_protocols | st.just(True) | st.integers(-3, 3)
requests: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    request_keys | st.text(max_size=6), request_values, max_size=6
)


def bad_request(excinfo: pytest.ExceptionInfo[ClientError]) -> bool:
    return excinfo.value.code is ErrorCode.BAD_REQUEST


# ---- parse_target ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        ({"device": "sim-1"}, Target(TargetKind.DEVICE, "sim-1")),
        ({"device": "A.b:c_d-9"}, Target(TargetKind.DEVICE, "A.b:c_d-9")),
        ({"device": "x" * 64}, Target(TargetKind.DEVICE, "x" * 64)),
        ({"protocol": "env-sensor"}, Target(TargetKind.PROTOCOL, "env-sensor")),
        ({"protocol": "p" * 32}, Target(TargetKind.PROTOCOL, "p" * 32)),
        ({"all": True}, ALL),
        ({"op": "subscribe", "id": 3, "since": 5, "device": "a"}, Target(TargetKind.DEVICE, "a")),
    ],
)
def test_parse_target_accepts_one_valid_target(msg: dict[str, Any], expected: Target) -> None:
    assert parse_target(msg) == expected


def test_parse_target_all_is_the_shared_all_target() -> None:
    target = parse_target({"all": True})
    assert target is ALL
    assert target.kind is TargetKind.ALL
    assert target.value == ""


@pytest.mark.parametrize(
    "msg",
    [
        {},
        {"op": "subscribe"},
        {"device": "a", "protocol": "p"},
        {"device": "a", "all": True},
        {"protocol": "p", "all": True},
        {"device": "a", "protocol": "p", "all": True},
    ],
)
def test_parse_target_needs_exactly_one_target(msg: dict[str, Any]) -> None:
    with pytest.raises(ClientError, match="exactly one") as excinfo:
        parse_target(msg)
    assert bad_request(excinfo)


@pytest.mark.parametrize("value", [False, 1, "true", None, [], {}])
def test_parse_target_all_must_be_true(value: Any) -> None:
    with pytest.raises(ClientError, match="'all' must be true") as excinfo:
        parse_target({"all": value})
    assert bad_request(excinfo)


@pytest.mark.parametrize("key", ["device", "protocol"])
@pytest.mark.parametrize("value", [None, 1, True, 1.5, ["a"], {"a": 1}])
def test_parse_target_value_must_be_a_string(key: str, value: Any) -> None:
    with pytest.raises(ClientError, match=f"'{key}' must be a string") as excinfo:
        parse_target({key: value})
    assert bad_request(excinfo)


@pytest.mark.parametrize("device", ["", "x" * 65, "sim 1", "sim/1", "é", "a\nb", "dev*"])
def test_parse_target_refuses_an_invalid_client_id(device: str) -> None:
    with pytest.raises(ClientError, match="not a valid client_id") as excinfo:
        parse_target({"device": device})
    assert bad_request(excinfo)


@pytest.mark.parametrize("protocol", ["", "p" * 33, "Env-Sensor", "env sensor", "env:sensor", "ü"])
def test_parse_target_refuses_an_invalid_protocol_name(protocol: str) -> None:
    with pytest.raises(ClientError, match="not a valid protocol name") as excinfo:
        parse_target({"protocol": protocol})
    assert bad_request(excinfo)


# ---- Target ------------------------------------------------------------------------------------


def test_device_target_matches_its_device_only() -> None:
    t = Target(TargetKind.DEVICE, "a")
    assert t.matches("a", "env-sensor")
    assert t.matches("a", "relay-4")
    assert not t.matches("b", "env-sensor")
    assert not t.matches("env-sensor", "a")  # the value names a device, never a protocol


def test_protocol_target_matches_its_protocol_only() -> None:
    t = Target(TargetKind.PROTOCOL, "relay-4")
    assert t.matches("a", "relay-4")
    assert t.matches("b", "relay-4")
    assert not t.matches("a", "env-sensor")
    assert not t.matches("relay-4", "env-sensor")  # a device named like the protocol


@given(device=st.text(max_size=10), protocol=st.text(max_size=10))
def test_all_target_matches_everything(device: str, protocol: str) -> None:
    assert ALL.matches(device, protocol)


def test_echo_shapes() -> None:
    assert ALL.echo() == {"all": True}
    assert Target(TargetKind.DEVICE, "sim-1").echo() == {"device": "sim-1"}
    assert Target(TargetKind.PROTOCOL, "relay-4").echo() == {"protocol": "relay-4"}


def test_targets_are_values() -> None:
    """Equal targets hash alike: a dashboard's subscription set holds each target once."""
    assert {Target(TargetKind.DEVICE, "a"), Target(TargetKind.DEVICE, "a")} == {
        Target(TargetKind.DEVICE, "a")
    }
    assert Target(TargetKind.DEVICE, "a") != Target(TargetKind.PROTOCOL, "a")


@given(target=st.builds(Target, st.just(TargetKind.DEVICE), valid_ids))
def test_parse_target_of_a_device_echo_is_the_target(target: Target) -> None:
    assert parse_target(target.echo()) == target


@given(target=st.builds(Target, st.just(TargetKind.PROTOCOL), valid_protocols))
def test_parse_target_of_a_protocol_echo_is_the_target(target: Target) -> None:
    assert parse_target(target.echo()) == target


# ---- parse_since -------------------------------------------------------------------------------


@pytest.mark.parametrize("since", [-1, 0, 1, 40510, MAX_OFFSET])
def test_parse_since_accepts_offsets(since: int) -> None:
    assert parse_since({"since": since}) == since


def test_max_offset_is_the_largest_64_bit_integer() -> None:
    assert MAX_OFFSET == 2**63 - 1


@pytest.mark.parametrize("msg", [{}, {"since": None}, {"device": "a"}])
def test_parse_since_absent_or_null_is_none(msg: dict[str, Any]) -> None:
    assert parse_since(msg) is None


@pytest.mark.parametrize(
    "since", [True, False, -2, MAX_OFFSET + 1, -(2**63), 1.0, 0.5, "5", [1], {"o": 1}]
)
def test_parse_since_refuses_what_is_not_an_offset(since: Any) -> None:
    with pytest.raises(ClientError, match="'since' must be an offset") as excinfo:
        parse_since({"since": since})
    assert bad_request(excinfo)


# ---- parse_command -----------------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["c1", "", 0, 7, -3, 2**70, None])
def test_parse_command_keeps_string_and_integer_ids(rid: Any) -> None:
    msg = {"op": "command", "id": rid, "device": "sim-1", "command": {"hex": "02"}}
    assert parse_command(msg) == CommandRequest(rid, {"hex": "02"}, device="sim-1")


def test_parse_command_without_id_has_none() -> None:
    assert parse_command({"protocol": "relay-4", "command": {}}) == CommandRequest(
        None, {}, protocol="relay-4"
    )


@pytest.mark.parametrize("rid", [True, False, 1.5, [1], {"a": 1}])
def test_parse_command_refuses_other_ids(rid: Any) -> None:
    with pytest.raises(ClientError, match="'id' must be a string or number") as excinfo:
        parse_command({"id": rid, "device": "a", "command": {}})
    assert bad_request(excinfo)


@pytest.mark.parametrize("command", [None, [], ["hex", "02"], "02", 2, True])
def test_parse_command_command_must_be_an_object(command: Any) -> None:
    msg: dict[str, Any] = {"device": "a", "command": command}
    with pytest.raises(ClientError, match="'command' must be a JSON object") as excinfo:
        parse_command(msg)
    assert bad_request(excinfo)


def test_parse_command_command_is_required() -> None:
    with pytest.raises(ClientError, match="'command' must be a JSON object") as excinfo:
        parse_command({"device": "a"})
    assert bad_request(excinfo)


@pytest.mark.parametrize(
    "msg",
    [
        {"command": {}},
        {"command": {}, "device": "a", "protocol": "p"},
        {"command": {}, "all": True},  # 'all' is no command target
    ],
)
def test_parse_command_needs_exactly_one_of_device_or_protocol(msg: dict[str, Any]) -> None:
    with pytest.raises(ClientError, match="exactly one of 'device' or 'protocol'") as excinfo:
        parse_command(msg)
    assert bad_request(excinfo)


@pytest.mark.parametrize("key", ["device", "protocol"])
@pytest.mark.parametrize("value", [None, 3, False, ["a"]])
def test_parse_command_target_must_be_a_string(key: str, value: Any) -> None:
    with pytest.raises(ClientError, match=f"'{key}' must be a string") as excinfo:
        parse_command({key: value, "command": {}})
    assert bad_request(excinfo)


def test_parse_command_keeps_the_command_object_as_given() -> None:
    command = {"name": "set", "args": {"channel": 2, "on": True}}
    request = parse_command({"id": "c2", "protocol": "relay-4", "command": command})
    assert request.command is command
    assert request.device is None
    assert request.protocol == "relay-4"


# ---- request_id_of -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        ({"id": "c1"}, "c1"),
        ({"id": 5}, 5),
        ({"id": 0}, 0),
        ({"id": ""}, ""),
        ({}, None),
        ({"id": None}, None),
        ({"id": True}, None),
        ({"id": 1.5}, None),
        ({"id": [1]}, None),
        ({"id": {"x": 1}}, None),
        (["id", 1], None),
        ("id", None),
        (None, None),
        (7, None),
    ],
)
def test_request_id_of(msg: Any, expected: str | int | None) -> None:
    rid = request_id_of(msg)
    assert rid == expected
    assert type(rid) is type(expected)  # 0 stays 0, never False or None


# ---- replies and events ------------------------------------------------------------------------


def test_error_message_shape() -> None:
    msg = error_message(5, ErrorCode.BAD_REQUEST, "unknown op 'bogus'")
    assert msg == {"op": "error", "id": 5, "code": "bad_request", "message": "unknown op 'bogus'"}
    assert list(msg) == ["op", "id", "code", "message"]


def test_error_message_carries_a_null_id() -> None:
    msg = error_message(None, ErrorCode.NOT_FOUND, "no online device speaks 'x'")
    assert "id" in msg
    assert msg["id"] is None
    assert json.loads(dumps(msg))["code"] == "not_found"


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (ErrorCode.BAD_REQUEST, "bad_request"),
        (ErrorCode.FORBIDDEN, "forbidden"),
        (ErrorCode.NOT_FOUND, "not_found"),
        (ErrorCode.RATE_LIMITED, "rate_limited"),
        (ErrorCode.TOO_LARGE, "too_large"),
        (ErrorCode.UNAVAILABLE, "unavailable"),
    ],
)
def test_error_codes_are_the_documented_strings(code: ErrorCode, text: str) -> None:
    assert error_message(1, code, "m")["code"] == text


def test_every_error_code_is_in_the_table_of_api_md() -> None:
    """docs/api.md §3.1 ``error``: one row per code the WebSocket may send."""
    doc = (Path(__file__).parents[3] / "docs" / "api.md").read_text()
    section = doc[doc.index("**`error`**") : doc.index("### 3.2")]
    for code in ErrorCode:
        assert f"| `{code}` |" in section, code


def test_client_error_keeps_code_and_message() -> None:
    e = ClientError(ErrorCode.FORBIDDEN, "commands need an operator token")
    assert e.code is ErrorCode.FORBIDDEN
    assert e.message == "commands need an operator token"
    assert str(e) == "commands need an operator token"


def test_reply_puts_op_then_id_then_body() -> None:
    msg = reply("subscribed", 1, {"device": "sim-1", "since": 3})
    assert msg == {"op": "subscribed", "id": 1, "device": "sim-1", "since": 3}
    assert list(msg) == ["op", "id", "device", "since"]


def test_reply_leaves_id_out_when_the_request_had_none() -> None:
    assert reply("devices", None, {"devices": []}) == {"op": "devices", "devices": []}


@pytest.mark.parametrize("rid", [0, ""])
def test_reply_keeps_a_falsy_id(rid: str | int) -> None:
    msg = reply("unsubscribed", rid, {"all": True})
    assert "id" in msg
    assert msg["id"] == rid


def test_command_status_shape() -> None:
    assert command_status("c1", "sim-1", CommandStatus.ACKED) == {
        "op": "command_status",
        "id": "c1",
        "device": "sim-1",
        "status": "acked",
    }


def test_command_status_extras_and_null_id() -> None:
    msg = command_status(None, "sim-1", CommandStatus.NACKED, code=3)
    assert msg == {
        "op": "command_status",
        "id": None,
        "device": "sim-1",
        "status": "nacked",
        "code": 3,
    }
    rejected = command_status(
        7, "x", CommandStatus.REJECTED, error="device 'x' has never been seen"
    )
    assert rejected["error"] == "device 'x' has never been seen"
    assert rejected["status"] == "rejected"


@pytest.mark.parametrize(
    "status",
    [
        CommandStatus.SENT,
        CommandStatus.QUEUED,
        CommandStatus.ACKED,
        CommandStatus.NACKED,
        CommandStatus.TIMEOUT,
        CommandStatus.EXPIRED,
        CommandStatus.REJECTED,
    ],
)
def test_command_status_on_the_wire_is_a_plain_string(status: CommandStatus) -> None:
    decoded = json.loads(dumps(command_status(1, "d", status)))
    assert decoded["status"] == status.value
    assert type(decoded["status"]) is str


def test_presence_text_shape() -> None:
    text = presence_text("sim-1", "env-sensor", False, 1716200001000, "closed")
    assert json.loads(text) == {
        "op": "presence",
        "device": "sim-1",
        "protocol": "env-sensor",
        "online": False,
        "ts": 1716200001000,
        "reason": "closed",
    }
    assert "\n" not in text
    assert " " not in text


def test_dumps_is_compact_and_keeps_unicode() -> None:
    assert dumps({"a": [1, 2], "b": "é"}) == '{"a":[1,2],"b":"é"}'


def test_telemetry_message_shape() -> None:
    rec = TelemetryRecord(27, "sim-1", "env-sensor", 1716200000123, 4, {"temperature_c": 21.86})
    assert telemetry_message(rec) == {
        "op": "telemetry",
        "device": "sim-1",
        "protocol": "env-sensor",
        "offset": 27,
        "ts": 1716200000123,
        "seq": 4,
        "data": {"temperature_c": 21.86},
    }


# ---- properties --------------------------------------------------------------------------------


@given(
    device=st.text(max_size=64),
    protocol=st.text(max_size=32),
    offset=st.integers(0, MAX_OFFSET),
    ts=st.integers(0, 2**53),
    seq=st.integers(0, 255),
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
)
def test_telemetry_text_equals_the_message_encoded_whole(
    device: str, protocol: str, offset: int, ts: int, seq: int, data: dict[str, Any]
) -> None:
    rec = TelemetryRecord(offset, device, protocol, ts, seq, data)
    text = telemetry_text(rec, dumps(rec.data))
    whole = dumps(telemetry_message(rec))
    assert text == whole
    assert json.loads(text) == json.loads(whole) == telemetry_message(rec)
    assert "\n" not in text


@given(msg=requests)
def test_parse_target_raises_only_client_errors(msg: dict[str, Any]) -> None:
    try:
        target = parse_target(msg)
    except ClientError as e:
        assert e.code is ErrorCode.BAD_REQUEST
        return
    present = [k for k in ("device", "protocol", "all") if k in msg]
    assert present == [str(target.kind)]
    assert target.echo() == {str(target.kind): msg[str(target.kind)]}


@given(msg=requests)
def test_parse_since_raises_only_client_errors(msg: dict[str, Any]) -> None:
    try:
        since = parse_since(msg)
    except ClientError as e:
        assert e.code is ErrorCode.BAD_REQUEST
        return
    if since is None:
        assert msg.get("since") is None
    else:
        assert since == msg["since"]
        assert -1 <= since <= MAX_OFFSET


@given(msg=requests)
def test_parse_command_raises_only_client_errors(msg: dict[str, Any]) -> None:
    try:
        request = parse_command(msg)
    except ClientError as e:
        assert e.code is ErrorCode.BAD_REQUEST
        return
    assert request.command is msg["command"]
    assert isinstance(request.command, dict)
    assert (request.device is None) != (request.protocol is None)
    assert request.device == msg.get("device")
    assert request.protocol == msg.get("protocol")
    assert request.request_id == msg.get("id")


@given(msg=json_values | requests)
def test_request_id_of_any_value_is_a_string_an_int_or_none(msg: Any) -> None:
    rid = request_id_of(msg)
    assert rid is None or (type(rid) in (str, int) and rid == msg["id"])
