"""How a batch of telemetry is written in one entry of the cluster's log.

One line per message: its header ``[device, protocol, ts, seq]`` as a JSON
array, a tab, its data as JSON. JSON never holds a raw tab or newline (they
are escaped inside strings), so splitting on them is exact. See
docs/cluster.md ("One log, one sequencer").
"""

from __future__ import annotations

import json

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: One message of a batch: device, protocol, ts (unix ms), seq, data as JSON.
Line = tuple[str, str, int, int, str]


def encode_batch(lines: list[Line]) -> str:
    """The entry's ``m`` field for these messages, in order."""
    return "\n".join(
        f"{_encode([device, protocol, ts, seq])}\t{data_json}"
        for device, protocol, ts, seq, data_json in lines
    )


def decode_line(line: str) -> Line:
    """One message of a batch; raises ``ValueError`` for a malformed one."""
    try:
        head, data_json = line.split("\t", 1)
        device, protocol, ts, seq = json.loads(head)
    except ValueError:
        raise ValueError(f"malformed telemetry line {line[:80]!r}") from None
    if not (
        isinstance(device, str)
        and isinstance(protocol, str)
        and type(ts) is int
        and type(seq) is int
    ):
        raise ValueError(f"malformed telemetry line {line[:80]!r}")
    return device, protocol, ts, seq, data_json


def split_batch(payload: str) -> list[str]:
    """The lines of a batch (decode each with ``decode_line``)."""
    return payload.split("\n")
