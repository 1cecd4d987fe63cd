"""The shared device end of the handshake: HELLO, WELCOME, PING, ERROR, bytes to messages."""

from __future__ import annotations

import uuid

import pytest

from frames import (
    Data,
    Error,
    ErrorCode,
    Hello,
    Ping,
    Pong,
    RemoteProtocolError,
    Welcome,
    encode_frame,
)
from simulators.handshake import (
    DeviceHandshake,
    MessageReader,
    Phase,
    encode,
    error_name,
    is_fatal,
)

SESSION = uuid.UUID(int=7, version=4)


def phase(h: DeviceHandshake) -> Phase:
    """Read the phase afresh (mypy would keep the one it saw before a call)."""
    return h.phase


def test_hello_then_welcome_opens_the_session() -> None:
    h = DeviceHandshake("dev-1", "env-sensor", "tok")
    assert phase(h) is Phase.IDLE
    assert h.hello() == Hello(0, "dev-1", "env-sensor", "tok")
    assert phase(h) is Phase.HELLO_SENT
    assert h.receive(Welcome(0, SESSION, 12)) is None
    assert h.welcomed
    assert (h.session_id, h.heartbeat) == (SESSION, 12)
    assert h.hello().seq == 1  # its own seq counter, when given none


def test_a_welcome_without_our_hello_does_not_count() -> None:
    h = DeviceHandshake("dev-1", "env-sensor")
    h.receive(Welcome(0, SESSION, 12))
    assert phase(h) is Phase.IDLE
    assert h.session_id is None


def test_ping_is_owed_a_pong_of_the_same_seq_in_any_phase() -> None:
    h = DeviceHandshake("dev-1", "env-sensor")
    assert h.receive(Ping(9)) == Pong(9)
    h.hello()
    h.receive(Welcome(0, SESSION, 30))
    assert h.receive(Ping(200)) == Pong(200)
    assert h.receive(Pong(1)) is None
    assert h.receive(Data(1, b"")) is None


def test_fatal_errors_refuse_and_complaints_do_not() -> None:
    h = DeviceHandshake("dev-1", "env-sensor")
    h.hello()
    assert h.receive(Error(0, ErrorCode.RATE_LIMITED, "slow down")) is None
    assert phase(h) is Phase.HELLO_SENT
    assert h.receive(Error(0, ErrorCode.AUTH_FAILED, "wrong token")) is None
    assert h.refused
    assert h.error == Error(0, ErrorCode.AUTH_FAILED, "wrong token")
    h.reset()
    assert phase(h) is Phase.IDLE
    assert h.error is not None  # the latest ERROR outlives the link
    assert [c for c in ErrorCode if is_fatal(c)] == [ErrorCode.AUTH_FAILED, ErrorCode.REPLACED]
    assert not is_fatal(200)


def test_not_registered_on_a_welcomed_session_is_answered_with_hello() -> None:
    seqs = iter(range(40, 50))
    h = DeviceHandshake("dev-1", "env-sensor", next_seq=lambda: next(seqs))
    # Before any WELCOME it is only a complaint.
    assert h.receive(Error(0, ErrorCode.NOT_REGISTERED, "send HELLO first")) is None
    h.hello()
    h.receive(Welcome(40, SESSION, 30))
    again = h.receive(Error(0, ErrorCode.NOT_REGISTERED, "who are you?"))
    assert again == Hello(41, "dev-1", "env-sensor", "")
    assert phase(h) is Phase.HELLO_SENT


def test_reader_turns_any_chunks_into_messages() -> None:
    r = MessageReader()
    stream = encode(Welcome(1, SESSION, 30)) + encode(Ping(2)) + encode_frame(b"\x55\x00")
    got = [m for i in range(len(stream)) for m in r.feed(stream[i : i + 1])]
    assert got == [Welcome(1, SESSION, 30), Ping(2)]
    assert r.bad_messages == 1
    r.feed(b"\xaa\xaa\x05")  # a partial frame ...
    r.new_link()  # ... is forgotten with its link
    assert r.decoder.buffered == 0
    with pytest.raises(RemoteProtocolError):
        MessageReader(strict=True).feed(encode_frame(b"\x55\x00"))


def test_error_names() -> None:
    assert error_name(3) == "AUTH_FAILED"
    assert error_name(99) == "code 99"
