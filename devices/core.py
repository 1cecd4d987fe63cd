"""The device session of docs/protocol.md §4 as a sans-IO state machine.

Like h11's ``Connection``: bytes go in (``receive_data(data, now)``), events
come out (``DeviceOnline``, ``DeviceTelemetry``, ``DeviceOffline``,
``CommandDone``, ``CloseLink``), the bytes to write are taken with
``data_to_send()``, and ``deadline`` says when to call ``expire(now)`` if
nothing else happens. It owns no socket, timer, clock or uuid source: ``now``
(monotonic seconds) is passed in, the wall clock and session ids come from
callables given at construction. So every rule is tested on a fake clock, and
the asyncio adapter (``devices.session``) only moves bytes and events.

States: ``awaiting_hello`` -> ``online`` -> ``closed``. What differs between
TCP and serial (HELLO deadline and budget, garbage rule, silence, fixed
identity, backpressure or drops over the rate) comes from the ``LinkPolicy``;
nothing here asks which transport it is on.

Backpressure (TCP): bytes go to the frame decoder only as fast as the rate
limit allows. What is over it waits in an inbox of at most one read chunk,
``throttled`` tells the adapter to stop reading the socket, and ``deadline``
includes the moment there are tokens again, when ``expire`` feeds the inbox.
So a burst arrives late but whole, and a flood costs one chunk of memory and
no decoding beyond the rate.
"""

from __future__ import annotations

import enum
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from frames import (
    Ack,
    Command,
    ConstructProtocol,
    Data,
    DecoderEvent,
    Discarded,
    DiscardReason,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Message,
    MessageType,
    Ping,
    Pong,
    RemoteProtocolError,
    Welcome,
    decode_message,
    encode_frame,
    get_protocol,
    max_frame_size,
)
from frames.fixed import static_size

from .commands import TIMED_OUT, CommandTracker
from .config import SessionConfig
from .counters import DeviceCounters, LinkCounters
from .events import (
    CloseReason,
    CommandResult,
    CommandStatus,
    DeviceInfo,
    DeviceNotOnline,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
)
from .logs import LogLimiter
from .policy import LinkPolicy
from .throttle import FrameRate

log = logging.getLogger(__name__)

# The first payload byte of an ACK: over serial an ACK is never dropped by the rate.
_ACK = MessageType.ACK.value

# The ``error`` of a command that can get no ACK any more (docs/api.md §3: timeout).
LINK_LOST = "link lost"
WENT_SILENT = "device went silent"
NEW_HELLO = "the link said HELLO as another client_id"


class SessionState(enum.StrEnum):
    """Where a session is in docs/protocol.md §4's life cycle."""

    AWAITING_HELLO = "awaiting_hello"
    ONLINE = "online"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class CommandDone:
    """The command sent with ``seq`` has its final ``result``; its slot is free."""

    seq: int
    result: CommandResult


@dataclass(frozen=True, slots=True)
class CloseLink:
    """The session is closed: close the link (after writing ``data_to_send()``)."""

    reason: CloseReason


SessionEvent = DeviceOnline | DeviceTelemetry | DeviceOffline | CommandDone | CloseLink

# Asked before a session goes online: None admits it, a string is the refusal.
Admit = Callable[[DeviceInfo], str | None]


def admit_all(info: DeviceInfo) -> str | None:
    """An ``Admit`` with no limits (a session on its own, as in tests)."""
    return None


def bad_data_reason(protocol: str, body: bytes, error: RemoteProtocolError) -> str:
    """What is wrong with a DATA body, in the protocol's terms (docs/protocols.md).

    The codec's own message speaks construct ("stream read less than specified
    amount, expected 2, found 1"); a device's author needs "env-sensor DATA is
    5 bytes, got 4", or the field and what is wrong with it.
    """
    impl = get_protocol(protocol)
    size = None
    if isinstance(impl, ConstructProtocol):
        # ``data`` is Struct("values" / schema, Terminated): the schema is its first field.
        size = static_size(impl.data.subcons[0])
    if size is not None and len(body) != size:
        unit = "byte" if size == 1 else "bytes"
        return f"{protocol} DATA is {size} {unit}, got {len(body)}"
    text = str(error)
    field = (error.field or "").removeprefix("data").lstrip(".")
    if "stream read less than" in text:
        return f"{protocol} DATA ends before its field {field or '(first)'} ({len(body)} bytes)"
    if "expected end of stream" in text:
        return f"{protocol} DATA has bytes after its last field ({len(body)} bytes)"
    # A value the schema refuses: the field, and the codec's words after "(N bytes): ".
    why = text.split("): ", 1)[-1]
    return f"{protocol} DATA field {field}: {why}" if field else f"{protocol} DATA: {why}"


def _not_online(body: bytes) -> dict[str, Any]:
    raise AssertionError("DATA decoded before the session went online")  # pragma: no cover


class SessionCore:
    """The session of one link, sans-IO. Feed it bytes and time; act on its events.

    ``now`` is a monotonic clock in seconds (the event loop's in production)
    and must not go backwards. ``wall_ms`` gives unix milliseconds (telemetry
    ``ts``, ``connected_at``); ``new_session_id`` a fresh UUIDv4 per session.
    ``admit`` is the registry's say on takeover and ``max_devices``.
    ``counters`` are this link's; ``totals`` the gateway-wide ones it adds to.
    ``logs`` bounds the log lines a peer can cause (shared gateway-wide).
    """

    def __init__(
        self,
        config: SessionConfig,
        policy: LinkPolicy,
        *,
        now: float,
        peer: str,
        wall_ms: Callable[[], int],
        new_session_id: Callable[[], uuid.UUID],
        admit: Admit = admit_all,
        counters: LinkCounters | None = None,
        totals: DeviceCounters | None = None,
        logs: LogLimiter | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.peer = peer
        self.counters = counters if counters is not None else LinkCounters()
        self.totals = totals if totals is not None else DeviceCounters()
        self.logs = logs or LogLimiter(log, config.max_log_lines, config.log_window)
        self.commands = CommandTracker(config.max_inflight_commands, config.ack_timeout)
        self.state = SessionState.AWAITING_HELLO
        self.info: DeviceInfo | None = None  # the latest session's, kept after it ends
        self.session_id: uuid.UUID | None = None
        self.decoder = FrameDecoder(policy.frame, frame_timeout=policy.frame_timeout)
        self._wall_ms = wall_ms
        self._new_session_id = new_session_id
        self._admit = admit
        self._out = bytearray()
        self._out_seq = 0
        self._hello_at = now + config.hello_timeout if policy.hello_deadline else None
        self._last_seen = now
        self._silence_limit = config.silence_limit
        # This session's heartbeat (per device, port or protocol), set when it goes online.
        self.heartbeat = config.heartbeat
        # The online session's identity, flat for the per-frame path.
        self._client_id = ""
        self._protocol = ""
        self._decode_data: Callable[[bytes], dict[str, Any]] = _not_online
        # Rate limit: a token bucket; over serial at most one RATE_LIMITED a second.
        self._rate = FrameRate(config.max_frames_per_second, config.rate_burst, now)
        self._rate_error_at: float | None = None
        # Backpressure (TCP): bytes over the rate wait here, unread by the decoder.
        self._backpressure = policy.backpressure
        self._inbox = bytearray()
        self.throttled = False  # True: the adapter should not read the link for now
        # A slice of the inbox is never shorter than a whole frame: a partial frame
        # the decoder holds is always completed (or rejected) by the next slice.
        self._min_frame = len(encode_frame(b"", policy.frame))
        self._max_frame = max_frame_size(policy.frame)
        # The pre-HELLO budget (TCP): bytes and frames left; None once online or unbudgeted.
        self._budget_bytes: int | None = config.hello_budget_bytes if policy.hello_budget else None
        self._budget_frames = config.hello_budget_frames
        # client_id changes on this link: a tumbling window.
        self._changes_since = now
        self._changes = 0
        # Garbage rule: a tumbling window of discarded bytes and CRC errors.
        self._garbage_since = now
        self._garbage_bytes = 0
        self._garbage_crc = 0

    # ---- what the adapter calls -------------------------------------------------------------

    @property
    def last_seen(self) -> float:
        """When the last valid frame arrived (or the link opened)."""
        return self._last_seen

    @property
    def deadline(self) -> float | None:
        """The earliest time at which ``expire`` has something to do, or None.

        Frames only ever move the silence deadline later, so an adapter may keep
        a timer armed for an earlier deadline and re-arm when it fires: no timer
        churn per frame.
        """
        state = self.state
        if state is SessionState.ONLINE:
            best: float | None = self._last_seen + self._silence_limit
        elif state is SessionState.CLOSED:
            return None
        else:
            best = self._hello_at
        at = self.commands.deadline
        if at is not None and (best is None or at < best):
            best = at
        # While bytes wait in the inbox the decoder's partial frame is not late: its
        # rest is here. The next thing to do is feeding them, once there are tokens.
        at = self._rate.ready_at() if self._inbox else self.decoder.deadline
        if at is not None and (best is None or at < best):
            best = at
        return best

    def receive_data(self, data: bytes, now: float) -> list[SessionEvent]:
        """Bytes from the link, in any chunks; the events they complete, in order.

        With backpressure, bytes over the rate are kept (``throttled`` is then
        True) and fed at ``deadline`` by ``expire``.
        """
        events: list[SessionEvent] = []
        if self.state is SessionState.CLOSED:
            return events
        self.counters.bytes_in += len(data)
        if self._inbox or self._budget_bytes is not None or len(data) > self._allowance(now):
            if not self._inbox:
                # As feed(data, now) would: a partial frame already late is abandoned first.
                self._feed(self.decoder.expire(now), now, events)
            self._inbox += data
            self._pump(now, events)
        else:
            self._feed(self.decoder.feed(data, now), now, events)
        return events

    def expire(self, now: float) -> list[SessionEvent]:
        """Let time pass: held bytes, frame timeout, HELLO deadline, silence, ACK timeouts."""
        events: list[SessionEvent] = []
        if self.state is SessionState.CLOSED:
            return events
        if self._inbox:
            self._pump(now, events)
        else:
            self._feed(self.decoder.expire(now), now, events)
        if self._hello_at is not None and now >= self._hello_at:
            self._close(
                CloseReason.HELLO_TIMEOUT,
                ErrorCode.NOT_REGISTERED,
                f"no valid HELLO within {self.config.hello_timeout:g} s",
                events,
            )
        if self.state is SessionState.ONLINE and now >= self._last_seen + self._silence_limit:
            self.logs.info(
                "sessions", "device %s silent for %g s", self._client_id, self._silence_limit
            )
            if self.policy.silence_closes:
                self._close(CloseReason.SILENT, None, "", events)
            else:
                # The link stays open: the device may speak again.
                self._end_session(CloseReason.SILENT, WENT_SILENT, events)
        for seq in self.commands.expire(now):
            events.append(CommandDone(seq, TIMED_OUT))
        return events

    def close(
        self, reason: CloseReason, error: ErrorCode | None = None, message: str = ""
    ) -> list[SessionEvent]:
        """End the session for ``reason`` (sending ERROR ``error`` first, when given).

        Call it too when the link went away by itself (``CLOSED``, ``LOST``):
        then there is nothing to send, and ``CloseLink`` closes what is closed.
        """
        events: list[SessionEvent] = []
        self._close(reason, error, message, events)
        return events

    def send_command(self, body: bytes, now: float) -> int:
        """Write a COMMAND and start its ACK timeout; return its seq.

        Raises ``DeviceNotOnline`` unless online, and ``LocalProtocolError``
        when ``max_inflight_commands`` await their ACK (see ``commands.has_room``)
        or the body does not fit a message.
        """
        if self.state is not SessionState.ONLINE:
            raise DeviceNotOnline(self._client_id or self.peer)
        seq = self.commands.start(now)
        try:
            message = Command(seq, body)
        except BaseException:
            self.commands.cancel(seq)
            raise
        self._send(message)
        return seq

    def data_to_send(self) -> bytes:
        """The bytes to write to the link since the last call (b"" for none)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # ---- bytes in -----------------------------------------------------------------------------

    def _allowance(self, now: float) -> float:
        """Bytes the decoder may take now: inf without backpressure, else by the tokens."""
        tokens = self._rate.refill(now)
        if not self._backpressure:
            return math.inf
        if tokens < 1.0:
            return 0
        n = int(tokens) * self._min_frame
        return n if n > self._max_frame else self._max_frame

    def _pump(self, now: float, events: list[SessionEvent]) -> None:
        """Feed the inbox to the decoder as far as the rate and the HELLO budget allow."""
        inbox = self._inbox
        while inbox and self.state is not SessionState.CLOSED:
            n = self._allowance(now)
            budget = self._budget_bytes
            if budget is not None:
                if budget <= 0:
                    self._over_budget(events)
                    break
                if budget < n:
                    n = budget
                self._budget_bytes = budget - int(min(n, len(inbox)))
            if n <= 0:
                break  # over the rate: wait for tokens
            if n >= len(inbox):
                chunk = bytes(inbox)
                inbox.clear()
                at: float | None = now
            else:
                cut = int(n)
                chunk = bytes(inbox[:cut])
                del inbox[:cut]
                # Not the end of what arrived: a partial frame now held is completed by
                # the next slice, so it must not start a frame timeout.
                at = None
            self._feed(self.decoder.feed(chunk, at), now, events)
        if self.state is SessionState.CLOSED:
            inbox.clear()
        throttled = bool(inbox)
        if throttled and not self.throttled:
            self.counters.throttled += 1
        self.throttled = throttled

    def _over_budget(self, events: list[SessionEvent]) -> None:
        config = self.config
        self.logs.warning(
            "hello_budget",
            "closing %s link %s: over the pre-HELLO budget (%d bytes, %d frames)",
            self.policy.transport,
            self.peer,
            config.hello_budget_bytes,
            config.hello_budget_frames,
        )
        self._close(
            CloseReason.HELLO_BUDGET,
            ErrorCode.NOT_REGISTERED,
            f"over {config.hello_budget_bytes} bytes or {config.hello_budget_frames} frames "
            "before HELLO",
            events,
        )

    def _feed(self, items: list[DecoderEvent], now: float, events: list[SessionEvent]) -> None:
        counters = self.counters
        rate = self._rate
        drop = not self._backpressure
        for item in items:
            if self.state is SessionState.CLOSED:
                return
            if isinstance(item, Frame):
                counters.frames_in += 1
                payload = item.payload
                if self._budget_bytes is not None:
                    self._budget_frames -= 1
                    if self._budget_frames < 0:
                        self._over_budget(events)
                        return
                if rate.tokens >= 1.0:
                    rate.tokens -= 1.0
                elif not drop:
                    # In debt: the inbox holds what follows until the debt is paid.
                    rate.tokens -= 1.0
                elif not payload or payload[0] != _ACK:
                    self._rate_limited(now)  # serial: dropped, but never an ACK
                    continue
                self._on_payload(payload, now, events)
            else:
                self._on_discard(item, now, events)

    def _on_payload(self, payload: bytes, now: float, events: list[SessionEvent]) -> None:
        try:
            message = decode_message(payload)
        except RemoteProtocolError as e:
            self._send_error(e.code, str(e))
            return
        self._last_seen = now  # any valid frame is a sign of life
        if self.state is SessionState.ONLINE:
            if isinstance(message, Data):
                self._on_data(message, now, events)
            else:
                self._on_message(message, now, events)
        else:
            self._before_hello(message, now, events)

    def _before_hello(self, message: Message, now: float, events: list[SessionEvent]) -> None:
        fixed = self.policy.fixed_identity
        if isinstance(message, Hello):
            self._on_hello(message, now, events)
        elif fixed is not None:
            # A link with a fixed identity is online from its first valid frame.
            if self._go_online(fixed[0], fixed[1], None, events):
                self._on_message(message, now, events)
        elif isinstance(message, Ping):
            self._send(Pong(message.seq))
        else:
            self._send_error(ErrorCode.NOT_REGISTERED, "send HELLO first")

    def _on_message(self, message: Message, now: float, events: list[SessionEvent]) -> None:
        if isinstance(message, Data):
            self._on_data(message, now, events)
        elif isinstance(message, Ping):
            self._send(Pong(message.seq))
        elif isinstance(message, Ack):
            result = self.commands.ack(message.seq, message.status)
            if result is None:
                self.totals.stray_acks += 1
            else:
                events.append(CommandDone(message.seq, result))
        elif isinstance(message, Hello):
            self._on_hello(message, now, events)
        elif isinstance(message, Pong):
            pass  # liveness only
        elif isinstance(message, Error):
            self.logs.log(
                "device_errors", logging.DEBUG, "device %s sent ERROR %s", self._client_id, message
            )
        else:
            self._send_error(ErrorCode.UNKNOWN_TYPE, f"a device does not send {message.TYPE.name}")

    def _on_data(self, message: Data, now: float, events: list[SessionEvent]) -> None:
        try:
            data = self._decode_data(message.body)
        except RemoteProtocolError as e:
            reason = bad_data_reason(self._protocol, message.body, e)
            # A device sending what its protocol does not allow is worth an operator's look,
            # but a device doing it 100 times a second must not flood the log: limited.
            self.logs.warning(
                "bad_data",
                "device %s sent DATA seq %d that its protocol refuses: %s",
                self._client_id,
                message.seq,
                reason,
            )
            self._send_error(e.code, reason)
            return
        events.append(
            DeviceTelemetry(
                self._client_id, self._protocol, message.seq, data, self._wall_ms(), now
            )
        )

    def _on_discard(self, item: Discarded, now: float, events: list[SessionEvent]) -> None:
        c = self.counters
        if item.reason is DiscardReason.SKIPPED:
            c.skipped_bytes += item.nbytes
        elif item.reason is DiscardReason.CRC:
            c.crc_errors += 1
        else:
            c.frame_timeouts += 1
        if not self.policy.garbage_closes:
            return  # counted, never closed for noise
        config = self.config
        if now - self._garbage_since > config.garbage_window:
            self._garbage_since = now
            self._garbage_bytes = 0
            self._garbage_crc = 0
        self._garbage_bytes += item.nbytes
        if item.reason is DiscardReason.CRC:
            self._garbage_crc += 1
        if (
            self._garbage_bytes >= config.garbage_bytes
            or self._garbage_crc >= config.garbage_crc_errors
        ):
            self.logs.warning(
                "garbage",
                "closing %s link %s: mostly garbage (%d bytes discarded, %d CRC errors in %g s)",
                self.policy.transport,
                self.peer,
                self._garbage_bytes,
                self._garbage_crc,
                config.garbage_window,
            )
            self.totals.garbage_closed += 1
            self._close(CloseReason.GARBAGE, None, "", events)

    def _rate_limited(self, now: float) -> None:
        self.counters.rate_limited += 1
        if self._rate_error_at is None or now - self._rate_error_at >= 1.0:
            self._rate_error_at = now  # one ERROR a second, not one per dropped frame
            self._send_error(
                ErrorCode.RATE_LIMITED,
                f"over {self._rate.rate:g} frames/s: frames dropped",
            )

    # ---- the session --------------------------------------------------------------------------

    def _on_hello(self, hello: Hello, now: float, events: list[SessionEvent]) -> None:
        fixed = self.policy.fixed_identity
        if fixed is not None:
            client_id, protocol = fixed  # trusted as wired: no token asked
        else:
            client_id, protocol = hello.client_id, hello.protocol
            auth = self.config.auth
            certified = self.policy.certified_id
            if certified is not None:
                # The certificate is the credential (docs/tls.md): its CN, and only it.
                if client_id != certified:
                    self.logs.warning(
                        "auth",
                        "device on %s: HELLO as %s, but its certificate's CN is %s",
                        self.peer,
                        client_id,
                        certified,
                    )
                    self.totals.auth_failed += 1
                    self._close(
                        CloseReason.AUTH_FAILED,
                        ErrorCode.AUTH_FAILED,
                        "client_id differs from the certificate's CN",
                        events,
                    )
                    return
            elif auth.expected(client_id) is None:
                if not self.policy.allow_anonymous:
                    self.logs.warning(
                        "auth",
                        "device %s on %s: no device token configured for it, and this "
                        "device port is not loopback (devices.allow_anonymous)",
                        client_id,
                        self.peer,
                    )
                    self.totals.refused_anonymous += 1
                    self._close(
                        CloseReason.AUTH_FAILED,
                        ErrorCode.AUTH_FAILED,
                        "this device port needs a device token",
                        events,
                    )
                    return
            elif not auth.allows(client_id, hello.token):
                self.logs.warning("auth", "device %s on %s: wrong token", client_id, self.peer)
                self.totals.auth_failed += 1
                self._close(
                    CloseReason.AUTH_FAILED, ErrorCode.AUTH_FAILED, "wrong device token", events
                )
                return
        info = self.info
        if info is not None and client_id != info.client_id and not self._may_change_id(now):
            config = self.config
            self.totals.refused_client_id_changes += 1
            self.logs.warning(
                "refused",
                "closing %s link %s: HELLO as %s, its client_id changed %d times within %g s",
                self.policy.transport,
                self.peer,
                client_id,
                self._changes,
                config.churn_window,
            )
            self._close(
                CloseReason.REFUSED,
                ErrorCode.RATE_LIMITED,
                f"client_id changed too often on this link: max_client_id_changes="
                f"{config.max_client_id_changes} per {config.churn_window:g} s",
                events,
            )
            return
        if self.state is SessionState.ONLINE:
            if client_id == self._client_id and self.session_id is not None:
                # A repeated HELLO on a live session: answer it again, same session.
                self._send(Welcome(hello.seq, self.session_id, self.heartbeat))
                return
            self._end_session(CloseReason.REHELLO, NEW_HELLO, events)
        self._go_online(client_id, protocol, hello.seq, events)

    def _may_change_id(self, now: float) -> bool:
        """Count one client_id change on this link; False when over the bound."""
        if now - self._changes_since >= self.config.churn_window:
            self._changes_since = now
            self._changes = 0
        if self._changes >= self.config.max_client_id_changes:
            return False
        self._changes += 1
        return True

    def _go_online(
        self, client_id: str, protocol: str, hello_seq: int | None, events: list[SessionEvent]
    ) -> bool:
        session_id = self._new_session_id()
        info = DeviceInfo(
            client_id=client_id,
            protocol=protocol,
            transport=self.policy.transport,
            peer=self.peer,
            session=str(session_id),
            connected_at=self._wall_ms(),
        )
        refusal = self._admit(info)
        if refusal is not None:
            self._close(CloseReason.REFUSED, ErrorCode.RATE_LIMITED, refusal, events)
            return False
        self.state = SessionState.ONLINE
        self.info = info
        self.session_id = session_id
        self._client_id = client_id
        self._protocol = protocol
        self._decode_data = get_protocol(protocol).decode_data
        # Chosen once per session, so the per-frame path only reads _silence_limit.
        config = self.config
        self.heartbeat = config.heartbeat_for(client_id, protocol, self.policy.heartbeat)
        self._silence_limit = float(config.misses * self.heartbeat)
        self._hello_at = None
        self._budget_bytes = None  # the budget is for links that have not said who they are
        if hello_seq is not None:
            self._send(Welcome(hello_seq, session_id, self.heartbeat))
        events.append(DeviceOnline(info))
        return True

    def _end_session(self, reason: CloseReason, why: str, events: list[SessionEvent]) -> None:
        """The session ends, the link stays: wait for HELLO (or the next frame, if fixed)."""
        self.state = SessionState.AWAITING_HELLO
        self._fail_commands(why, events)
        assert self.info is not None
        events.append(DeviceOffline(self.info, reason))

    def _close(
        self,
        reason: CloseReason,
        error: ErrorCode | None,
        message: str,
        events: list[SessionEvent],
    ) -> None:
        if self.state is SessionState.CLOSED:
            return
        if error is not None:
            self._send_error(error, message)
        was_online = self.state is SessionState.ONLINE
        self.state = SessionState.CLOSED
        self._hello_at = None
        self._inbox.clear()  # nothing more is read from a closed link
        self.throttled = False
        self._fail_commands(LINK_LOST, events)
        if was_online:
            assert self.info is not None
            events.append(DeviceOffline(self.info, reason))
        # Gateway-wide, by reason: /metrics tells hello timeouts from silence from garbage.
        self.totals.link_closed(reason)
        events.append(CloseLink(reason))

    def _fail_commands(self, why: str, events: list[SessionEvent]) -> None:
        seqs = self.commands.drain()
        if seqs:
            result = CommandResult(CommandStatus.TIMEOUT, error=why)
            events.extend(CommandDone(seq, result) for seq in seqs)

    # ---- bytes out ----------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        frame = encode_frame(message.encode(), self.policy.frame)
        self._out += frame
        self.counters.frames_out += 1
        self.counters.bytes_out += len(frame)

    def _send_error(self, code: ErrorCode, reason: str) -> None:
        self.counters.errors_sent += 1
        self.totals.error_sent(code)
        self._out_seq = (self._out_seq + 1) & 0xFF
        self._send(Error.make(self._out_seq, code, reason))
