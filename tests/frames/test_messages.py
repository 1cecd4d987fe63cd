"""The message layer: round trips, known payloads, and every malformed field named."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frames import (
    Ack,
    Command,
    Data,
    Error,
    ErrorCode,
    Hello,
    LocalProtocolError,
    Message,
    Ping,
    Pong,
    RemoteProtocolError,
    Welcome,
    decode_message,
)
from frames.messages import MAX_BODY, MessageType

SESSION = uuid.UUID("8f14e45f-ceea-467f-a0e6-7c9b1b6d1f3a")

KNOWN = [
    (Hello(1, "dev-1", "env-sensor", "s3"), "0101056465762d310a656e762d73656e736f72027333"),
    (Welcome(1, SESSION, 30), "02018f14e45fceea467fa0e67c9b1b6d1f3a001e"),
    (Ping(7), "0307"),
    (Pong(7), "0407"),
    (Data(9, bytes.fromhex("085911c661")), "1009085911c661"),
    (Command(2, bytes.fromhex("01000a")), "200201000a"),
    (Ack(2, 0), "210200"),
    (Error(0, 3, "bad token"), "7f000362616420746f6b656e"),
]


@pytest.mark.parametrize(("message", "payload"), KNOWN)
def test_known_payloads(message: Message, payload: str) -> None:
    assert message.encode().hex() == payload
    assert decode_message(bytes.fromhex(payload)) == message


seqs = st.integers(0, 255)
client_ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,64}", fullmatch=True)
protocol_names = st.from_regex(r"[a-z0-9._\-]{1,32}", fullmatch=True)
tokens = st.text(max_size=16)
messages = st.one_of(
    st.builds(Hello, seqs, client_ids, protocol_names, tokens),
    st.builds(Welcome, seqs, st.uuids(version=4), st.integers(1, 65535)),
    st.builds(Ping, seqs),
    st.builds(Pong, seqs),
    st.builds(Data, seqs, st.binary(max_size=253)),
    st.builds(Command, seqs, st.binary(max_size=253)),
    st.builds(Ack, seqs, st.integers(0, 255)),
    st.builds(Error, seqs, st.integers(0, 255), st.text(max_size=60)),
)


@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    payload = message.encode()
    assert len(payload) <= 255
    assert decode_message(payload) == message


@given(st.binary(max_size=255))
def test_any_payload_decodes_or_raises_remote_error(payload: bytes) -> None:
    try:
        decode_message(payload)
    except RemoteProtocolError as e:
        assert isinstance(e.code, ErrorCode)
        assert e.field


def hello_body(*fields: bytes) -> bytes:
    out = bytearray(b"\x01\x05")
    for f in fields:
        out += bytes([len(f)]) + f
    return bytes(out)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (hello_body(b"", b"env-sensor", b""), "client_id"),
        (hello_body(b"a" * 65, b"env-sensor", b""), "client_id"),
        (hello_body(b"dev 1", b"env-sensor", b""), "client_id"),
        (hello_body("dév".encode(), b"env-sensor", b""), "client_id"),
        (hello_body(b"dev", b"", b""), "protocol"),
        (hello_body(b"dev", b"Env-Sensor", b""), "protocol"),
        (hello_body(b"dev", b"p" * 33, b""), "protocol"),
        (hello_body(b"dev", b"env", b"t" * 65), "token"),
        (hello_body(b"dev", b"env", b"\xff\xfe"), "token"),
        (hello_body(b"dev", b"env", b"") + b"\x00", "token"),
        (b"\x01\x05", "client_id"),
        (b"\x01\x05\x03de", "client_id"),
        (hello_body(b"dev"), "protocol"),
        (hello_body(b"dev", b"env"), "token"),
        (hello_body(b"dev", b"env")[:-1], "protocol"),
    ],
)
def test_every_invalid_hello_field_is_named(payload: bytes, field: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(payload)
    assert info.value.code is ErrorCode.BAD_HELLO
    assert info.value.field == field


@pytest.mark.parametrize(
    ("payload", "code", "field"),
    [
        (b"", ErrorCode.MALFORMED, "type"),
        (b"\x03", ErrorCode.MALFORMED, "seq"),
        (b"\x55\x00", ErrorCode.UNKNOWN_TYPE, "type"),
        (b"\x03\x00\x00", ErrorCode.MALFORMED, "body"),
        (b"\x04\x00\x00", ErrorCode.MALFORMED, "body"),
        (b"\x21\x00", ErrorCode.MALFORMED, "status"),
        (b"\x21\x00\x00\x00", ErrorCode.MALFORMED, "status"),
        (b"\x02\x00" + bytes(17), ErrorCode.MALFORMED, "session_id"),
        (b"\x02\x00" + bytes(18), ErrorCode.MALFORMED, "heartbeat"),
        (b"\x7f\x00", ErrorCode.MALFORMED, "code"),
        (b"\x7f\x00\x01\xff", ErrorCode.MALFORMED, "reason"),
    ],
)
def test_malformed_messages_carry_code_and_field(
    payload: bytes, code: ErrorCode, field: str
) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(payload)
    assert info.value.code is code
    assert info.value.field == field


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello(256, "dev", "env"),
        lambda: Hello(0, "", "env"),
        lambda: Hello(0, "dev", "ENV"),
        lambda: Hello(0, "dev", "env", "x" * 65),
        lambda: Welcome(0, SESSION, 0),
        lambda: Data(0, bytes(254)),
        lambda: Command(-1, b""),
        lambda: Ack(0, 256),
        lambda: Error(0, 1, "x" * 251),
        lambda: Ping(True),
    ],
)
def test_encoding_outside_the_contract_is_a_local_error(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_error_make_cuts_the_reason_on_a_character_boundary() -> None:
    err = Error.make(0, ErrorCode.MALFORMED, "é" * 200)
    assert len(err.reason.encode()) <= 250
    assert decode_message(err.encode()) == err


def test_fatal_codes() -> None:
    assert {c for c in ErrorCode if c.fatal} == {ErrorCode.AUTH_FAILED, ErrorCode.REPLACED}


@given(st.integers(0, 255), st.binary(max_size=MAX_BODY))
def test_data_read_off_the_wire_equals_the_checked_one(seq: int, body: bytes) -> None:
    # decode_message builds DATA without repeating Data's checks (the hot path).
    decoded = decode_message(bytes((MessageType.DATA, seq)) + body)
    assert decoded == Data(seq, body)
    assert type(decoded) is Data
    assert type(decoded.body) is bytes
