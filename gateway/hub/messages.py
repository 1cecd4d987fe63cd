"""Dashboard JSON: requests parsed and checked, replies and events encoded (docs/api.md §3).

Everything the WebSocket and the HTTP API say to a client is built here, so
the wire format has one home; the routing parts only pass typed values.
Telemetry is encoded to JSON once and the same text goes to every dashboard.
"""

from __future__ import annotations

import enum
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from devices import CommandStatus
from frames import valid_client_id, valid_protocol_name

from .records import TelemetryRecord


def now_ms() -> int:
    """Unix time in milliseconds (the ``ts`` of docs/api.md §3)."""
    return int(time.time() * 1000)


def _not_json(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)``, set up once.

    ``json.dumps`` with any option builds a JSONEncoder per call, and even a
    JSONEncoder built once builds its C encoder again on every ``encode``:
    half of the 2 us one env-sensor reading took, on every telemetry message.
    The C encoder is built once here. It checks no circular references: what
    it encodes is decoded from frames or parsed from JSON, never cyclic (too
    deep still raises RecursionError, as before).
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (another Python): the plain way
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    chunks = make(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    join = "".join

    def encode(obj: Any) -> str:
        return join(chunks(obj, 0))

    return encode


_encode = _compact_encoder()


def dumps(obj: Any) -> str:
    """Compact JSON, as sent on the wire."""
    return _encode(obj)


class ErrorCode(enum.StrEnum):
    """Dashboard error codes (docs/api.md §3.1)."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"  # the gateway could not carry out the request (storage failing)


class ClientError(Exception):
    """A request the hub refuses: the client's fault; becomes ``{"op":"error",...}``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---- telemetry --------------------------------------------------------------------------------


# A device or protocol name as a JSON string, encoded once rather than once per
# message (two encodes were 0.6 us of every telemetry message); bounded, so a
# fleet larger than the cache only costs the encode again.
_name_json = functools.lru_cache(maxsize=8192)(_encode)


@functools.lru_cache(maxsize=1024)
def _names_json(names: tuple[str, ...]) -> str:
    # A protocol has few fields, so few combinations are ever flagged: each is
    # encoded once, not once per message (a device may be out of range for hours).
    return _encode(list(names))


def telemetry_text(
    rec: TelemetryRecord, data_json: str, out_of_range: tuple[str, ...] | None = None
) -> str:
    """``dumps(telemetry_message(rec, out_of_range))``, given ``data_json = dumps(rec.data)``.

    The data is encoded once, for the dashboards and for the storage row; the
    rest of the message is a few scalars.
    """
    if rec.offset is None:
        # Not yet sequenced: a cluster node's own telemetry while Redis is away
        # (docs/cluster.md, "Degraded mode").
        return _encode(telemetry_message(rec, out_of_range))
    if out_of_range:
        return (
            f'{{"op":"telemetry","device":{_name_json(rec.device)},'
            f'"protocol":{_name_json(rec.protocol)},"offset":{rec.offset:d},"ts":{rec.ts:d},'
            f'"seq":{rec.seq:d},"data":{data_json},"out_of_range":{_names_json(out_of_range)}}}'
        )
    return (
        f'{{"op":"telemetry","device":{_name_json(rec.device)},'
        f'"protocol":{_name_json(rec.protocol)},'
        f'"offset":{rec.offset:d},"ts":{rec.ts:d},"seq":{rec.seq:d},"data":{data_json}}}'
    )


def telemetry_message(
    rec: TelemetryRecord, out_of_range: Sequence[str] | None = None
) -> dict[str, Any]:
    """The ``telemetry`` event of docs/api.md §3.1, as a JSON object.

    ``out_of_range`` names the values outside their range; the key is left out
    when there are none.
    """
    message = {
        "op": "telemetry",
        "device": rec.device,
        "protocol": rec.protocol,
        "offset": rec.offset,
        "ts": rec.ts,
        "seq": rec.seq,
        "data": rec.data,
    }
    if out_of_range:
        message["out_of_range"] = list(out_of_range)
    return message


def presence_text(device: str, protocol: str, online: bool, ts: int, reason: str) -> str:
    """The ``presence`` event of docs/api.md §3.1."""
    return dumps(
        {
            "op": "presence",
            "device": device,
            "protocol": protocol,
            "online": online,
            "ts": ts,
            "reason": reason,
        }
    )


def command_status(
    request_id: Any,
    device: str,
    status: CommandStatus,
    command_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``command_status`` event (docs/api.md §3.1); ``extra``: ``code``, ``error``,
    ``message``. ``command_id`` is the gateway's id of the command (left out when
    the command has none: one queued by an older gateway)."""
    message: dict[str, Any] = {"op": "command_status", "id": request_id}
    if command_id is not None:
        message["command_id"] = command_id
    message["device"] = device
    message["status"] = str(status)
    message.update(extra)
    return message


def labels_text(device: str, labels: dict[str, Any]) -> str:
    """``{"op":"labels","device","labels"}``: a device's labels changed (docs/api.md §3.1)."""
    return dumps({"op": "labels", "device": device, "labels": labels})


def removed_text(device: str, reason: str) -> str:
    """``{"op":"removed","device","reason"}``: the gateway no longer knows a device
    (``deleted`` over the API, or ``unseen`` for ``forget_after``; docs/api.md §3.1)."""
    return dumps({"op": "removed", "device": device, "reason": reason})


def reply(op: str, request_id: Any, body: dict[str, Any]) -> dict[str, Any]:
    """A reply to a request: its ``op``, the request's ``id`` when it had one, then ``body``."""
    out: dict[str, Any] = {"op": op}
    if request_id is not None:
        out["id"] = request_id
    out.update(body)
    return out


def error_message(request_id: Any, code: ErrorCode, message: str) -> dict[str, Any]:
    """``{"op":"error","id","code","message"}``."""
    return {"op": "error", "id": request_id, "code": str(code), "message": message}


# ---- requests ---------------------------------------------------------------------------------


class TargetKind(enum.StrEnum):
    """What a subscription names (docs/api.md §3.2)."""

    DEVICE = "device"
    PROTOCOL = "protocol"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Target:
    """A subscription target: one device, one protocol, or everything (``value`` is "")."""

    kind: TargetKind
    value: str = ""

    def matches(self, device: str, protocol: str) -> bool:
        """True when telemetry of ``device`` speaking ``protocol`` falls under this target."""
        kind = self.kind
        if kind is TargetKind.ALL:
            return True
        return self.value == (device if kind is TargetKind.DEVICE else protocol)

    def echo(self) -> dict[str, Any]:
        """The target as the reply echoes it."""
        if self.kind is TargetKind.ALL:
            return {"all": True}
        return {str(self.kind): self.value}


ALL: Final = Target(TargetKind.ALL)

# Offsets are 64-bit (SQLite INTEGER): a bigger number can name no offset.
MAX_OFFSET: Final = 2**63 - 1


def request_id_of(msg: Any) -> str | int | None:
    """The ``id`` a reply echoes: a string or number, else none."""
    if not isinstance(msg, dict):
        return None
    rid = msg.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        return None
    return rid


def parse_target(msg: dict[str, Any]) -> Target:
    """The target of a subscribe/unsubscribe request."""
    keys = [k for k in ("device", "protocol", "all") if k in msg]
    if len(keys) != 1:
        raise ClientError(
            ErrorCode.BAD_REQUEST, "give exactly one of 'device', 'protocol' or 'all': true"
        )
    key = keys[0]
    value = msg[key]
    if key == "all":
        if value is not True:
            raise ClientError(ErrorCode.BAD_REQUEST, "'all' must be true")
        return ALL
    if not isinstance(value, str):
        raise ClientError(ErrorCode.BAD_REQUEST, f"'{key}' must be a string")
    if key == "device" and not valid_client_id(value):
        raise ClientError(ErrorCode.BAD_REQUEST, "'device' is not a valid client_id")
    if key == "protocol" and not valid_protocol_name(value):
        raise ClientError(ErrorCode.BAD_REQUEST, "'protocol' is not a valid protocol name")
    return Target(TargetKind(key), value)


def parse_since(msg: dict[str, Any]) -> int | None:
    """The optional ``since`` offset of a subscribe request."""
    since = msg.get("since")
    if since is None:
        return None
    if isinstance(since, bool) or not isinstance(since, int) or not -1 <= since <= MAX_OFFSET:
        raise ClientError(
            ErrorCode.BAD_REQUEST, "'since' must be an offset (an integer, -1 .. 2**63-1)"
        )
    return since


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A checked command request: to one ``device`` or every online device of ``protocol``."""

    request_id: str | int | None
    command: dict[str, Any]
    device: str | None = None
    protocol: str | None = None


def parse_command(msg: dict[str, Any]) -> CommandRequest:
    """``{"id", "device" | "protocol", "command"}`` (docs/api.md §3.2 and §4)."""
    request_id = msg.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, str | int)
    ):
        raise ClientError(ErrorCode.BAD_REQUEST, "'id' must be a string or number")
    command = msg.get("command")
    if not isinstance(command, dict):
        raise ClientError(ErrorCode.BAD_REQUEST, "'command' must be a JSON object")
    if ("device" in msg) == ("protocol" in msg):
        raise ClientError(ErrorCode.BAD_REQUEST, "give exactly one of 'device' or 'protocol'")
    if "device" in msg:
        device = msg["device"]
        if not isinstance(device, str):
            raise ClientError(ErrorCode.BAD_REQUEST, "'device' must be a string")
        return CommandRequest(request_id, command, device=device)
    protocol = msg["protocol"]
    if not isinstance(protocol, str):
        raise ClientError(ErrorCode.BAD_REQUEST, "'protocol' must be a string")
    return CommandRequest(request_id, command, protocol=protocol)
