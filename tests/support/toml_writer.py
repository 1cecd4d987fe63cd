"""A gateway config, given as a dict, written as TOML (docs/configuration.md).

The standard library reads TOML (``tomllib``) but does not write it, and the
gateway's config is small: tables, arrays of tables (``[[serial]]``) and
scalars. This writer covers exactly the values ``tomllib`` gives back, so
that ``tomllib.loads(dumps(table)) == table`` (tests/support/test_toml_writer.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# TOML basic strings cannot hold these as they are (the TOML spec, "String").
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n"}
_SHORT_ESCAPES |= {"\f": "\\f", "\r": "\\r"}


def dumps(table: Mapping[str, Any]) -> str:
    """``table`` as a TOML document.

    Values may be bools, ints, floats, strings, lists and mappings (nested to
    any depth); a non-empty list of mappings becomes an array of tables.
    Anything else is a TypeError rather than a file the gateway misreads.
    """
    lines: list[str] = []
    _table(lines, (), table)
    return "\n".join(lines) + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    # Plain keys first: a key after a [header] line would belong to that table.
    for key, value in table.items():
        if not isinstance(value, Mapping) and not _is_table_array(value):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if isinstance(value, Mapping):
            lines.append(f"[{_dotted((*path, key))}]")
            _table(lines, (*path, key), value)
        elif _is_table_array(value):
            for entry in value:
                lines.append(f"[[{_dotted((*path, key))}]]")
                _table(lines, (*path, key), entry)


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(_key(part) for part in path)


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys are strings, not {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _value(value: Any) -> str:
    # bool before int: True is an int to Python.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise TypeError(f"TOML integers are 64-bit: {value}")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form, always with "." or "e"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # inside an inline array only
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
