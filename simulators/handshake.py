"""The device end of docs/protocol.md §4, written once: HELLO, WELCOME, PING, ERROR.

Simulated devices (``simulators.models``), the benchmarks' load generator
(``benchmarks.loadgen``) and the tests' raw devices all say HELLO, wait for
WELCOME, answer PING with PONG, and tell a fatal ERROR from a complaint. This
is that logic once, sans-IO like the rest of ``frames``: messages in, the
reply the device owes out, no socket and no clock. ``MessageReader`` is the
byte side every one of them also needs: frames from the gateway in any chunks,
decoded to messages. Only ``frames`` is imported, so anything may use it.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable

from frames import (
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameOptions,
    Hello,
    Message,
    Ping,
    Pong,
    RemoteProtocolError,
    Welcome,
    decode_message,
    encode_frame,
)


class Phase(enum.Enum):
    """Where a device's handshake stands on the current link."""

    IDLE = "idle"  # no HELLO sent on this link yet (or the gateway lost the session)
    HELLO_SENT = "hello_sent"  # waiting for WELCOME
    WELCOMED = "welcomed"  # the gateway opened a session
    REFUSED = "refused"  # a fatal ERROR (AUTH_FAILED, REPLACED): do not retry as is


def is_fatal(code: int) -> bool:
    """True for the ERROR codes after which the gateway closes the link (docs/protocol.md §3)."""
    try:
        return ErrorCode(code).fatal
    except ValueError:
        return False


def error_name(code: int) -> str:
    """``AUTH_FAILED`` for 3, ``code 99`` for a code docs/protocol.md §3 does not know."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


def encode(message: Message, options: FrameOptions | None = None) -> bytes:
    """One message as the bytes of its frame."""
    return encode_frame(message.encode(), options)


class DeviceHandshake:
    """The session rules a device follows, as one small sans-IO state machine.

    ``hello()`` gives the HELLO to send; ``receive(message)`` takes each message
    from the gateway and returns the reply the device owes (a PONG, or a HELLO
    again after NOT_REGISTERED on a welcomed session), else None. ``next_seq``
    numbers the messages it builds (a device shares one counter over all it
    sends); without it the handshake counts from 0.
    """

    def __init__(
        self,
        client_id: str,
        protocol: str,
        token: str = "",
        *,
        next_seq: Callable[[], int] | None = None,
    ) -> None:
        self.client_id = client_id
        self.protocol = protocol
        self.token = token
        self.phase = Phase.IDLE
        self.session_id: uuid.UUID | None = None
        self.heartbeat: int | None = None  # seconds, from the latest WELCOME
        self.error: Error | None = None  # the latest ERROR, kept across links
        self._seq = 0
        self._next_seq = next_seq if next_seq is not None else self._count

    @property
    def welcomed(self) -> bool:
        """True once a WELCOME answered our HELLO on this link."""
        return self.phase is Phase.WELCOMED

    @property
    def refused(self) -> bool:
        """True after a fatal ERROR."""
        return self.phase is Phase.REFUSED

    def hello(self) -> Hello:
        """The HELLO to send now (first, or again when a WELCOME is overdue)."""
        message = Hello(self._next_seq(), self.client_id, self.protocol, self.token)
        self.phase = Phase.HELLO_SENT
        return message

    def receive(self, message: Message) -> Message | None:
        """Take one message from the gateway; return the reply owed, or None."""
        if isinstance(message, Ping):
            return Pong(message.seq)  # same seq: docs/protocol.md §3
        if isinstance(message, Welcome):
            # A WELCOME counts only as the answer to our HELLO.
            if self.phase in (Phase.HELLO_SENT, Phase.WELCOMED):
                self.phase = Phase.WELCOMED
                self.session_id = message.session_id
                self.heartbeat = message.heartbeat
            return None
        if isinstance(message, Error):
            self.error = message
            if is_fatal(message.code):
                self.phase = Phase.REFUSED
            elif message.code == ErrorCode.NOT_REGISTERED and self.phase is Phase.WELCOMED:
                # The gateway lost our session (it restarted, or its serial link
                # did): introduce ourselves again rather than talk into the void.
                return self.hello()
        return None

    def reset(self) -> None:
        """The link is gone: the next one starts with a HELLO again."""
        self.phase = Phase.IDLE
        self.session_id = None

    def _count(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) & 0xFF
        return seq


class MessageReader:
    """Messages from the gateway's byte stream, in whatever chunks it arrives.

    A frame that is not a valid message is counted in ``bad_messages`` and
    skipped, or raised (``RemoteProtocolError``) when ``strict``: tests want
    to see a gateway that breaks the contract.
    """

    def __init__(
        self,
        options: FrameOptions | None = None,
        *,
        frame_timeout: float | None = None,
        strict: bool = False,
    ) -> None:
        self.options = options
        self.frame_timeout = frame_timeout
        self.strict = strict
        self.decoder = FrameDecoder(options, frame_timeout=frame_timeout)
        self.bad_messages = 0

    def feed(self, data: bytes, now: float | None = None) -> list[Message]:
        """The messages ``data`` completes, in order."""
        out: list[Message] = []
        for event in self.decoder.feed(data, now):
            if isinstance(event, Frame):
                try:
                    out.append(decode_message(event.payload))
                except RemoteProtocolError:
                    if self.strict:
                        raise
                    self.bad_messages += 1
        return out

    def new_link(self) -> None:
        """Start over on a new link: nothing of the old stream carries over."""
        self.decoder = FrameDecoder(self.options, frame_timeout=self.frame_timeout)
