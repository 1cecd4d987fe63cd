"""The gateway's configuration: TOML file, environment secrets, flags, and their checks.

Users meet this module through error messages, so most tests assert on what a
message says: the key that is wrong and the file it came from. The last tests
keep docs/configuration.md and the dataclasses in step.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from devices.config import HeartbeatOverrides
from gateway.cli import build_parser, config_from_args
from gateway.config import (
    AuthSection,
    ClusterSection,
    ConfigError,
    DashboardsSection,
    DevicesSection,
    GatewayConfig,
    HttpSection,
    LabelsSection,
    ProtocolSection,
    SerialSection,
    StorageSection,
    TlsListenerSection,
    TlsSection,
    build_config,
    load_file,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DOC = ROOT / "docs" / "configuration.md"


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, environ: dict[str, str] | None = None) -> GatewayConfig:
    """Load a file the way ``serve --config`` does, with an explicit environment."""
    return build_config(load_file(path), source=str(path), environ=environ or {})


def load_error(tmp_path: Path, text: str) -> tuple[str, Path]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value), path


def from_flags(*argv: str, environ: dict[str, str] | None = None) -> GatewayConfig:
    args = build_parser().parse_args(["serve", *argv])
    return config_from_args(args, environ=environ or {})


# ---- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("http_prot = 8080\n", "http_prot"),
        ("[auth]\ntokne = 'x'\n", "auth.tokne"),
        ("[devices]\nheartbeat_s = 30\n", "devices.heartbeat_s"),
        ("[dashboards]\nqueue = 10\n", "dashboards.queue"),
        ("[storage]\nretention = 5\n", "storage.retention"),
        ("[[serial]]\nurl = '/dev/ttyUSB0'\nbaudrate = 9600\n", "serial[0].baudrate"),
        (
            "[[serial]]\nurl = '/dev/ttyUSB0'\n[[serial]]\nurl = '/dev/ttyUSB1'\nspeed = 1\n",
            "serial[1].speed",
        ),
        ("[metrics]\nport = 9100\n", "metrics"),
    ],
)
def test_unknown_key_names_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    message, path = load_error(tmp_path, text)
    assert f"unknown key {key!r}" in message
    assert str(path) in message


# ---- wrong types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('http_port = "8080"\n', "http_port", "an integer"),  # a string for a port
        ("device_port = true\n", "device_port", "an integer"),  # a bool is not an int
        ("[devices]\nheartbeat = 30.5\n", "devices.heartbeat", "an integer"),  # nor a float
        ("[devices]\nhello_timeout = true\n", "devices.hello_timeout", "a number"),
        ("[dashboards]\ncompression = 'yes'\n", "dashboards.compression", "true or false"),
        ("data_dir = 5\n", "data_dir", "a string"),
        ("protocols = 'my_protocols'\n", "protocols", "a list"),
        ("protocols = [1]\n", "protocols[0]", "a string"),
        ("[auth]\nallowed_origins = 'https://a.example'\n", "auth.allowed_origins", "a list"),
        ("[devices]\ntokens = ['a']\n", "devices.tokens", "a table"),
        ("[devices.tokens]\nsensor-1 = 5\n", "devices.tokens.sensor-1", "a string"),
        ("[[serial]]\nurl = '/dev/ttyUSB0'\nbaud = 'fast'\n", "serial[0].baud", "an integer"),
        ("auth = 5\n", "auth", "a table"),
        ("serial = '/dev/ttyUSB0'\n", "serial", "[[serial]] tables"),
        ("serial = [5]\n", "serial[0]", "a table"),
    ],
)
def test_wrong_type_names_the_key_and_the_file(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    message, path = load_error(tmp_path, text)
    assert message.startswith(f"{key} in {path}"), message
    assert expected in message


def test_an_integer_is_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[devices]\nhello_timeout = 2\n"))
    assert config.devices.hello_timeout == 2.0
    assert isinstance(config.devices.hello_timeout, float)


# ---- the file itself ---------------------------------------------------------------------------


def test_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "host = '127.0.0.1'\nhttp_port = = 8080\n")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "not valid TOML" in message
    assert "line 2" in message  # tomllib's own position, kept for the user


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"config file {path} does not exist")):
        load_file(path)


def test_unreadable_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"cannot read config file {tmp_path}")):
        load_file(tmp_path)  # a directory


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")) == GatewayConfig()


# ---- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("http_port = 70000\n", ["http_port", "0..65535", "70000"]),
        ("device_port = -1\n", ["device_port", "0..65535"]),
        ("[devices]\nheartbeat = 0\n", ["devices", "heartbeat", "1..65535"]),
        ("[devices]\nmisses = 0\n", ["devices", "misses", ">= 1"]),
        ("[devices]\nhello_timeout = 0\n", ["devices", "hello_timeout", "> 0"]),
        (
            "[auth]\ntoken = 'same'\nviewer_token = 'same'\n",
            ["auth.token", "auth.viewer_token", "differ"],
        ),
        ("[auth]\ntoken = ''\n", ["auth.token", "empty"]),
        ("[devices]\ncrc = 'crc-99'\n", ["devices", "unknown CRC", "crc-99", "modbus"]),
        ("[devices]\ncrc_byteorder = 'middle'\n", ["devices", "crc_byteorder", "'middle'"]),
        (
            "[[serial]]\nurl = '/dev/ttyUSB0'\ncrc = 'crc-99'\n",
            ["serial[0]", "unknown CRC", "crc-99"],
        ),
        ("[[serial]]\nbaud = 9600\n", ["serial[0].url", "required"]),
        ("[[serial]]\nurl = '/dev/ttyUSB0'\nbaud = 0\n", ["serial[0]", "baud"]),
        (
            "[[serial]]\nurl = '/dev/ttyUSB0'\nclient_id = 'meter-1'\n",
            ["serial[0]", "client_id and protocol"],
        ),
        ("[[serial]]\nurl = '/dev/ttyUSB0'\nframe_timeout = 0\n", ["serial[0].frame_timeout"]),
        ("[[serial]]\nurl = '/dev/ttyUSB0'\nbackoff_base = 0\n", ["serial[0]", "backoff"]),
        ("[dashboards]\nqueue_size = 0\n", ["dashboards", "queue_size"]),
        ("[dashboards]\ncommands_per_second = 0\n", ["dashboards", "commands_per_second"]),
        ("[dashboards]\nmax_message = 10\n", ["dashboards.max_message", ">= 1024"]),
        ("[dashboards]\nbatch_max_items = 0\n", ["dashboards.batch_max_items"]),
        ("[devices]\nmax_connections = 0\n", ["devices.max_connections"]),
        (
            "[http]\nmax_connections = 1000\n",
            ["http.max_connections (1000)", "dashboards.max_dashboards (1000)"],
        ),
        ("[http]\nidle_timeout = 0\n", ["http.idle_timeout", "> 0"]),
        ("[storage]\nbatch_rows = 0\n", ["storage.batch_rows"]),
        ("[storage]\nretention_days = 0\n", ["retention_days"]),
        ("log_level = 'loud'\n", ["log_level", "'loud'"]),
        ("demo = -1\n", ["demo", ">= 0"]),
    ],
)
def test_bad_value_is_a_clear_error(tmp_path: Path, text: str, words: list[str]) -> None:
    message, path = load_error(tmp_path, text)
    for word in words:
        assert word in message, message
    assert str(path) in message


def test_flags_are_checked_like_the_file() -> None:
    with pytest.raises(ConfigError, match="must differ"):
        from_flags("--token", "t", "--viewer-token", "t")


# ---- environment and precedence ----------------------------------------------------------------


def test_secrets_come_from_the_environment() -> None:
    environ = {
        "IOT_GATEWAY_TOKEN": "op-env",
        "IOT_GATEWAY_VIEWER_TOKEN": "view-env",
        "IOT_GATEWAY_DEVICE_TOKEN": "dev-env",
    }
    config = build_config({}, environ=environ)
    assert config.auth.token == "op-env"
    assert config.auth.viewer_token == "view-env"
    assert config.devices.token == "dev-env"
    assert config.session_config().auth.token == "dev-env"


def test_empty_environment_variables_are_ignored() -> None:
    environ = {"IOT_GATEWAY_TOKEN": "", "IOT_GATEWAY_DEVICE_TOKEN": ""}
    config = build_config({"auth": {"token": "from-file"}}, environ=environ)
    assert config.auth.token == "from-file"
    assert config.devices.token is None


def test_an_explicit_environment_is_the_only_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # The process environment must not leak into a build given environ=.
    monkeypatch.setenv("IOT_GATEWAY_TOKEN", "from-process")
    assert build_config({}, environ={}).auth.token is None


def test_flags_override_environment_which_overrides_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "http_port = 1111\n[auth]\ntoken = 'file-op'\nviewer_token = 'file-view'\n"
        "[devices]\ntoken = 'file-dev'\n",
    )
    environ = {"IOT_GATEWAY_TOKEN": "env-op", "IOT_GATEWAY_DEVICE_TOKEN": "env-dev"}

    only_file = from_flags("--config", str(path))
    assert (only_file.auth.token, only_file.auth.viewer_token) == ("file-op", "file-view")
    assert only_file.devices.token == "file-dev"

    with_env = from_flags("--config", str(path), environ=environ)
    assert with_env.auth.token == "env-op"
    assert with_env.auth.viewer_token == "file-view"  # not in the environment: file stays
    assert with_env.devices.token == "env-dev"

    with_flags = from_flags(
        "--config",
        str(path),
        "--token",
        "flag-op",
        "--device-token",
        "flag-dev",
        "--http-port",
        "2222",
        environ=environ,
    )
    assert with_flags.auth.token == "flag-op"
    assert with_flags.devices.token == "flag-dev"
    assert with_flags.http_port == 2222


def test_every_flag_lands_in_the_config(tmp_path: Path) -> None:
    config = from_flags(
        "--host",
        "0.0.0.0",
        "--http-port",
        "0",
        "--device-port",
        "7001",
        "--data-dir",
        str(tmp_path),
        "--token",
        "op",
        "--viewer-token",
        "view",
        "--device-token",
        "dev",
        "--demo",
        "3",
        "--log-level",
        "debug",
    )
    assert (config.host, config.http_port, config.device_port) == ("0.0.0.0", 0, 7001)
    assert config.data_dir == str(tmp_path)
    assert (config.auth.token, config.auth.viewer_token, config.devices.token) == (
        "op",
        "view",
        "dev",
    )
    assert (config.demo, config.log_level) == (3, "debug")


def test_serial_flags_add_to_the_files_ports(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[[serial]]\nurl = '/dev/ttyUSB0'\nbaud = 9600\ncrc = 'crc-16'\n",
    )
    config = from_flags(
        "--config",
        str(path),
        "--serial",
        "/dev/ttyACM0,client_id=meter-1,protocol=env-sensor,baud=19200",
        "--serial",
        "socket://127.0.0.1:4000",
    )
    assert [s.url for s in config.serial] == [
        "/dev/ttyUSB0",
        "/dev/ttyACM0",
        "socket://127.0.0.1:4000",
    ]
    first, fixed, plain = config.serial_ports()
    assert (first.baud, first.frame.crc) == (9600, "crc-16")
    assert (fixed.client_id, fixed.protocol, fixed.baud) == ("meter-1", "env-sensor", 19200)
    assert fixed.fixed
    assert (plain.client_id, plain.baud) == (None, 115200)


def test_heartbeat_overrides_from_the_file_and_the_serial_flag(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[devices.heartbeat_overrides]\n"
        "protocols = {'env-sensor' = 300}\n"
        "devices = {'sensor-7' = 600}\n"
        "[[serial]]\nurl = '/dev/ttyUSB0'\nheartbeat = 120\n",
    )
    config = from_flags("--config", str(path), "--serial", "/dev/ttyACM0,heartbeat=45")
    overrides = config.devices.heartbeat_overrides
    assert (overrides.protocols, overrides.devices) == ({"env-sensor": 300}, {"sensor-7": 600})
    assert [p.heartbeat for p in config.serial_ports()] == [120, 45]
    session = config.session_config()
    assert session.heartbeat_for("sensor-7", "env-sensor", 120) == 600
    assert session.heartbeat_for("s-1", "env-sensor", 120) == 120
    assert session.heartbeat_for("s-1", "env-sensor") == 300
    assert session.heartbeat_for("r-1", "relay-4") == 30


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "[devices.heartbeat_overrides]\nprotocols = {'env-sensor' = 0}\n",
            ["devices.heartbeat_overrides.protocols.env-sensor", "1..65535", "not 0"],
        ),
        (
            "[devices.heartbeat_overrides]\ndevices = {'s-1' = '300'}\n",
            ["devices.heartbeat_overrides.devices.s-1", "expected an integer"],
        ),
        ("[[serial]]\nurl = '/dev/x'\nheartbeat = 70000\n", ["serial[0]", "heartbeat", "70000"]),
        ("[devices.heartbeat_overrides]\nports = {}\n", ["devices.heartbeat_overrides.ports"]),
    ],
)
def test_bad_heartbeat_overrides_name_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    for word in words:
        assert word in str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("table", "clash"),
    [
        ({"http_port": 7000, "device_port": 7000}, True),
        ({"http_port": 7000, "device_port": 7000, "device_host": "0.0.0.0"}, True),
        ({"http_port": 7000, "device_port": 7000, "device_host": "127.0.0.2"}, False),
        ({"http_port": 0, "device_port": 0}, False),  # each gets its own from the system
    ],
)
def test_one_port_for_both_listeners_is_a_config_error(table: dict[str, Any], clash: bool) -> None:
    if not clash:
        build_config(table, environ={})
        return
    with pytest.raises(ConfigError, match="http_port and device_port are both 7000"):
        build_config(table, environ={})


# ---- defaults ----------------------------------------------------------------------------------


def test_defaults_are_those_of_the_protocol() -> None:
    config = build_config({}, environ={})
    session = config.session_config()
    assert session.hello_timeout == 5.0  # docs/protocol.md §4: HELLO within 5 s
    assert session.heartbeat == 30  # docs/protocol.md §4: heartbeat 30 s
    assert session.misses == 3  # docs/protocol.md §4: silence for 3 x interval
    assert session.silence_limit == 90.0
    assert session.ack_timeout == 10.0  # docs/api.md §3: timeout, no ACK in 10 s
    assert session.serial_frame_timeout == 0.2  # docs/protocol.md §2: 200 ms on serial
    assert session.frame_timeout == 1.0  # docs/protocol.md §2: 1 s on TCP
    assert session.auth.token is None  # no device token unless configured
    hub = config.hub_config()
    assert hub.queue_size == 1024  # issue 4: per-dashboard queue
    assert hub.command_ttl == 3600.0  # docs/api.md §3: queued until its TTL, default 1 h
    assert hub.commands_per_second == 20.0  # issue 4: commands per dashboard per second
    assert config.dashboards.max_message == 64 * 1024  # docs/api.md §3: over 64 KiB -> 1009
    assert config.dashboards.compression is False  # issue 4: off by default
    assert config.dashboards.drain_timeout == 30.0  # issue 4: not drained for 30 s
    frame = config.frame_options()  # docs/protocol.md §1: CRC-16/MODBUS, low byte first
    assert (frame.crc, frame.crc_byteorder, frame.crc_covers_header) == ("modbus", "little", False)
    # docs/configuration.md, Command-line flags: the flags' defaults
    assert (config.host, config.http_port, config.device_port) == ("127.0.0.1", 8080, 7000)
    assert config.data_dir == "./data"
    assert config.auth.token is None  # generated at start
    assert config.auth.allowed_origins == []  # only no Origin, or same origin
    # issue 4: retention and the storage batch window
    assert (config.storage.retention_per_device, config.storage.retention_days) == (10_000, 7.0)
    assert (config.storage.batch_interval, config.storage.batch_rows) == (0.02, 500)
    assert config.serial == []


def test_a_serial_port_defaults_to_the_protocols_framing() -> None:
    config = build_config({"serial": [{"url": "/dev/ttyUSB0"}]}, environ={})
    (port,) = config.serial_ports()
    assert port.baud == 115200
    assert port.frame_timeout is None  # falls back to devices.serial_frame_timeout
    assert (port.frame.crc, port.frame.crc_byteorder) == ("modbus", "little")
    assert not port.fixed


# ---- docs/configuration.md ---------------------------------------------------------------------

SECTIONS: dict[str, type[Any]] = {
    "Top level": GatewayConfig,
    "[auth]": AuthSection,
    "[devices]": DevicesSection,
    "[devices.heartbeat_overrides]": HeartbeatOverrides,
    "[[serial]]": SerialSection,
    "[dashboards]": DashboardsSection,
    "[http]": HttpSection,
    "[storage]": StorageSection,
    "[cluster]": ClusterSection,
    '[labels."ID"]': LabelsSection,
    '[protocols."NAME"]': ProtocolSection,
    "[tls]": TlsSection,
    "[tls.http]": TlsListenerSection,
    "[tls.devices]": TlsListenerSection,
}


def _is_section(tp: Any) -> bool:
    if dataclasses.is_dataclass(tp):
        return True
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    # [[serial]] (a list of tables) and [labels."ID"] (a table of tables, by name).
    return bool(args) and (
        (origin is list and dataclasses.is_dataclass(args[0]))
        or (origin is dict and dataclasses.is_dataclass(args[-1]))
    )


def _in_file(f: dataclasses.Field[Any]) -> bool:
    """False for a field the loader fills from elsewhere (not a key of its section)."""
    return bool(f.metadata.get("section", True))


def _keys(cls: type[Any]) -> dict[str, Any]:
    """The plain keys of a section (its sub-tables are sections of their own), with defaults."""
    hints = typing.get_type_hints(cls)
    instance = cls()
    return {
        f.name: getattr(instance, f.name)
        for f in dataclasses.fields(cls)
        if not _is_section(hints[f.name]) and _in_file(f)
    }


def _doc_tables() -> dict[str, dict[str, str]]:
    """Per ``## heading`` of the doc: the keys of its table and their default cells."""
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in CONFIG_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            heading = line[3:].strip().strip("`")  # "## `[labels."ID"]`" too
            current = tables.setdefault(heading, {}) if heading in SECTIONS else None
            continue
        row = re.match(r"\|\s*`([a-z_]+)`\s*\|[^|]*\|\s*([^|]*?)\s*\|", line)
        if current is not None and row:
            current[row.group(1)] = row.group(2)
    return tables


def test_every_config_key_is_documented_with_its_default() -> None:
    tables = _doc_tables()
    assert set(tables) == set(SECTIONS), "docs/configuration.md lacks a section heading"
    for heading, cls in SECTIONS.items():
        keys = _keys(cls)
        documented = tables[heading]
        assert set(documented) == set(keys), f"{heading}: doc and {cls.__name__} differ"
        for key, default in keys.items():
            cell = documented[key]
            literal = re.fullmatch(r"`(.+)`", cell)
            if literal is None:
                # Prose ("unset", "required"): only for keys without a value of their own.
                assert default in (None, ""), f"{heading} {key}: give the default {default!r}"
            else:
                value = tomllib.loads(f"v = {literal.group(1)}")["v"]
                assert value == default, f"{heading} {key}: doc says {value!r}, code {default!r}"


def _toml_blocks(path: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", path.read_text(encoding="utf-8"), re.DOTALL)


def _set_keys(table: dict[str, Any], cls: type[Any]) -> set[str]:
    hints = typing.get_type_hints(cls)
    missing = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if not _in_file(f):
            continue
        if f.name not in table:
            missing.add(f"{cls.__name__}.{f.name}")
        elif dataclasses.is_dataclass(tp):
            missing |= _set_keys(table[f.name], typing.cast(type[Any], tp))
        elif _is_section(tp) and typing.get_origin(tp) is dict:
            for entry in table[f.name].values():
                missing |= _set_keys(entry, typing.get_args(tp)[-1])
        elif _is_section(tp):
            for entry in table[f.name]:
                missing |= _set_keys(entry, typing.get_args(tp)[0])
    return missing


def test_the_complete_example_loads_and_sets_every_key(tmp_path: Path) -> None:
    complete = [b for b in _toml_blocks(CONFIG_DOC) if "[storage]" in b and "[[serial]]" in b]
    assert len(complete) == 1, "docs/configuration.md needs one complete gateway.toml"
    path = write(tmp_path, complete[0])
    config = load(path)
    assert _set_keys(load_file(path), GatewayConfig) == set()
    # [protocols."NAME"] tables go to protocol_settings: each sets its keys too.
    for settings in load_file(path)["protocols"].values():
        if isinstance(settings, dict):
            assert _set_keys(settings, ProtocolSection) == set()
    assert config.serial_ports()  # every section builds what its layer takes


@pytest.mark.parametrize("doc", ["configuration.md", "deployment.md"])
def test_every_toml_snippet_in_the_docs_loads(tmp_path: Path, doc: str) -> None:
    blocks = _toml_blocks(ROOT / "docs" / doc)
    assert blocks
    for i, block in enumerate(blocks):
        load(write(tmp_path, block, f"snippet{i}.toml"))
