"""How a batch of telemetry is written in one entry of the cluster's log.

An entry (kind ``t``) carries a batch in two fields: ``h``, the messages'
headers as one JSON array of ``[device, protocol, ts, seq]``, and ``m``,
their data as JSON, one line each (JSON never holds a raw newline: it is
escaped inside strings, so splitting on it is exact). A reader decodes the
headers with one ``json.loads`` per batch, not one per message. See
docs/cluster.md ("One log, one sequencer").

The previous format (kind ``b``: one line per message, its header as a JSON
array, a tab, its data) is still read, so a log written by an older node is
not lost on a newer one.
"""

from __future__ import annotations

import json
from typing import Any

from ..hub.messages import dumps

_encode = dumps  # compact JSON, set up once (gateway/hub/messages.py)

#: One message of a batch: device, protocol, ts (unix ms), seq, data as JSON.
Line = tuple[str, str, int, int, str]


def encode_batch(lines: list[Line]) -> tuple[str, str]:
    """The entry's ``h`` and ``m`` fields for these messages, in order."""
    heads = _encode([[device, protocol, ts, seq] for device, protocol, ts, seq, _ in lines])
    return heads, "\n".join(line[4] for line in lines)


def _malformed(what: Any) -> ValueError:
    return ValueError(f"malformed telemetry batch: {str(what)[:80]!r}")


def decode_batch(heads_json: str, data: str) -> list[Line]:
    """The messages of a batch; raises ``ValueError`` for a malformed one."""
    try:
        heads = json.loads(heads_json)
    except ValueError:
        raise _malformed(heads_json) from None
    datas = data.split("\n")
    if not isinstance(heads, list) or len(heads) != len(datas):
        raise _malformed(heads_json)
    out: list[Line] = []
    for head, data_json in zip(heads, datas, strict=True):
        if not (isinstance(head, list) and len(head) == 4):
            raise _malformed(head)
        device, protocol, ts, seq = head
        if not (
            isinstance(device, str)
            and isinstance(protocol, str)
            and type(ts) is int
            and type(seq) is int
        ):
            raise _malformed(head)
        out.append((device, protocol, ts, seq, data_json))
    return out


def decode_line(line: str) -> Line:
    """One message of an entry of the previous format (kind ``b``); raises ``ValueError``
    for a malformed one."""
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
    """The lines of an entry of the previous format (decode each with ``decode_line``)."""
    return payload.split("\n")
