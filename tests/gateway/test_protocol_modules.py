"""User protocols named in the config are imported at start; a bad name is a clear error."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import frames
from frames import protocols as registry
from gateway.cli import _load_protocols
from gateway.config import ConfigError

MODULE = """
from construct import Int8ub, Int16ub, Struct
from frames import CommandSchema, ConstructProtocol, Integer, Scaled, register_protocol

register_protocol(
    ConstructProtocol(
        "test-tank",
        data=Struct("level_pct" / Scaled(Int16ub, 10)),
        commands={"fill": CommandSchema(1, Struct("litres" / Integer(Int8ub, 1, 200)))},
    )
)
"""


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "tank_protocol.py").write_text(MODULE)
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("tank_protocol", None)
    registry._registry.pop("test-tank", None)


def test_configured_module_registers_its_protocol(module_dir: Path) -> None:
    _load_protocols(["tank_protocol"])
    tank = frames.get_protocol("test-tank")
    assert tank.decode_data(b"\x01\xf4") == {"level_pct": 50.0}
    assert tank.encode_command({"name": "fill", "args": {"litres": 20}}) == b"\x01\x14"
    with pytest.raises(frames.CommandError) as info:
        tank.encode_command({"name": "fill", "args": {"litres": 0}})
    assert info.value.field == "args.litres"


def test_missing_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no_such_protocol_module"):
        _load_protocols(["no_such_protocol_module"])
