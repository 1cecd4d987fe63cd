"""Device protocols: how DATA bodies become JSON and JSON commands become COMMAND bodies.

docs/protocols.md. A protocol is looked up by the name a device gives in
its HELLO. Each known protocol is a set of ``construct`` schemas: one for the
DATA body, and one per command (an opcode byte plus an argument struct). An
unknown protocol is still accepted: its DATA is carried as hex, and every
protocol takes ``{"hex": "..."}`` as a raw command body.

To add a protocol from your own module, build a ``ConstructProtocol`` and pass
it to ``register_protocol`` (see docs/protocols.md).
"""

from __future__ import annotations

import abc
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from construct import (
    Construct,
    ConstructError,
    Int8ub,
    Int16sb,
    Int16ub,
    Struct,
    Terminated,
)

from .errors import CommandError, ErrorCode, RemoteProtocolError
from .fixed import fixed_layout, static_size
from .messages import MAX_BODY, valid_protocol_name
from .schema import Boolean, ChannelMask, Integer, Scaled

JsonObject = dict[str, Any]


def _path_field(error: ConstructError, prefix: str) -> str:
    """Turn construct's ``(building) -> args -> seconds`` into ``prefix.seconds``."""
    path = getattr(error, "path", None) or ""
    parts = [p.strip() for p in path.split("->")[1:] if p.strip()]
    return ".".join([prefix, *parts]) if parts else prefix


_SCALARS = (int, float, bool, str, type(None))


def _to_json(value: Any) -> Any:
    """construct Containers -> plain dicts and lists, without construct's private keys."""
    # Container is a dict subclass; scalars, by far the most common values, are
    # passed through without a recursive call (this runs for every DATA frame).
    if isinstance(value, dict):
        return {
            k: v if type(v) in _SCALARS else _to_json(v)
            for k, v in value.items()
            if not str(k).startswith("_")
        }
    if isinstance(value, list):
        return [v if type(v) in _SCALARS else _to_json(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


# ---- protocols -----------------------------------------------------------------------------


class Protocol(abc.ABC):
    """How one device protocol turns bytes into JSON and back.

    ``ranges`` gives the plausible range ``(low, high)`` of numeric DATA fields
    by name: a value outside is kept as sent and flagged (docs/api.md §3.1
    ``out_of_range``). ``ack_codes`` names the device's non-zero ACK status
    codes (docs/protocol.md §2 leaves them to the protocol), for ``nacked``.
    """

    name: str
    ranges: Mapping[str, tuple[float, float]] = {}
    ack_codes: Mapping[int, str] = {}
    #: The entities Home Assistant shows for a device of this protocol (docs/mqtt.md,
    #: "Entities of your own protocol"): mappings with ``component`` (sensor,
    #: binary_sensor, switch), ``key`` and Home Assistant keys such as ``name``,
    #: ``value_template``, ``device_class``, ``unit_of_measurement``, ``payload_on``.
    mqtt_entities: Sequence[Mapping[str, Any]] = ()

    @abc.abstractmethod
    def decode_data(self, body: bytes) -> JsonObject:
        """DATA body -> telemetry JSON. Raises RemoteProtocolError (MALFORMED)."""

    @abc.abstractmethod
    def encode_data(self, values: Mapping[str, Any]) -> bytes:
        """Telemetry JSON -> DATA body (simulators use this). Raises CommandError."""

    def encode_command(self, command: Mapping[str, Any]) -> bytes:
        """Command JSON -> COMMAND body. Raises CommandError naming the bad field."""
        if not isinstance(command, Mapping):
            raise CommandError("a command must be a JSON object", field="command")
        if "hex" in command:
            return _raw_hex_command(command)
        return self._encode_named(command)

    @abc.abstractmethod
    def _encode_named(self, command: Mapping[str, Any]) -> bytes: ...

    @abc.abstractmethod
    def decode_command(self, body: bytes) -> JsonObject:
        """COMMAND body -> command JSON (devices and simulators use this)."""


def _raw_hex_command(command: Mapping[str, Any]) -> bytes:
    extra = sorted(set(command) - {"hex"})
    if extra:
        raise CommandError(f"a raw command takes only 'hex', not {extra}", field=extra[0])
    text = command["hex"]
    if not isinstance(text, str):
        raise CommandError("'hex' must be a string of hex digits", field="hex")
    try:
        body = bytes.fromhex(text)
    except ValueError:
        raise CommandError(f"'hex' is not valid hex: {text[:40]!r}", field="hex") from None
    if len(body) > MAX_BODY:
        raise CommandError(f"'hex' is {len(body)} bytes; a COMMAND carries at most {MAX_BODY}")
    return body


class HexProtocol(Protocol):
    """A protocol the gateway does not know: DATA is carried as hex."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decode_data(self, body: bytes) -> JsonObject:
        return {"hex": body.hex()}

    def encode_data(self, values: Mapping[str, Any]) -> bytes:
        return _raw_hex_command(values)

    def _encode_named(self, command: Mapping[str, Any]) -> bytes:
        raise CommandError(
            f"protocol {self.name!r} is not known to the gateway: send {{'hex': '...'}}",
            field="name",
        )

    def decode_command(self, body: bytes) -> JsonObject:
        return {"hex": body.hex()}


@dataclass(frozen=True, slots=True)
class CommandSchema:
    """One named command: its opcode byte and the struct of its arguments (or None)."""

    opcode: int
    args: Construct | None = None
    arg_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.opcode <= 255:
            raise ValueError(f"opcode must be 0..255, not {self.opcode}")
        names: tuple[str, ...] = ()
        if self.args is not None:
            names = tuple(sc.name for sc in self.args.subcons if sc.name)
        object.__setattr__(self, "arg_names", names)


class ConstructProtocol(Protocol):
    """A protocol described by construct schemas.

    ``data`` is a ``Struct`` for the DATA body (it must consume the whole body);
    ``commands`` maps each command name to its ``CommandSchema``.

    When every field of ``data`` is a fixed-size number (construct's ``Int*``,
    ``Float*`` and ``Flag``, optionally wrapped in ``Integer``, ``Boolean``,
    ``Scaled`` or ``ChannelMask``), a DATA body of the right size is decoded
    with one precompiled ``struct.Struct`` instead of construct, with the same
    result; construct still decodes every other body and names what is wrong.
    """

    def __init__(
        self,
        name: str,
        data: Construct,
        commands: Mapping[str, CommandSchema] | None = None,
        *,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        ack_codes: Mapping[int, str] | None = None,
    ) -> None:
        if not valid_protocol_name(name):
            raise ValueError(f"protocol name {name!r} must be 1..32 characters of a-z0-9._-")
        self.name = name
        self.ranges = dict(ranges or {})
        for field_name, (low, high) in self.ranges.items():
            if not low <= high:
                raise ValueError(f"range of {field_name!r} must have low <= high, not {low, high}")
        self.ack_codes = dict(ack_codes or {})
        if any(not 1 <= code <= 255 for code in self.ack_codes):
            raise ValueError("ack_codes name ACK statuses 1..255 (0 is success)")
        self.data = Struct("values" / data, Terminated)
        # Compiled construct parses DATA about 3x faster, but its errors lose the
        # field path; on an error the interpreted struct parses again to name it.
        self._data_fast = _compiled(self.data)
        # Even compiled, construct costs ~5 us per DATA body, the largest CPU cost of
        # a message in the gateway; struct.unpack of a fixed layout costs ~0.2 us.
        self._fixed = fixed_layout(data)
        self._static_size = static_size(self.data)
        self.commands = dict(commands or {})
        self._by_opcode = {spec.opcode: (n, spec) for n, spec in self.commands.items()}
        if len(self._by_opcode) != len(self.commands):
            raise ValueError(f"protocol {name!r} gives two commands the same opcode")

    def decode_data(self, body: bytes) -> JsonObject:
        fixed = self._fixed
        if fixed is not None and len(body) == fixed.size:
            try:
                return fixed.decode(body)
            except ConstructError:
                pass  # a value the schema refuses: construct names the field at fault
        return self._decode_with_construct(body)

    def _decode_with_construct(self, body: bytes) -> JsonObject:
        # The construct decoding, which the fixed layout must equal on right-sized bodies.
        # Compiled construct does not check that the bytes are there (Bytes(4) takes
        # 2, a missing Flag byte reads as True): it is trusted only with a body of
        # the schema's static size; anything else takes the interpreted parse.
        if self._static_size is None or len(body) != self._static_size:
            parsed = self._parse_for_error(body)
        else:
            try:
                parsed = self._data_fast.parse(body)
            except Exception:
                # struct.error or ValueError where the interpreted struct names the field.
                parsed = self._parse_for_error(body)
        result: JsonObject = _to_json(parsed["values"])
        return result

    def _parse_for_error(self, body: bytes) -> Any:
        try:
            return self.data.parse(body)
        except ConstructError as e:
            raise RemoteProtocolError(
                f"{self.name} DATA does not fit its schema ({len(body)} bytes): {_reason(e)}",
                code=ErrorCode.MALFORMED,
                field=_path_field(e, "data").replace("data.values", "data"),
            ) from None

    def encode_data(self, values: Mapping[str, Any]) -> bytes:
        try:
            body: bytes = self.data.build({"values": values})
        except (ConstructError, KeyError, TypeError) as e:
            raise CommandError(f"{self.name} DATA cannot be built: {e}") from None
        return body

    def _encode_named(self, command: Mapping[str, Any]) -> bytes:
        extra = sorted(set(command) - {"name", "args"})
        if extra:
            raise CommandError(f"unknown key {extra[0]!r} in command", field=extra[0])
        name = command.get("name")
        if not isinstance(name, str):
            raise CommandError("a command needs a 'name' (a string) or 'hex'", field="name")
        spec = self.commands.get(name)
        if spec is None:
            known = ", ".join(sorted(self.commands)) or "none"
            raise CommandError(
                f"{self.name} has no command {name!r} (known: {known})", field="name"
            )
        args = command.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise CommandError("'args' must be a JSON object", field="args")
        unknown = sorted(set(args) - set(spec.arg_names))
        if unknown:
            raise CommandError(
                f"{self.name} {name} takes no argument {unknown[0]!r}", field=f"args.{unknown[0]}"
            )
        missing = [a for a in spec.arg_names if a not in args]
        if missing:
            raise CommandError(
                f"{self.name} {name} needs argument {missing[0]!r}", field=f"args.{missing[0]}"
            )
        if spec.args is None:
            return bytes((spec.opcode,))
        try:
            packed: bytes = spec.args.build(dict(args))
        except ConstructError as e:
            where = _path_field(e, "args")
            value = _lookup(args, where)
            raise CommandError(
                f"{self.name} {name}: {value!r} is not a valid {where}", field=where
            ) from None
        return bytes((spec.opcode,)) + packed

    def decode_command(self, body: bytes) -> JsonObject:
        if not body:
            raise RemoteProtocolError(
                "COMMAND has no opcode", code=ErrorCode.MALFORMED, field="opcode"
            )
        entry = self._by_opcode.get(body[0])
        if entry is None:
            raise RemoteProtocolError(
                f"{self.name} has no opcode 0x{body[0]:02x}",
                code=ErrorCode.MALFORMED,
                field="opcode",
            )
        name, spec = entry
        if spec.args is None:
            if len(body) != 1:
                raise RemoteProtocolError(
                    f"{name} takes no arguments", code=ErrorCode.MALFORMED, field="args"
                )
            return {"name": name}
        try:
            args = Struct("a" / spec.args, Terminated).parse(body[1:])["a"]
        except ConstructError as e:
            raise RemoteProtocolError(
                f"{name} arguments do not fit: {_reason(e)}",
                code=ErrorCode.MALFORMED,
                field=_path_field(e, "args").replace("args.a", "args", 1),
            ) from None
        return {"name": name, "args": _to_json(args)}


def _compiled(struct: Construct) -> Construct:
    """The compiled form of ``struct``, or ``struct`` itself if it cannot be compiled."""
    try:
        return struct.compile()
    except Exception:  # construct raises several types for what it cannot compile
        return struct


def _reason(error: ConstructError) -> str:
    # construct prefixes its messages with "Error in path ...\n"; keep the last line.
    return str(error).strip().splitlines()[-1]


def _lookup(args: Mapping[str, Any], where: str) -> Any:
    value: Any = args
    for part in where.split(".")[1:]:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            return None
    return value


# ---- the built-in protocols (docs/protocols.md) ----------------------------------------

#: The ACK status codes env-sensor and relay-4 devices answer with (docs/api.md §3.1);
#: 0 is success.
DEVICE_ACK_CODES: Mapping[int, str] = {
    1: "unknown command",  # an opcode the device does not implement
    2: "bad argument",  # a known command with an argument out of range
}

ENV_SENSOR = ConstructProtocol(
    "env-sensor",
    data=Struct(
        "temperature_c" / Scaled(Int16sb, 100),  # i16, 0.01 degC
        "humidity_pct" / Scaled(Int16ub, 100),  # u16, 0.01 %
        "battery_pct" / Integer(Int8ub, 0, 255),  # u8, %
    ),
    commands={
        # An interval of 0 s would mean "report without pause": refuse it.
        "set_interval": CommandSchema(0x01, Struct("seconds" / Integer(Int16ub, 1, 0xFFFF))),
        "reboot": CommandSchema(0x02),
    },
    # What the sensor can measure; outside, a reading is flagged (docs/api.md §3.1).
    ranges={"temperature_c": (-40, 85), "humidity_pct": (0, 100), "battery_pct": (0, 100)},
    ack_codes=DEVICE_ACK_CODES,
)

RELAY_4 = ConstructProtocol(
    "relay-4",
    data=Struct("channels" / ChannelMask(Int8ub, 4)),  # u8 bitmask, bit i = channel i
    commands={
        "set": CommandSchema(0x01, Struct("channel" / Integer(Int8ub, 0, 3), "on" / Boolean())),
    },
    ack_codes=DEVICE_ACK_CODES,
)

ENV_SENSOR.mqtt_entities = (
    {
        "component": "sensor",
        "key": "temperature",
        "name": "Temperature",
        "device_class": "temperature",
        "unit_of_measurement": "\u00b0C",
        "state_class": "measurement",
        "value_template": "{{ value_json.data.temperature_c }}",
    },
    {
        "component": "sensor",
        "key": "humidity",
        "name": "Humidity",
        "device_class": "humidity",
        "unit_of_measurement": "%",
        "state_class": "measurement",
        "value_template": "{{ value_json.data.humidity_pct }}",
    },
    {
        "component": "sensor",
        "key": "battery",
        "name": "Battery",
        "device_class": "battery",
        "unit_of_measurement": "%",
        "state_class": "measurement",
        "value_template": "{{ value_json.data.battery_pct }}",
    },
)
# ON/OFF of each switch are the relay's own ``set`` commands: no translation in the bridge.
RELAY_4.mqtt_entities = tuple(
    {
        "component": "switch",
        "key": f"channel_{i}",
        "name": f"Channel {i}",
        "value_template": f"{{{{ 'ON' if value_json.data.channels[{i}] else 'OFF' }}}}",
        "state_on": "ON",
        "state_off": "OFF",
        "payload_on": json.dumps({"name": "set", "args": {"channel": i, "on": True}}),
        "payload_off": json.dumps({"name": "set", "args": {"channel": i, "on": False}}),
    }
    for i in range(4)
)

_registry: dict[str, Protocol] = {}
_registry_lock = threading.Lock()


def register_protocol(protocol: Protocol, *, replace: bool = False) -> None:
    """Make ``protocol`` known by its name. Registering a taken name needs ``replace``."""
    with _registry_lock:
        if protocol.name in _registry and not replace:
            raise ValueError(f"protocol {protocol.name!r} is already registered")
        _registry[protocol.name] = protocol


def get_protocol(name: str) -> Protocol:
    """The protocol registered under ``name``, or a hex carrier for an unknown one."""
    found = _registry.get(name)
    return found if found is not None else HexProtocol(name)


def known_protocols() -> list[str]:
    """Names of the registered protocols."""
    return sorted(_registry)


register_protocol(ENV_SENSOR)
register_protocol(RELAY_4)
