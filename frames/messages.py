"""The message layer inside a frame's payload (docs/protocol.md §3).

Every payload is ``type (u8) | seq (u8) | body``. Each message type is a frozen
dataclass that encodes itself (``encode() -> bytes``, the frame payload) and is
decoded by ``decode_message(payload)``. Decoding a message a peer sent raises
``RemoteProtocolError`` naming the field and carrying the ERROR code the gateway
answers with; encoding a message that breaks the contract raises
``LocalProtocolError``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError


class MessageType(IntEnum):
    """Message type byte (docs/protocol.md §3)."""

    HELLO = 0x01
    WELCOME = 0x02
    PING = 0x03
    PONG = 0x04
    DATA = 0x10
    COMMAND = 0x20
    ACK = 0x21
    ERROR = 0x7F


MAX_BODY: Final = 253  # 255-byte payload minus type and seq
MAX_CLIENT_ID: Final = 64
MAX_PROTOCOL: Final = 32
MAX_TOKEN: Final = 64
MAX_REASON: Final = 250

CLIENT_ID_RE: Final = re.compile(rb"[A-Za-z0-9._:\-]{1,64}")
PROTOCOL_RE: Final = re.compile(rb"[a-z0-9._\-]{1,32}")


def valid_client_id(value: str) -> bool:
    """True for 1..64 characters of ``A-Za-z0-9._:-`` (docs/protocol.md §3)."""
    return CLIENT_ID_RE.fullmatch(value.encode("utf-8", "replace")) is not None


def valid_protocol_name(value: str) -> bool:
    """True for 1..32 characters of ``a-z0-9._-`` (docs/protocol.md §3)."""
    return PROTOCOL_RE.fullmatch(value.encode("utf-8", "replace")) is not None


# Frozen dataclasses are written with object.__setattr__ (what their __init__ does).
_set = object.__setattr__
_DATA: Final = int(MessageType.DATA)
_MAX_DATA_PAYLOAD: Final = 2 + MAX_BODY


def _check_seq(seq: int) -> None:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 255:
        raise LocalProtocolError(f"seq must be an int in 0..255, not {seq!r}")


def _check_body(body: bytes, what: str) -> None:
    if not isinstance(body, bytes):
        raise LocalProtocolError(f"{what} body must be bytes, not {type(body).__name__}")
    if len(body) > MAX_BODY:
        raise LocalProtocolError(f"{what} body is {len(body)} bytes; at most {MAX_BODY} fit")


@dataclass(frozen=True, slots=True)
class Hello:
    """Device -> gateway: who the device is, which protocol it speaks, its token."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    seq: int
    client_id: str
    protocol: str
    token: str = ""

    def __post_init__(self) -> None:
        _check_seq(self.seq)
        if not valid_client_id(self.client_id):
            raise LocalProtocolError(
                f"client_id {self.client_id!r} must be 1..64 characters of A-Za-z0-9._:-"
            )
        if not valid_protocol_name(self.protocol):
            raise LocalProtocolError(
                f"protocol {self.protocol!r} must be 1..32 characters of a-z0-9._-"
            )
        if len(self.token.encode()) > MAX_TOKEN:
            raise LocalProtocolError(f"token is longer than {MAX_TOKEN} bytes")

    def encode(self) -> bytes:
        """The frame payload."""
        out = bytearray((self.TYPE, self.seq))
        for text in (self.client_id, self.protocol, self.token):
            raw = text.encode()
            out.append(len(raw))
            out += raw
        return bytes(out)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Gateway -> device: the new session's id and the heartbeat interval."""

    TYPE: ClassVar[MessageType] = MessageType.WELCOME
    seq: int
    session_id: uuid.UUID
    heartbeat: int

    def __post_init__(self) -> None:
        _check_seq(self.seq)
        if not isinstance(self.session_id, uuid.UUID):
            raise LocalProtocolError("session_id must be a uuid.UUID")
        if not 1 <= self.heartbeat <= 0xFFFF:
            raise LocalProtocolError(f"heartbeat must be 1..65535 s, not {self.heartbeat}")

    def encode(self) -> bytes:
        """The frame payload."""
        return bytes((self.TYPE, self.seq)) + self.session_id.bytes + self.heartbeat.to_bytes(2)


@dataclass(frozen=True, slots=True)
class Ping:
    """Either side: are you there? Answered by a Pong with the same seq."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    seq: int

    def __post_init__(self) -> None:
        _check_seq(self.seq)

    def encode(self) -> bytes:
        """The frame payload."""
        return bytes((self.TYPE, self.seq))


@dataclass(frozen=True, slots=True)
class Pong:
    """Either side: the answer to a Ping; seq echoes the Ping's."""

    TYPE: ClassVar[MessageType] = MessageType.PONG
    seq: int

    def __post_init__(self) -> None:
        _check_seq(self.seq)

    def encode(self) -> bytes:
        """The frame payload."""
        return bytes((self.TYPE, self.seq))


@dataclass(frozen=True, slots=True)
class Data:
    """Device -> gateway: telemetry, laid out as the device's protocol defines."""

    TYPE: ClassVar[MessageType] = MessageType.DATA
    seq: int
    body: bytes

    def __post_init__(self) -> None:
        _check_seq(self.seq)
        _check_body(self.body, "DATA")

    @classmethod
    def _from_wire(cls, seq: int, body: bytes) -> Data:
        """A DATA read off the wire, which needs no checks: ``seq`` is one byte and
        the caller has checked that ``body`` fits. (The checks were a third of
        ``decode_message``'s time, once per telemetry message.)"""
        message = object.__new__(cls)
        _set(message, "seq", seq)
        _set(message, "body", body)
        return message

    def encode(self) -> bytes:
        """The frame payload."""
        return bytes((self.TYPE, self.seq)) + self.body


@dataclass(frozen=True, slots=True)
class Command:
    """Gateway -> device: a command, laid out as the device's protocol defines."""

    TYPE: ClassVar[MessageType] = MessageType.COMMAND
    seq: int
    body: bytes

    def __post_init__(self) -> None:
        _check_seq(self.seq)
        _check_body(self.body, "COMMAND")

    def encode(self) -> bytes:
        """The frame payload."""
        return bytes((self.TYPE, self.seq)) + self.body


@dataclass(frozen=True, slots=True)
class Ack:
    """Device -> gateway: the outcome of a Command (status 0 = ok); seq echoes it."""

    TYPE: ClassVar[MessageType] = MessageType.ACK
    seq: int
    status: int = 0

    def __post_init__(self) -> None:
        _check_seq(self.seq)
        if isinstance(self.status, bool) or not 0 <= self.status <= 255:
            raise LocalProtocolError(f"ACK status must be 0..255, not {self.status!r}")

    def encode(self) -> bytes:
        """The frame payload."""
        return bytes((self.TYPE, self.seq, self.status))


@dataclass(frozen=True, slots=True)
class Error:
    """Gateway -> device: what was wrong (``code``, an ErrorCode) and why."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    seq: int
    code: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_seq(self.seq)
        if isinstance(self.code, bool) or not 0 <= self.code <= 255:
            raise LocalProtocolError(f"ERROR code must be 0..255, not {self.code!r}")
        if len(self.reason.encode()) > MAX_REASON:
            raise LocalProtocolError(f"ERROR reason is longer than {MAX_REASON} bytes")

    @classmethod
    def make(cls, seq: int, code: ErrorCode, reason: str) -> Error:
        """An Error whose reason is cut, on a character boundary, to what fits."""
        raw = reason.encode()[:MAX_REASON]
        return cls(seq, int(code), raw.decode("utf-8", "ignore"))

    def encode(self) -> bytes:
        """The frame payload."""
        return bytes((self.TYPE, self.seq, self.code)) + self.reason.encode()


Message = Hello | Welcome | Ping | Pong | Data | Command | Ack | Error


def _malformed(what: str, field: str, code: ErrorCode = ErrorCode.MALFORMED) -> RemoteProtocolError:
    return RemoteProtocolError(what, code=code, field=field)


def _decode_hello(seq: int, body: bytes) -> Hello:
    pos = 0
    fields: list[bytes] = []
    for name in ("client_id", "protocol", "token"):
        if pos >= len(body):
            raise _malformed(f"HELLO ends before its {name}", name, ErrorCode.BAD_HELLO)
        size = body[pos]
        value = body[pos + 1 : pos + 1 + size]
        if len(value) != size:
            raise _malformed(
                f"HELLO {name} says {size} bytes but {len(value)} follow", name, ErrorCode.BAD_HELLO
            )
        fields.append(value)
        pos += 1 + size
    if pos != len(body):
        raise _malformed(
            f"HELLO has {len(body) - pos} bytes after the token", "token", ErrorCode.BAD_HELLO
        )
    raw_id, raw_protocol, raw_token = fields
    if not CLIENT_ID_RE.fullmatch(raw_id):
        raise _malformed(
            "HELLO client_id must be 1..64 bytes of A-Za-z0-9._:-", "client_id", ErrorCode.BAD_HELLO
        )
    if not PROTOCOL_RE.fullmatch(raw_protocol):
        raise _malformed(
            "HELLO protocol must be 1..32 bytes of a-z0-9._-", "protocol", ErrorCode.BAD_HELLO
        )
    if len(raw_token) > MAX_TOKEN:
        raise _malformed(f"HELLO token exceeds {MAX_TOKEN} bytes", "token", ErrorCode.BAD_HELLO)
    try:
        token = raw_token.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("HELLO token is not UTF-8", "token", ErrorCode.BAD_HELLO) from None
    return Hello(seq, raw_id.decode("ascii"), raw_protocol.decode("ascii"), token)


def _decode_welcome(seq: int, body: bytes) -> Welcome:
    if len(body) != 18:
        raise _malformed(f"WELCOME body must be 18 bytes, not {len(body)}", "session_id")
    heartbeat = int.from_bytes(body[16:18])
    if heartbeat == 0:
        raise _malformed("WELCOME heartbeat interval is 0", "heartbeat")
    return Welcome(seq, uuid.UUID(bytes=body[:16]), heartbeat)


def _decode_empty(cls: type[Ping] | type[Pong], seq: int, body: bytes) -> Ping | Pong:
    if body:
        raise _malformed(f"{cls.TYPE.name} must have an empty body, not {len(body)} bytes", "body")
    return cls(seq)


def _decode_ack(seq: int, body: bytes) -> Ack:
    if len(body) != 1:
        raise _malformed(f"ACK body must be 1 byte (status), not {len(body)}", "status")
    return Ack(seq, body[0])


def _decode_error(seq: int, body: bytes) -> Error:
    if not body:
        raise _malformed("ERROR has no code", "code")
    try:
        reason = body[1:].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("ERROR reason is not UTF-8", "reason") from None
    if len(body) - 1 > MAX_REASON:
        raise _malformed(f"ERROR reason exceeds {MAX_REASON} bytes", "reason")
    return Error(seq, body[0], reason)


def decode_message(payload: bytes) -> Message:
    """Decode one frame payload into its message.

    Raises ``RemoteProtocolError`` (with ``code`` and ``field``) for anything the
    contract forbids: a payload shorter than type + seq, an unknown type, or a
    body that does not fit its type.
    """
    if len(payload) < 2:
        raise _malformed(
            f"payload is {len(payload)} bytes; a message needs type and seq",
            "type" if not payload else "seq",
        )
    if payload[0] == _DATA and len(payload) <= _MAX_DATA_PAYLOAD:
        # Telemetry, by far the most common: no enum lookup, no checks to repeat.
        return Data._from_wire(payload[1], bytes(payload[2:]))
    try:
        kind = MessageType(payload[0])
    except ValueError:
        raise RemoteProtocolError(
            f"unknown message type 0x{payload[0]:02x}", code=ErrorCode.UNKNOWN_TYPE, field="type"
        ) from None
    seq = payload[1]
    body = bytes(payload[2:])
    match kind:
        case MessageType.HELLO:
            return _decode_hello(seq, body)
        case MessageType.WELCOME:
            return _decode_welcome(seq, body)
        case MessageType.PING:
            return _decode_empty(Ping, seq, body)
        case MessageType.PONG:
            return _decode_empty(Pong, seq, body)
        case MessageType.DATA:
            return Data(seq, body)
        case MessageType.COMMAND:
            return Command(seq, body)
        case MessageType.ACK:
            return _decode_ack(seq, body)
        case MessageType.ERROR:
            return _decode_error(seq, body)
    raise AssertionError(kind)  # pragma: no cover - every MessageType is matched above
