"""One device session per link: the state machine of docs/protocol.md §4.

A session owns the link's frame decoder, the HELLO handshake, liveness,
rate limiting, the garbage rule, and command sequencing with ACK timeouts.
Links (TCP, serial) only move bytes in and out of it.

States: ``awaiting_hello`` -> ``online`` -> ``closed``. A serial link never
closes for noise or silence: it goes back to ``awaiting_hello`` (or, with a
fixed identity, waits for the next valid frame).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from frames import (
    Ack,
    Command,
    Data,
    Discarded,
    DiscardReason,
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
    get_protocol,
)
from frames.protocols import Protocol as DeviceProtocol

from .config import SessionConfig
from .events import (
    CommandHandle,
    CommandResult,
    CommandStatus,
    DeviceInfo,
    DeviceNotOnline,
    DeviceTelemetry,
    Transport,
)

if TYPE_CHECKING:
    from .manager import DeviceManager

log = logging.getLogger(__name__)


class LinkPort(Protocol):
    """What a session needs from its link: write bytes, wait for room, close."""

    kind: Transport  # tcp or serial
    peer: str

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_buffer_size(self) -> int: ...

    def close(self) -> None: ...


class SessionState(enum.StrEnum):
    """Where a session is in docs/protocol.md §4's life cycle."""

    AWAITING_HELLO = "awaiting_hello"
    ONLINE = "online"
    CLOSED = "closed"


@dataclass(slots=True)
class LinkCounters:
    """Per-link traffic counters, for logs and metrics."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    crc_errors: int = 0
    skipped_bytes: int = 0
    frame_timeouts: int = 0
    rate_limited: int = 0
    errors_sent: int = 0
    reconnects: int = 0


class DeviceSession:
    """The session of one link. Create it when the link opens; feed it bytes."""

    def __init__(
        self,
        manager: DeviceManager,
        link: LinkPort,
        *,
        frame_options: FrameOptions | None = None,
        frame_timeout: float | None = None,
        fixed_identity: tuple[str, str] | None = None,
        counters: LinkCounters | None = None,
    ) -> None:
        self.manager = manager
        self.config: SessionConfig = manager.config
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.frame_options = frame_options or FrameOptions()
        if frame_timeout is None:
            frame_timeout = (
                self.config.tcp_frame_timeout
                if link.kind is Transport.TCP
                else self.config.serial_frame_timeout
            )
        self.decoder = FrameDecoder(self.frame_options, frame_timeout=frame_timeout)
        self.fixed_identity = fixed_identity
        self.counters = counters or LinkCounters()
        self.state = SessionState.AWAITING_HELLO
        self.info: DeviceInfo | None = None
        self._protocol: DeviceProtocol | None = None
        self.last_seen = self.loop.time()
        self._hello_timer: asyncio.TimerHandle | None = None
        self._silence_timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        # Rate limit: a token bucket per session.
        self._tokens = self.config.rate_burst
        self._tokens_at = self.last_seen
        self._rate_error_at = -1e9
        # Garbage rule (TCP only): tumbling window of discarded bytes and CRC errors.
        self._garbage_window_start = self.last_seen
        self._garbage_bytes = 0
        self._garbage_crc = 0
        # Commands: seq -> (future, ack timer); a semaphore bounds what is in flight.
        self._next_seq = 0
        self._pending: dict[int, tuple[asyncio.Future[CommandResult], asyncio.TimerHandle]] = {}
        self._slots = asyncio.Semaphore(self.config.max_inflight_commands)
        self._out_seq = 0

    # ---- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """The link is open: start the HELLO timer (TCP) or wait for frames (serial)."""
        self.manager.link_opened(self)
        if self.link.kind is Transport.TCP:
            self._hello_timer = self.loop.call_later(
                self.config.hello_timeout, self._hello_timed_out
            )

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        if self.state is SessionState.AWAITING_HELLO:
            self.close(
                "hello_timeout",
                ErrorCode.NOT_REGISTERED,
                f"no valid HELLO within {self.config.hello_timeout:g} s",
            )

    def close(self, reason: str, error: ErrorCode | None = None, message: str = "") -> None:
        """Close the link for ``reason``, after sending ERROR ``error`` when given."""
        if self.state is SessionState.CLOSED:
            return
        if error is not None:
            self._send_error(error, message)
        self.link.close()
        self.link_lost(reason)

    def link_lost(self, reason: str) -> None:
        """The link is gone (closed by us, by the peer, or unplugged)."""
        if self.state is SessionState.CLOSED:
            return
        was_online = self.state is SessionState.ONLINE
        self.state = SessionState.CLOSED
        for timer in (self._hello_timer, self._silence_timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        self._fail_pending("link lost")
        if was_online:
            self.manager.session_ended(self, reason)
        # Gateway-wide, by reason: /metrics tells hello timeouts from silence from garbage.
        self.manager.counters[f"closed_{reason}"] += 1
        self.manager.link_closed(self)

    # ---- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from the link, in any chunks."""
        if self.state is SessionState.CLOSED:
            return
        now = self.loop.time()
        self.counters.bytes_in += len(data)
        self._handle(self.decoder.feed(data, now), now)
        self._arm_frame_timer()

    def _arm_frame_timer(self) -> None:
        deadline = self.decoder.deadline
        if self._frame_timer is not None:
            if deadline is not None and self._frame_timer.when() == deadline:
                return
            self._frame_timer.cancel()
            self._frame_timer = None
        if deadline is not None and self.state is not SessionState.CLOSED:
            # A small margin so the decoder sees the deadline as passed.
            self._frame_timer = self.loop.call_at(deadline + 0.001, self._frame_timed_out)

    def _frame_timed_out(self) -> None:
        self._frame_timer = None
        if self.state is SessionState.CLOSED:
            return
        now = self.loop.time()
        self._handle(self.decoder.expire(now), now)
        self._arm_frame_timer()

    def _handle(self, events: list[Frame | Discarded], now: float) -> None:
        for event in events:
            if self.state is SessionState.CLOSED:
                return
            if isinstance(event, Frame):
                self.counters.frames_in += 1
                self._on_payload(event.payload, now)
            else:
                self._on_discard(event, now)

    def _on_discard(self, event: Discarded, now: float) -> None:
        c = self.counters
        if event.reason is DiscardReason.SKIPPED:
            c.skipped_bytes += event.nbytes
        elif event.reason is DiscardReason.CRC:
            c.crc_errors += 1
        else:
            c.frame_timeouts += 1
        self.manager.count_discard(event)
        if self.link.kind is not Transport.TCP:
            return  # a serial link is never closed for noise, only counted
        if now - self._garbage_window_start > self.config.garbage_window:
            self._garbage_window_start = now
            self._garbage_bytes = 0
            self._garbage_crc = 0
        self._garbage_bytes += event.nbytes
        if event.reason is DiscardReason.CRC:
            self._garbage_crc += 1
        if (
            self._garbage_bytes >= self.config.garbage_bytes
            or self._garbage_crc >= self.config.garbage_crc_errors
        ):
            log.warning(
                "closing %s link %s: mostly garbage (%d bytes discarded, %d CRC errors in %g s)",
                self.link.kind,
                self.link.peer,
                self._garbage_bytes,
                self._garbage_crc,
                self.config.garbage_window,
            )
            self.manager.counters["garbage_closed"] += 1
            self.close("garbage")

    def _on_payload(self, payload: bytes, now: float) -> None:
        if not self._take_token(now):
            return
        try:
            message = decode_message(payload)
        except RemoteProtocolError as e:
            self._send_error(e.code, str(e))
            return
        self._touch(now)
        if self.state is SessionState.AWAITING_HELLO:
            self._before_hello(message, now)
            return
        match message:
            case Data():
                self._on_data(message, now)
            case Ping(seq=seq):
                self._send(Pong(seq))
            case Pong():
                pass  # liveness only
            case Ack(seq=seq, status=status):
                self._on_ack(seq, status)
            case Hello():
                self._on_hello(message)
            case Error():
                log.debug("device %s sent ERROR %s", self._name(), message)
            case _:
                self._send_error(
                    ErrorCode.UNKNOWN_TYPE,
                    f"a device does not send {message.TYPE.name}",
                )

    def _before_hello(self, message: Message, now: float) -> None:
        if isinstance(message, Hello):
            self._on_hello(message)
        elif isinstance(message, Ping):
            self._send(Pong(message.seq))
        elif self.fixed_identity is not None:
            # A fixed serial link is online from its first valid frame.
            client_id, protocol = self.fixed_identity
            if self._go_online(client_id, protocol):
                self._on_payload_online(message, now)
        else:
            self._send_error(ErrorCode.NOT_REGISTERED, "send HELLO first")

    def _on_payload_online(self, message: Message, now: float) -> None:
        if isinstance(message, Data):
            self._on_data(message, now)
        elif isinstance(message, Ack):
            self._on_ack(message.seq, message.status)
        elif isinstance(message, Pong | Error):
            pass
        else:
            self._send_error(ErrorCode.UNKNOWN_TYPE, f"a device does not send {message.TYPE.name}")

    def _on_hello(self, hello: Hello) -> None:
        client_id, protocol = hello.client_id, hello.protocol
        if self.fixed_identity is not None:
            client_id, protocol = self.fixed_identity
        elif not self.config.auth.allows(client_id, hello.token):
            log.warning("device %s on %s: wrong token", client_id, self.link.peer)
            self.manager.counters["auth_failed"] += 1
            self.close("auth_failed", ErrorCode.AUTH_FAILED, "wrong device token")
            return
        if self.state is SessionState.ONLINE:
            if self.info is not None and self.info.client_id == client_id:
                # A repeated HELLO on a live session: answer it again, same session.
                self._send(Welcome(hello.seq, uuid.UUID(self.info.session), self.config.heartbeat))
                return
            self.manager.session_ended(self, "rehello")
            self.state = SessionState.AWAITING_HELLO
        if self._go_online(client_id, protocol, hello_seq=hello.seq) and self._hello_timer:
            self._hello_timer.cancel()
            self._hello_timer = None

    def _go_online(self, client_id: str, protocol: str, hello_seq: int | None = None) -> bool:
        session = uuid.uuid4()
        info = DeviceInfo(
            client_id=client_id,
            protocol=protocol,
            transport=self.link.kind,
            peer=self.link.peer,
            session=str(session),
            connected_at=int(time.time() * 1000),
        )
        refusal = self.manager.admit(self, info)
        if refusal is not None:
            self.close("refused", ErrorCode.RATE_LIMITED, refusal)
            return False
        self.info = info
        self._protocol = get_protocol(protocol)
        self.state = SessionState.ONLINE
        if hello_seq is not None:
            self._send(Welcome(hello_seq, session, self.config.heartbeat))
        self._arm_silence_timer()
        self.manager.session_started(self)
        return True

    # ---- liveness and rate --------------------------------------------------------------------

    def _touch(self, now: float) -> None:
        self.last_seen = now

    def _arm_silence_timer(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
        # One timer per session, moved lazily: it fires at the old deadline and
        # re-arms from last_seen, so a busy device costs no timer churn per frame.
        self._silence_timer = self.loop.call_at(
            self.last_seen + self.config.silence_limit, self._check_silence
        )

    def _check_silence(self) -> None:
        self._silence_timer = None
        if self.state is not SessionState.ONLINE:
            return
        deadline = self.last_seen + self.config.silence_limit
        if self.loop.time() < deadline:
            self._silence_timer = self.loop.call_at(deadline, self._check_silence)
            return
        log.info("device %s silent for %g s", self._name(), self.config.silence_limit)
        if self.link.kind is Transport.TCP:
            self.close("silent")
        else:
            # A serial port stays open: the device may speak again.
            self.state = SessionState.AWAITING_HELLO
            self._fail_pending("device went silent")
            self.manager.session_ended(self, "silent")

    def _take_token(self, now: float) -> bool:
        rate = self.config.max_frames_per_second
        self._tokens = min(self.config.rate_burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.counters.rate_limited += 1
        self.manager.counters["rate_limited_frames"] += 1
        if now - self._rate_error_at >= 1.0:  # one ERROR a second, not one per frame
            self._rate_error_at = now
            self._send_error(
                ErrorCode.RATE_LIMITED,
                f"over {self.config.max_frames_per_second:g} frames/s: frames dropped",
            )
        return False

    # ---- telemetry ----------------------------------------------------------------------------

    def _on_data(self, message: Data, now: float) -> None:
        assert self._protocol is not None
        assert self.info is not None
        try:
            data = self._protocol.decode_data(message.body)
        except RemoteProtocolError as e:
            self._send_error(e.code, str(e))
            return
        self.manager.telemetry(
            DeviceTelemetry(
                client_id=self.info.client_id,
                protocol=self.info.protocol,
                seq=message.seq,
                data=data,
                ts=int(time.time() * 1000),
                received=now,
            )
        )

    # ---- commands -----------------------------------------------------------------------------

    async def send_command(self, body: bytes) -> CommandHandle:
        """Write a COMMAND (waiting for room: backpressure) and return its handle.

        Raises ``DeviceNotOnline`` if the session is not (or no longer) online.
        """
        if self.state is not SessionState.ONLINE or self.info is None:
            raise DeviceNotOnline(self.info.client_id if self.info else "?")
        await self._slots.acquire()
        try:
            if self.state is not SessionState.ONLINE:
                raise DeviceNotOnline(self.info.client_id)
            seq = self._take_seq()
            future: asyncio.Future[CommandResult] = self.loop.create_future()
            future.add_done_callback(lambda _: self._slots.release())
        except BaseException:
            self._slots.release()
            raise
        timer = self.loop.call_later(self.config.ack_timeout, self._ack_timed_out, seq)
        self._pending[seq] = (future, timer)
        self._send(Command(seq, body))
        await self.link.drain()
        return CommandHandle(self.info.client_id, seq, future)

    def _take_seq(self) -> int:
        # Skip any seq still waiting for its ACK; the semaphore keeps one free.
        for _ in range(256):
            seq = self._next_seq
            self._next_seq = (self._next_seq + 1) % 256
            if seq not in self._pending:
                return seq
        raise RuntimeError("no free command seq")  # pragma: no cover - bounded by _slots

    def _on_ack(self, seq: int, status: int) -> None:
        entry = self._pending.pop(seq, None)
        if entry is None:
            self.manager.counters["stray_acks"] += 1
            return
        future, timer = entry
        timer.cancel()
        if not future.done():
            if status == 0:
                future.set_result(CommandResult(CommandStatus.ACKED))
            else:
                future.set_result(CommandResult(CommandStatus.NACKED, code=status))

    def _ack_timed_out(self, seq: int) -> None:
        entry = self._pending.pop(seq, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(CommandResult(CommandStatus.TIMEOUT))

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for future, timer in pending.values():
            timer.cancel()
            if not future.done():
                future.set_result(CommandResult(CommandStatus.FAILED, error=why))

    # ---- bytes out ----------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        if self.state is SessionState.CLOSED:
            return
        frame = encode_frame(message.encode(), self.frame_options)
        self.link.write(frame)
        self.counters.frames_out += 1
        self.counters.bytes_out += len(frame)
        if self.link.write_buffer_size() > self.config.max_write_buffer:
            log.warning("closing link %s: the device does not read", self.link.peer)
            self.close("not_reading")

    def _send_error(self, code: ErrorCode, reason: str) -> None:
        self.counters.errors_sent += 1
        self.manager.counters[f"error_{code.name.lower()}"] += 1
        self._out_seq = (self._out_seq + 1) % 256
        self._send(Error.make(self._out_seq, code, reason))

    def _name(self) -> str:
        return self.info.client_id if self.info else self.link.peer
