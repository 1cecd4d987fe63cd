"""Simulated devices as pure behaviour: messages in, messages out, time passed in.

A model never touches a socket, a clock or the global random generator, so a
test can drive it with a fake clock and a seed and know every byte it will
send. The drivers in ``simulators.drivers`` move its messages over TCP or a
pseudo-terminal; ``simulators.faults`` can mangle them on the way.

What a model does (docs/protocol.md §4):

- ``connect(now)`` sends HELLO (or, on a serial link configured with a fixed
  client_id, goes online at once without one);
- WELCOME puts it online and sets its heartbeat interval; it then sends DATA
  at its rate, and a PING whenever it has sent nothing for a heartbeat interval;
- it answers PING with PONG and COMMAND with ACK (status 0, or its own error
  code); a fatal ERROR (AUTH_FAILED, REPLACED) stops it for good.

The handshake itself (HELLO, WELCOME, PING, ERROR) is ``simulators.handshake``,
shared with the load generator and the tests' raw devices.
"""

from __future__ import annotations

import abc
import enum
import math
import random
import uuid
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from frames import (
    Ack,
    Command,
    Data,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Protocol,
    RemoteProtocolError,
    Welcome,
    get_protocol,
    valid_client_id,
)

from .handshake import DeviceHandshake

M = TypeVar("M", bound=Message)

# Deadlines are compared with this much slack: a fake clock stepping by 0.1 and
# an event loop waking a hair early must both count as "on time".
EPSILON: Final = 1e-6

# Heartbeat interval used until a WELCOME says otherwise (the gateway's default,
# docs/protocol.md §4), and on fixed serial links, which get no WELCOME.
DEFAULT_HEARTBEAT: Final = 30.0


class AckStatus(enum.IntEnum):
    """The simulated devices' own ACK status codes (docs/protocol.md §3 leaves them to devices)."""

    OK = 0
    UNKNOWN_COMMAND = 1  # an opcode the device does not implement
    BAD_ARGUMENT = 2  # a known command with arguments out of range (e.g. relay channel 7)


class ModelState(enum.Enum):
    """Where a model is in its session."""

    OFFLINE = "offline"  # no link
    HELLO_SENT = "hello_sent"  # link up, waiting for WELCOME
    ONLINE = "online"  # sending DATA and heartbeats
    REBOOTING = "rebooting"  # deaf and mute for a moment after a reboot command
    STOPPED = "stopped"  # a fatal ERROR ended it; it never talks again


@dataclass(slots=True)
class ModelCounters:
    """What one model has done, for progress lines and tests."""

    frames_sent: int = 0  # every message the model emitted
    data_sent: int = 0
    acks_sent: int = 0  # ACKs with status 0
    nacks_sent: int = 0  # ACKs with another status
    pings_sent: int = 0
    pongs_sent: int = 0
    hellos_sent: int = 0
    errors_received: int = 0
    sessions: int = 0  # times the model went online
    reconnects: int = 0  # connect() calls after the first
    reboots: int = 0


class DeviceModel(abc.ABC):
    """The session behaviour every simulated device shares.

    Subclasses supply the telemetry (``_sample``) and the commands
    (``_command``). ``seed`` makes the telemetry and anything random exactly
    repeatable; ``rate`` is DATA messages per second; ``hello=False`` models a
    device on a serial link configured with a fixed client_id, which is online
    from its first frame and never sends HELLO.
    """

    protocol_name: str = ""

    def __init__(
        self,
        client_id: str,
        *,
        token: str = "",
        rate: float = 1.0,
        seed: int | str = 0,
        hello: bool = True,
        hello_retry: float = 5.0,
        reboot_time: float = 1.0,
    ) -> None:
        if not valid_client_id(client_id):
            raise ValueError(f"client_id {client_id!r} must be 1..64 characters of A-Za-z0-9._:-")
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of DATA per second, not {rate!r}")
        self.client_id = client_id
        self.protocol = self.protocol_name
        self.token = token
        self.hello = hello
        self.rate = rate
        self.hello_retry = hello_retry
        self.reboot_time = reboot_time
        self.codec: Protocol = get_protocol(self.protocol)
        self.rng = random.Random(seed)
        self.counters = ModelCounters()
        self.state = ModelState.OFFLINE
        self.interval = 1.0 / rate  # seconds between DATA; set_interval changes it
        self.heartbeat = DEFAULT_HEARTBEAT
        self._seq = 0
        self.handshake = DeviceHandshake(client_id, self.protocol, token, next_seq=self._next_seq)
        self._connected_before = False
        self._next_data: float | None = None
        self._last_sent: float | None = None
        self._hello_at: float | None = None
        self._reboot_until: float | None = None
        self._power_on()

    # ---- what drivers call ----------------------------------------------------------------

    @property
    def online(self) -> bool:
        """True while the device considers its session up (rebooting counts as up)."""
        return self.state in (ModelState.ONLINE, ModelState.REBOOTING)

    @property
    def stopped(self) -> bool:
        """True once a fatal ERROR ended the device; drivers stop reconnecting it."""
        return self.state is ModelState.STOPPED

    @property
    def session_id(self) -> uuid.UUID | None:
        """The session id of the latest WELCOME on this link."""
        return self.handshake.session_id

    @property
    def last_error(self) -> Error | None:
        """The latest ERROR the gateway sent, on any link."""
        return self.handshake.error

    def connect(self, now: float) -> list[Message]:
        """A link came up: return the HELLO (nothing for a fixed serial device)."""
        if self.stopped:
            return []
        if self._connected_before:
            self.counters.reconnects += 1
        self._connected_before = True
        if not self.hello:
            self._go_online(now)
            return []
        self.state = ModelState.HELLO_SENT
        return [self._hello_message(now)]

    def disconnected(self) -> None:
        """The link is gone; the next ``connect`` starts a new session."""
        if not self.stopped:
            self.state = ModelState.OFFLINE
        self.handshake.reset()
        self._next_data = None
        self._hello_at = None
        self._reboot_until = None

    def revive(self) -> None:
        """Undo a stop, for a fatal ERROR the device provoked on purpose (a bad-token fault)."""
        if self.stopped:
            self.state = ModelState.OFFLINE

    def on_message(self, msg: Message, now: float) -> list[Message]:
        """React to a message from the gateway; return what to send back."""
        if self.stopped:
            return []
        if self.state is ModelState.REBOOTING and not isinstance(msg, Error):
            return []  # a rebooting device hears nothing but ERRORs
        if isinstance(msg, Command):
            return self._on_command(msg, now)
        hello_sent = self.state is ModelState.HELLO_SENT
        reply = self.handshake.receive(msg)
        if isinstance(msg, Error):
            self.counters.errors_received += 1
            if self.handshake.refused:
                self.state = ModelState.STOPPED
                return []
        elif isinstance(msg, Welcome) and self.handshake.welcomed:
            self.heartbeat = float(msg.heartbeat)
            if hello_sent:
                self._go_online(now)
        # PONG answers our PING; HELLO, DATA and ACK never come from a gateway.
        if isinstance(reply, Pong):
            self.counters.pongs_sent += 1
            return [self._sent(reply, now)]
        if isinstance(reply, Hello) and self.online:
            # NOT_REGISTERED on a live session: the HELLO again is the reply.
            self.state = ModelState.HELLO_SENT
            self._next_data = None
            return [self._sent_hello(reply, now)]
        return []

    def tick(self, now: float) -> list[Message]:
        """Let time pass: return the DATA, PING or HELLO retry that is due by ``now``."""
        if self.state is ModelState.HELLO_SENT:
            # A HELLO can be lost (a serial port nobody reads yet, a flipped bit).
            if self._hello_at is not None and now + EPSILON >= self._hello_at + self.hello_retry:
                return [self._hello_message(now)]
            return []
        if self.state is ModelState.REBOOTING:
            if self._reboot_until is not None and now + EPSILON >= self._reboot_until:
                self._boot(now)
            else:
                return []
        if self.state is not ModelState.ONLINE:
            return []
        out: list[Message] = []
        if self._next_data is not None and now + EPSILON >= self._next_data:
            out.append(self._data_message(now))
            self._next_data += self.interval
            if self._next_data + EPSILON < now:
                # Far behind (a stalled loop): skip the missed beats instead of a burst.
                self._next_data = now + self.interval
        if self._last_sent is None or now + EPSILON >= self._last_sent + self.heartbeat:
            self.counters.pings_sent += 1
            out.append(self._sent(Ping(self._next_seq()), now))
        return out

    def next_deadline(self) -> float | None:
        """Clock value at which ``tick`` next has something to do, or None."""
        if self.state is ModelState.HELLO_SENT and self._hello_at is not None:
            return self._hello_at + self.hello_retry
        if self.state is ModelState.REBOOTING:
            return self._reboot_until
        if self.state is not ModelState.ONLINE:
            return None
        candidates = [self._next_data]
        if self._last_sent is not None:
            candidates.append(self._last_sent + self.heartbeat)
        return min((c for c in candidates if c is not None), default=None)

    # ---- what subclasses provide ----------------------------------------------------------

    @abc.abstractmethod
    def _sample(self, now: float) -> dict[str, Any]:
        """The telemetry values of one DATA message, as the protocol's JSON."""

    @abc.abstractmethod
    def _command(self, name: str, args: dict[str, Any], now: float) -> tuple[int, list[Message]]:
        """Carry out a decoded command: its ACK status and any messages to send after the ACK."""

    def _power_on(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Set up device-specific state (called once, at the end of ``__init__``)."""

    # ---- helpers for subclasses -----------------------------------------------------------

    def _data_message(self, now: float) -> Data:
        self.counters.data_sent += 1
        body = self.codec.encode_data(self._sample(now))
        return self._sent(Data(self._next_seq(), body), now)

    def _reboot(self, now: float) -> None:
        """Go deaf and mute for ``reboot_time``, then start over (see ``_boot``)."""
        self.counters.reboots += 1
        self.state = ModelState.REBOOTING
        self._reboot_until = now + self.reboot_time

    # ---- internals ------------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) & 0xFF
        return seq

    def _sent(self, msg: M, now: float) -> M:
        self.counters.frames_sent += 1
        self._last_sent = now
        return msg

    def _hello_message(self, now: float) -> Hello:
        return self._sent_hello(self.handshake.hello(), now)

    def _sent_hello(self, hello: Hello, now: float) -> Hello:
        self.counters.hellos_sent += 1
        self._hello_at = now
        return self._sent(hello, now)

    def _go_online(self, now: float) -> None:
        self.state = ModelState.ONLINE
        self.counters.sessions += 1
        self._hello_at = None
        self._next_data = now  # the first DATA goes out at once, so dashboards see a value
        if self._last_sent is None:
            self._last_sent = now

    def _boot(self, now: float) -> None:
        # A rebooted device forgets its sequence and its configured interval, as
        # firmware starting from flash would; the session itself is the
        # gateway's business and stays up.
        self._seq = 0
        self.interval = 1.0 / self.rate
        self._reboot_until = None
        self.state = ModelState.ONLINE
        self._next_data = now

    def _on_command(self, cmd: Command, now: float) -> list[Message]:
        try:
            decoded = self.codec.decode_command(cmd.body)
        except RemoteProtocolError as e:
            # frames reports an unknown opcode on the field "opcode" and any
            # argument problem on "args...".
            refusal = AckStatus.UNKNOWN_COMMAND if e.field == "opcode" else AckStatus.BAD_ARGUMENT
            return [self._ack(cmd.seq, refusal, now)]
        name = str(decoded.get("name", ""))
        args = decoded.get("args") or {}
        status, after = self._command(name, dict(args), now)
        return [self._ack(cmd.seq, status, now), *after]

    def _ack(self, seq: int, status: int, now: float) -> Ack:
        if status == AckStatus.OK:
            self.counters.acks_sent += 1
        else:
            self.counters.nacks_sent += 1
        return self._sent(Ack(seq, int(status)), now)


class EnvSensorModel(DeviceModel):
    """An ``env-sensor``: temperature and humidity drifting slowly, a battery draining.

    Temperature is a random walk pulled back towards 21 degC, humidity one
    pulled towards 45 %; both change with elapsed time, not with the number of
    readings, so a faster rate samples the same weather more often. Obeys
    ``set_interval`` (seconds between DATA, 1..65535) and ``reboot``.
    """

    protocol_name = "env-sensor"

    # Drift per square root of a second, and the pull back to the mean per second.
    TEMP_MEAN: Final = 21.0
    HUMIDITY_MEAN: Final = 45.0
    TEMP_NOISE: Final = 0.02
    HUMIDITY_NOISE: Final = 0.05
    PULL: Final = 0.002
    # Battery: a slow drain with time plus a little per transmission.
    DRAIN_PER_SECOND: Final = 0.0005
    DRAIN_PER_DATA: Final = 0.001

    temperature: float
    humidity: float
    battery: float
    _sampled_at: float | None

    def _power_on(self) -> None:
        # Each unit starts a little apart from the others, as real ones would.
        self.temperature = self.TEMP_MEAN + self.rng.uniform(-1.5, 1.5)
        self.humidity = self.HUMIDITY_MEAN + self.rng.uniform(-5.0, 5.0)
        self.battery = self.rng.uniform(85.0, 100.0)
        self._sampled_at = None

    def _sample(self, now: float) -> dict[str, Any]:
        dt = 0.0 if self._sampled_at is None else max(0.0, now - self._sampled_at)
        self._sampled_at = now
        root = math.sqrt(dt)
        self.temperature += (self.TEMP_MEAN - self.temperature) * min(1.0, self.PULL * dt)
        self.temperature += self.rng.gauss(0.0, self.TEMP_NOISE * root)
        self.temperature = min(85.0, max(-40.0, self.temperature))  # the sensor's range
        self.humidity += (self.HUMIDITY_MEAN - self.humidity) * min(1.0, self.PULL * dt)
        self.humidity += self.rng.gauss(0.0, self.HUMIDITY_NOISE * root)
        self.humidity = min(100.0, max(0.0, self.humidity))
        self.battery = max(0.0, self.battery - self.DRAIN_PER_SECOND * dt - self.DRAIN_PER_DATA)
        return {
            "temperature_c": round(self.temperature, 2),
            "humidity_pct": round(self.humidity, 2),
            "battery_pct": round(self.battery),
        }

    def _command(self, name: str, args: dict[str, Any], now: float) -> tuple[int, list[Message]]:
        if name == "set_interval":
            seconds = args.get("seconds")
            if not isinstance(seconds, int) or seconds < 1:
                return AckStatus.BAD_ARGUMENT, []
            self.interval = float(seconds)
            self._next_data = now + self.interval
            return AckStatus.OK, []
        if name == "reboot":
            self._reboot(now)
            return AckStatus.OK, []
        return AckStatus.UNKNOWN_COMMAND, []


class Relay4Model(DeviceModel):
    """A ``relay-4``: four channels, all off at power-up.

    ``set`` switches one channel, ACKs 0 and reports the new state at once;
    a channel outside 0..3 is NACKed with ``AckStatus.BAD_ARGUMENT``. The state
    is also sent at the DATA rate.
    """

    protocol_name = "relay-4"
    CHANNELS: Final = 4

    channels: list[bool]

    def _power_on(self) -> None:
        self.channels = [False] * self.CHANNELS

    def _sample(self, now: float) -> dict[str, Any]:
        return {"channels": list(self.channels)}

    def _command(self, name: str, args: dict[str, Any], now: float) -> tuple[int, list[Message]]:
        if name != "set":
            return AckStatus.UNKNOWN_COMMAND, []
        channel, on = args.get("channel"), args.get("on")
        if not isinstance(channel, int) or not 0 <= channel < self.CHANNELS:
            return AckStatus.BAD_ARGUMENT, []
        self.channels[channel] = bool(on)
        return AckStatus.OK, [self._data_message(now)]


MODELS: Final[dict[str, type[DeviceModel]]] = {
    EnvSensorModel.protocol_name: EnvSensorModel,
    Relay4Model.protocol_name: Relay4Model,
}


def model_class(protocol: str) -> type[DeviceModel]:
    """The model class simulating ``protocol``; ValueError names the known ones."""
    try:
        return MODELS[protocol]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"no simulated device speaks {protocol!r} (known: {known})") from None
