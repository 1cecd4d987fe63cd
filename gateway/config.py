"""Gateway configuration: a TOML file (tomllib), CLI flags over it, secrets from the environment.

Every option lives in one frozen dataclass per section. The loader checks
each key against the dataclass fields, so an unknown key or a value of the
wrong type is an error that names the key and the file, never a silent default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices import SerialPortConfig, SessionConfig, TlsFiles
from devices.config import MAX_CONNECTIONS
from frames import FrameOptions, valid_client_id
from frames.backoff import BackoffPolicy

from .auth import parse_networks
from .cluster.config import ClusterConfig
from .hub import HubConfig
from .hub.registry import check_labels
from .mqtt import MqttConfig
from .storage import StorageConfig


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and where it came from."""


@dataclass(frozen=True, slots=True)
class AuthSection:
    """Dashboard tokens and allowed Origins (docs/api.md §1)."""

    token: str | None = None  # operator token; env IOT_GATEWAY_TOKEN
    viewer_token: str | None = None  # env IOT_GATEWAY_VIEWER_TOKEN
    allowed_origins: list[str] = field(default_factory=list)


def _default(cls: type[Any], name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``: each default is written once."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise AttributeError(f"{cls.__name__} has no field {name!r}")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class DevicesSection(SessionConfig):
    """The device port (its framing and connection cap) and the sessions' ``SessionConfig``.

    docs/protocol.md §4 gives the session defaults; ``token`` comes from
    ``IOT_GATEWAY_DEVICE_TOKEN`` too.
    """

    max_connections: int = MAX_CONNECTIONS
    crc: str = _default(FrameOptions, "crc")
    crc_byteorder: str = _default(FrameOptions, "crc_byteorder")
    crc_covers_header: bool = _default(FrameOptions, "crc_covers_header")

    def __post_init__(self) -> None:
        # Zero-argument super() fails in a slotted dataclass before Python 3.14.
        SessionConfig.__post_init__(self)
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {self.max_connections}")
        self.frame_options()  # an unknown CRC is refused now, not at the first frame

    def frame_options(self) -> FrameOptions:
        """Framing of the TCP device port."""
        return FrameOptions(self.crc, self.crc_byteorder, self.crc_covers_header)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class SerialSection:
    """One ``[[serial]]`` port: a ``SerialPortConfig`` as the file spells it (flat)."""

    url: str = ""
    baud: int = _default(SerialPortConfig, "baud")
    client_id: str | None = None
    protocol: str | None = None
    frame_timeout: float | None = None
    crc: str = _default(FrameOptions, "crc")
    crc_byteorder: str = _default(FrameOptions, "crc_byteorder")
    crc_covers_header: bool = _default(FrameOptions, "crc_covers_header")
    backoff_base: float = _default(BackoffPolicy, "base")
    backoff_cap: float = _default(BackoffPolicy, "cap")
    heartbeat: int | None = None  # this port's devices' heartbeat (docs/configuration.md)


@dataclass(frozen=True, slots=True)
class DashboardsSection(HubConfig):
    """Dashboard limits (the hub's own ``HubConfig``) and WebSocket options (docs/api.md §3)."""

    compression: bool = False
    max_message: int = 64 * 1024
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        # Zero-argument super() fails in a slotted dataclass before Python 3.14.
        HubConfig.__post_init__(self)
        if self.max_message < 1024:
            raise ValueError(f"max_message must be >= 1024, not {self.max_message}")
        if not self.drain_timeout > 0:
            raise ValueError("drain_timeout must be > 0")
        # 0 would make each dashboard's writer spin without ever sending.
        if self.batch_max_items < 1:
            raise ValueError(f"batch_max_items must be >= 1, not {self.batch_max_items}")


@dataclass(frozen=True, slots=True)
class HttpSection:
    """The HTTP port's connection limits (dashboards' WebSockets count among them)."""

    max_connections: int = 1500
    idle_timeout: float = 15.0  # no request in progress, or a request body not arriving
    # Reverse proxies (addresses or CIDRs) whose X-Forwarded-Proto and
    # X-Forwarded-Host the same-origin rule believes (docs/api.md §1).
    trusted_proxies: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TlsListenerSection:
    """``[tls.http]`` or ``[tls.devices]``: one listener's own certificate (docs/tls.md)."""

    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class TlsSection:
    """``[tls]``: certificates of both ports, device certificates and revocation (docs/tls.md).

    ``cert``/``key`` serve both ports unless ``[tls.http]`` or ``[tls.devices]``
    gives a listener its own. ``device_ca`` makes the device port require client
    certificates; ``crl`` and ``deny_list`` revoke some of them.
    """

    cert: str | None = None
    key: str | None = None
    device_ca: str | None = None
    crl: str | None = None
    deny_list: str | None = None  # a file of SHA-256 fingerprints, one a line
    handshake_timeout: float = 10.0
    http: TlsListenerSection = field(default_factory=TlsListenerSection)
    devices: TlsListenerSection = field(default_factory=TlsListenerSection)

    def __post_init__(self) -> None:
        for where, part in (("", self), ("http.", self.http), ("devices.", self.devices)):
            if (part.cert is None) != (part.key is None):
                raise ValueError(f"{where}cert and {where}key go together: give both or neither")
        if not self.handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be > 0, not {self.handshake_timeout}")
        if self.device_ca is not None and self.files("devices") is None:
            raise ValueError("device_ca needs a certificate for the device port (tls.cert/key)")
        for name, value in (("crl", self.crl), ("deny_list", self.deny_list)):
            if value is not None and self.device_ca is None:
                raise ValueError(f"{name} revokes device certificates: it needs tls.device_ca")

    def files(self, port: str) -> TlsFiles | None:
        """The files of listener ``port`` (``http`` or ``devices``); None: plain."""
        own = self.http if port == "http" else self.devices
        cert, key = (own.cert, own.key) if own.cert is not None else (self.cert, self.key)
        if cert is None or key is None:
            return None
        if port != "devices":
            return TlsFiles(cert, key)  # browsers need no client certificate
        return TlsFiles(cert, key, self.device_ca, self.crl, self.deny_list)


# [storage] is the storage engine's own settings: each default written once.
StorageSection = StorageConfig
#: ``[cluster]``: N nodes as one gateway through Redis (docs/cluster.md).
ClusterSection = ClusterConfig

# [mqtt] is the MQTT bridge's own settings (docs/mqtt.md).
MqttSection = MqttConfig


@dataclass(frozen=True, slots=True)
class LabelsSection:
    """One ``[labels."ID"]`` table: a device's display labels (docs/configuration.md)."""

    name: str | None = None
    location: str | None = None
    channels: list[str] | None = None  # one name per relay channel, in channel order


@dataclass(frozen=True, slots=True)
class ProtocolSection:
    """One ``[protocols."NAME"]`` table: settings of one device protocol.

    ``ranges`` maps a DATA field to ``[low, high]``: a value outside is flagged
    ``out_of_range`` (docs/api.md §3.1); it overrides the protocol's own range.
    """

    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything ``iot-gateway serve`` needs."""

    host: str = "127.0.0.1"
    device_host: str | None = None  # the device port's address; None: the same as host
    http_port: int = 8080
    device_port: int = 7000
    data_dir: str = "./data"
    log_level: str = "info"
    protocols: list[str] = field(default_factory=list)  # modules that register protocols
    # [protocols."NAME"] tables (the file's ``protocols`` may be a table: see
    # _split_protocols); filled from there, not a key of its own.
    protocol_settings: dict[str, ProtocolSection] = field(
        default_factory=dict, metadata={"section": False}
    )
    labels: dict[str, LabelsSection] = field(default_factory=dict)
    demo: int = 0
    auth: AuthSection = field(default_factory=AuthSection)
    devices: DevicesSection = field(default_factory=DevicesSection)
    serial: list[SerialSection] = field(default_factory=list)
    dashboards: DashboardsSection = field(default_factory=DashboardsSection)
    http: HttpSection = field(default_factory=HttpSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tls: TlsSection = field(default_factory=TlsSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)

    # ---- what the other layers take ------------------------------------------------------------

    def session_config(self) -> SessionConfig:
        """The device side's settings: the ``[devices]`` section is one."""
        return self.devices

    def frame_options(self) -> FrameOptions:
        """Framing of the TCP device port."""
        return self.devices.frame_options()

    def serial_ports(self) -> list[SerialPortConfig]:
        """The configured serial links."""
        return [_serial_port(s) for s in self.serial]

    def hub_config(self) -> HubConfig:
        """The routing core's limits (the ``[dashboards]`` section is one), with the
        ``[labels]`` and ``[protocols.NAME.ranges]`` it applies."""
        return dataclasses.replace(
            self.dashboards,
            labels={
                device: {"name": s.name, "location": s.location, "channels": s.channels}
                for device, s in self.labels.items()
            },
            ranges={name: dict(p.ranges) for name, p in self.protocol_settings.items() if p.ranges},
        )


ENV_SECRETS = {
    "IOT_GATEWAY_TOKEN": ("auth", "token"),
    "IOT_GATEWAY_VIEWER_TOKEN": ("auth", "viewer_token"),
    "IOT_GATEWAY_DEVICE_TOKEN": ("devices", "token"),
    # The broker's credentials (docs/mqtt.md): never only on the command line.
    "IOT_GATEWAY_MQTT_URL": ("mqtt", "url"),
    "IOT_GATEWAY_MQTT_USERNAME": ("mqtt", "username"),
    "IOT_GATEWAY_MQTT_PASSWORD": ("mqtt", "password"),
    "IOT_GATEWAY_CLUSTER_PASSWORD": ("cluster", "password"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """Check ``value`` of key ``name`` against the annotation ``tp``; ints are accepted for floats.

    The key and the file are kept apart so that nested keys read
    ``devices.tokens.x in gateway.toml``, not ``devices.tokens in gateway.toml.x``.
    """
    where = f"{name} in {source}"
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, source)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{name}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        # The values' own type: dict[str, str] for tokens, dict[str, int] for heartbeats.
        value_type = typing.get_args(tp)[1] if typing.get_args(tp) else str
        return {str(k): _coerce(v, value_type, f"{name}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type[Any], table: Any, where: str, source: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where or 'top level'} in {source}: expected a table")
    hints = typing.get_type_hints(cls)
    # A field marked {"section": False} is filled by the loader, never a key of the file.
    known = {f.name for f in dataclasses.fields(cls) if f.metadata.get("section", True)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"unknown key {name!r} in {source}")
        tp = hints[key]
        if cls is ProtocolSection and key == "ranges":
            values[key] = _ranges(value, name, source)
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, name, source)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            # [labels."ID"], [protocols."NAME"]: a table of tables, by name.
            if not isinstance(value, dict):
                raise ConfigError(f"{name} in {source}: expected [{name}.NAME] tables")
            values[key] = {
                str(k): _build(typing.get_args(tp)[1], v, f"{name}.{k}", source)
                for k, v in value.items()
            }
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if not isinstance(value, list):
                raise ConfigError(f"{name} in {source}: expected [[{name}]] tables")
            values[key] = [
                _build(typing.get_args(tp)[0], v, f"{name}[{i}]", source)
                for i, v in enumerate(value)
            ]
        else:
            values[key] = _coerce(value, tp, name, source)
    try:
        return cls(**values)
    except ValueError as e:
        # A section's own checks name the field first: prefix it with the section.
        text = str(e)
        sep = "." if text.split(" ", 1)[0].split(".", 1)[0] in known else ": "
        prefix = f"{where}{sep}" if where else ""
        raise ConfigError(f"{prefix}{text} (in {source})") from None


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file; a missing or invalid file is a ConfigError naming it."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        # TOML is UTF-8 (a file saved as Latin-1, UTF-16...): say where, in one line.
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            f"config file {p} is not UTF-8: byte {e.start} (line {line}, column {column}) "
            f"is 0x{raw[e.start]:02x}; save it as UTF-8"
        ) from None
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None


def build_config(
    table: dict[str, Any],
    *,
    source: str = "the configuration",
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> GatewayConfig:
    """Make a checked ``GatewayConfig`` from a TOML table, CLI overrides and environment.

    ``overrides`` maps dotted keys (``"auth.token"``, ``"http_port"``) to values
    from flags; flags win over the environment, which wins over the file.
    """
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
    env = os.environ if environ is None else environ
    layers: list[tuple[dict[str, Any], str]] = []
    env_values = {
        f"{section}.{key}": env[name]
        for name, (section, key) in ENV_SECRETS.items()
        if env.get(name)
    }
    layers.append((env_values, "the environment"))
    layers.append((overrides or {}, "the command line"))
    for layer, _ in layers:
        for dotted, value in layer.items():
            if value is None:
                continue
            node = merged
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    settings = _split_protocols(merged, source)
    config: GatewayConfig = _build(GatewayConfig, merged, "", source)
    if settings:
        config = dataclasses.replace(
            config,
            protocol_settings={
                str(name): _build(ProtocolSection, table, f"protocols.{name}", source)
                for name, table in settings.items()
            },
        )
    _check(config, source)
    return config


def _split_protocols(merged: dict[str, Any], source: str) -> dict[str, Any]:
    """``protocols`` as a table: ``modules`` (the list of modules, as the plain
    list form) and ``[protocols."NAME"]`` tables (each protocol's settings).

    TOML cannot have ``protocols = [...]`` beside ``[protocols."env-sensor"]``,
    so a file with per-protocol settings gives its modules as
    ``[protocols] modules = [...]`` (docs/configuration.md). Returns the
    protocols' tables, by name, and leaves the modules in ``merged``.
    """
    table = merged.get("protocols")
    if not isinstance(table, dict):
        return {}
    rest = dict(table)
    merged["protocols"] = rest.pop("modules", [])
    for name, value in rest.items():
        if not isinstance(value, dict):
            raise ConfigError(
                f"protocols.{name} in {source}: expected a [protocols.{name}] table "
                "(list modules as protocols.modules)"
            )
    return rest


def _ranges(value: Any, name: str, source: str) -> dict[str, tuple[float, float]]:
    """``[protocols.NAME.ranges]``: each DATA field -> ``[low, high]``, low <= high."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name} in {source}: expected a table of field = [low, high]")
    out: dict[str, tuple[float, float]] = {}
    for key, bounds in value.items():
        where = f"{name}.{key} in {source}"
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or any(isinstance(b, bool) or not isinstance(b, int | float) for b in bounds)
        ):
            raise ConfigError(f"{where}: expected [low, high] (two numbers), got {bounds!r}")
        low, high = float(bounds[0]), float(bounds[1])
        if not low <= high:
            raise ConfigError(f"{where}: low ({bounds[0]}) must not be above high ({bounds[1]})")
        out[str(key)] = (low, high)
    return out


def _check(config: GatewayConfig, source: str) -> None:
    """Cross-field and range checks; each error names the key (or section) and ``source``.

    The other layers' own checks run by building what they will take, so a bad
    value is refused here, at start, rather than as a traceback once serving.
    """

    def bad(message: str) -> ConfigError:
        return ConfigError(f"{message} (in {source})")

    for name, number in (("http_port", config.http_port), ("device_port", config.device_port)):
        if not 0 <= number <= 65535:
            raise bad(f"{name} must be 0..65535, not {number}")
    device_host = config.host if config.device_host is None else config.device_host
    wildcard = ("0.0.0.0", "::", "")
    if config.http_port == config.device_port != 0 and (
        device_host == config.host or device_host in wildcard or config.host in wildcard
    ):
        # Caught here, not as "in use" by the second listener after the storage has opened.
        raise bad(
            f"http_port and device_port are both {config.http_port}: give them different ports"
        )
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise bad(f"log_level must be debug, info, warning or error, not {config.log_level!r}")
    if config.demo < 0:
        raise bad(f"demo must be >= 0, not {config.demo}")
    a = config.auth
    # An empty operator token would switch token generation off and admit nobody.
    for key, token in (("auth.token", a.token), ("auth.viewer_token", a.viewer_token)):
        if token is not None and not token.strip():
            raise bad(f"{key} must not be empty (leave it out to have one generated)")
    if a.token and a.token == a.viewer_token:
        raise bad("auth.token and auth.viewer_token must differ")
    problem = config.cluster.check()
    if problem is not None:
        raise bad(problem)
    if config.cluster.url is not None and not a.token:
        # A generated token differs per node: a dashboard could not move between them.
        raise bad(
            "cluster.url (--cluster) needs an operator token, the same on every node "
            "(--token, IOT_GATEWAY_TOKEN or auth.token)"
        )
    for i, port in enumerate(config.serial):
        if not port.url:
            raise bad(f"serial[{i}].url is required")
        if port.frame_timeout is not None and not port.frame_timeout > 0:
            raise bad(f"serial[{i}].frame_timeout must be > 0, not {port.frame_timeout}")
    d = config.dashboards
    h = config.http
    # Every dashboard holds an HTTP connection: with no spare ones the page
    # and the API could not be reached once the dashboards are all there.
    if h.max_connections <= d.max_dashboards:
        raise bad(
            f"http.max_connections ({h.max_connections}) must be greater than "
            f"dashboards.max_dashboards ({d.max_dashboards})"
        )
    if not h.idle_timeout > 0:
        raise bad(f"http.idle_timeout must be > 0, not {h.idle_timeout}")
    try:
        parse_networks(h.trusted_proxies)
    except ValueError as e:
        raise bad(f"http.trusted_proxies: {e}") from None
    for device, labels in config.labels.items():
        if not valid_client_id(device):
            raise bad(f"labels.{device}: not a device id (1 to 64 characters of A-Za-z0-9._:-)")
        try:
            check_labels(
                {"name": labels.name, "location": labels.location, "channels": labels.channels}
            )
        except ValueError as e:
            raise bad(f"labels.{device}: {e}") from None
    try:
        config.mqtt.tls_context()  # a CA file that cannot be read is refused at start
    except ValueError as e:
        raise bad(f"mqtt.{e}") from None
    # A serial port's own checks run by building what the device side will take.
    for i, port in enumerate(config.serial):
        try:
            _serial_port(port)
        except ValueError as e:  # LocalProtocolError (e.g. an unknown CRC) is one too
            raise bad(f"serial[{i}]: {e}") from None


def _serial_port(s: SerialSection) -> SerialPortConfig:
    return SerialPortConfig(
        url=s.url,
        baud=s.baud,
        client_id=s.client_id,
        protocol=s.protocol,
        frame=FrameOptions(s.crc, s.crc_byteorder, s.crc_covers_header),  # type: ignore[arg-type]
        frame_timeout=s.frame_timeout,
        backoff=BackoffPolicy(s.backoff_base, s.backoff_cap),
        heartbeat=s.heartbeat,
    )
