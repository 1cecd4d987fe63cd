"""The ``iot-gateway`` command line: ``serve`` and ``simulate``.

The flags are documented in docs/configuration.md, Command-line flags.

argparse and tomllib from the standard library are enough here; flags override
the config file, and secrets may come from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import errno
import gc
import importlib
import importlib.metadata
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Collection, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from devices import SerialPortConfig, TlsConfigError, TlsDoor
from frames import known_protocols

from .app import RUNTIME, build_tls, create_app, reload_tls
from .auth import TokenTable, generate_token
from .backup import BackupError, DataDirBusy, backup, hold_data_dir, restore
from .config import ConfigError, GatewayConfig, build_config, load_file
from .storage import StorageError
from .web.connections import CappedSite, fit_to_fd_limit, raise_fd_limit

log = logging.getLogger("gateway")

# Exit statuses of ``serve`` (docs/configuration.md, Exit statuses). A service
# manager restarts on 1 and 4 (the next start may succeed) but not on 2 or 3,
# which need a person: see the systemd unit in docs/deployment.md.
EXIT_OK = 0  # stopped by SIGTERM or Ctrl-C, everything accepted kept
EXIT_ERROR = 1  # an unexpected error (Python's own status for an uncaught exception)
EXIT_CONFIG = 2  # a bad flag, config file, environment value or protocols module
EXIT_STORAGE = 3  # the database cannot be opened: unwritable data dir, corrupt or empty file
EXIT_LISTEN = 4  # a port cannot be listened on: in use, address not here, no permission


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not in 0..65535")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _serial(text: str) -> str:
    try:
        SerialPortConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (``iot-gateway serve --help`` lists every flag)."""
    parser = argparse.ArgumentParser(
        prog="iot-gateway",
        description="Gateway for IoT devices that speak a binary framed protocol.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway: device port, dashboards, HTTP API. Flags override "
        "the config file; tokens may also come from IOT_GATEWAY_TOKEN, "
        "IOT_GATEWAY_VIEWER_TOKEN and IOT_GATEWAY_DEVICE_TOKEN.",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="TOML config file (see docs/configuration.md)"
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--device-host", metavar="HOST", help="address of the device port (default: --host)"
    )
    serve.add_argument(
        "--http-port", type=_port, help="dashboard and API port (default 8080; 0: any)"
    )
    serve.add_argument(
        "--device-port", type=_port, help="TCP port for devices (default 7000; 0: any)"
    )
    serve.add_argument(
        "--data-dir", metavar="DIR", help="where the SQLite history lives (default ./data)"
    )
    serve.add_argument("--token", metavar="T", help="operator token (read and command)")
    serve.add_argument("--viewer-token", metavar="T", help="viewer token (read only)")
    serve.add_argument("--device-token", metavar="T", help="token every device must send in HELLO")
    serve.add_argument(
        "--serial",
        action="append",
        type=_serial,
        metavar="URL[,client_id=ID,protocol=NAME,baud=N,heartbeat=S]",
        help="a serial port (any pyserial URL); repeat for more ports",
    )
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate (chain): HTTPS and wss:// on the HTTP port, TLS on the "
        "device port (docs/tls.md)",
    )
    serve.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    serve.add_argument(
        "--device-ca",
        metavar="FILE",
        help="require device client certificates signed by this CA; the CN is the client_id",
    )
    serve.add_argument(
        "--mqtt",
        metavar="URL",
        help="publish to an MQTT broker: mqtt://HOST:PORT or mqtts://HOST:PORT (docs/mqtt.md); "
        "credentials from IOT_GATEWAY_MQTT_USERNAME/_PASSWORD or [mqtt]",
    )
    serve.add_argument("--mqtt-prefix", metavar="P", help="the MQTT topic prefix (default iotgw)")
    serve.add_argument(
        "--mqtt-discovery",
        metavar="PREFIX|none",
        help="Home Assistant discovery prefix (default homeassistant), or none",
    )
    serve.add_argument(
        "--demo", type=_count, metavar="N", help="also run N simulated devices in this process"
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info"
    )
    serve.add_argument(
        "--cluster",
        metavar="URL",
        help="redis://HOST:PORT/DB or rediss://...: join the cluster on that Redis "
        "(docs/cluster.md; password from IOT_GATEWAY_CLUSTER_PASSWORD or the config file)",
    )
    serve.add_argument("--node-id", metavar="NAME", help="this node's name in the cluster")
    serve.add_argument(
        "--cluster-prefix", metavar="P", help="prefix of the cluster's Redis keys (default iotgw)"
    )
    for name, what, help_text in (
        (
            "backup",
            "DEST",
            "copy the database, safely beside a running gateway, to DEST "
            "(a file, or a directory for a dated file; created 0700, the copy 0600)",
        ),
        (
            "restore",
            "SRC",
            "put the backup SRC in place as the database (the gateway must be stopped); "
            "offsets go on above every offset handed out before",
        ),
    ):
        cmd = sub.add_parser(name, help=help_text.split(" (")[0], description=help_text)
        cmd.add_argument(what.lower(), metavar=what)
        cmd.add_argument("--config", metavar="FILE", help="the TOML config file serve uses")
        cmd.add_argument("--data-dir", metavar="DIR", help="the data dir (default: the config's)")
    simulate = sub.add_parser(
        "simulate",
        help="run simulated devices against a gateway",
        add_help=False,
    )
    simulate.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def version() -> str:
    """The installed package's version (``iot-gateway --version``)."""
    try:
        return importlib.metadata.version("iot-frame-gateway")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree not installed
        return "(not installed)"


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, but a flag the subcommand does not know is reported with
    that subcommand's usage (``serve --bogus`` printed the top-level one)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _subparser(parser, args.command)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    return parser  # pragma: no cover - build_parser always has subcommands


# Limits the gateway lowers by itself to fit the open-file limit: a warning only when
# the user set them, since the defaults are meant to adapt (docs/configuration.md).
FITTED_LIMITS = ("devices.max_connections", "http.max_connections", "dashboards.max_dashboards")


def explicit_keys(table: dict[str, Any]) -> frozenset[str]:
    """The dotted keys of ``FITTED_LIMITS`` that the config file sets."""
    found = set()
    for dotted in FITTED_LIMITS:
        section, key = dotted.split(".")
        node = table.get(section)
        if isinstance(node, dict) and key in node:
            found.add(dotted)
    return frozenset(found)


def config_from_args(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> GatewayConfig:
    """The checked configuration: file, then environment, then flags."""
    return load_config(args, environ)[0]


def load_config(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> tuple[GatewayConfig, frozenset[str]]:
    """The checked configuration, and which of ``FITTED_LIMITS`` the user set."""
    table: dict[str, Any] = {}
    source = "the command line"
    if args.config:
        table = load_file(args.config)
        source = args.config
    if args.command in ("backup", "restore"):
        # Only where the data lives matters to them (data_dir, storage.offset_mark).
        config = build_config(
            table, source=source, overrides={"data_dir": args.data_dir}, environ=environ
        )
        return config, frozenset()
    overrides: dict[str, Any] = {
        "host": args.host,
        "device_host": args.device_host,
        "http_port": args.http_port,
        "device_port": args.device_port,
        "data_dir": args.data_dir,
        "auth.token": args.token,
        "auth.viewer_token": args.viewer_token,
        "devices.token": args.device_token,
        "demo": args.demo,
        "log_level": args.log_level,
        "tls.cert": args.tls_cert,
        "tls.key": args.tls_key,
        "tls.device_ca": args.device_ca,
        "mqtt.url": args.mqtt,
        "mqtt.prefix": args.mqtt_prefix,
        "mqtt.discovery": args.mqtt_discovery,
        "cluster.url": args.cluster,
        "cluster.node_id": args.node_id,
        "cluster.prefix": args.cluster_prefix,
    }
    if args.mqtt and "@" in args.mqtt and ":" in args.mqtt.rsplit("@", 1)[0].split("//", 1)[-1]:
        # Every local user can read a process's argv (ps): the password goes elsewhere.
        raise ConfigError(
            "--mqtt: put the broker's password in IOT_GATEWAY_MQTT_PASSWORD or the config "
            "file's [mqtt] password, not on the command line"
        )
    if args.serial:
        ports = [SerialPortConfig.parse(spec) for spec in args.serial]
        serial = list(table.get("serial", []))
        for p in ports:
            entry: dict[str, Any] = {"url": p.url, "baud": p.baud}
            if p.client_id is not None:
                entry["client_id"] = p.client_id
                entry["protocol"] = p.protocol
            if p.heartbeat is not None:
                entry["heartbeat"] = p.heartbeat
            serial.append(entry)
        overrides["serial"] = serial
    config = build_config(table, source=source, overrides=overrides, environ=environ)
    return config, explicit_keys(table)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load_protocols(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"protocols: cannot import {name!r}: {e}") from None


def protocol_warnings(config: GatewayConfig) -> list[str]:
    """One line per protocol name in the config that no module registered.

    Unknown names stay legal (their DATA is carried as hex, docs/protocols.md,
    "Unknown protocols"), but a typo such as ``env_sensor`` for ``env-sensor`` would otherwise
    go unnoticed until a dashboard shows hex: name the closest known one.
    """
    known = known_protocols()
    out = []
    named = [(f"serial {port.url}", port.protocol) for port in config.serial]
    named += [
        (f"devices.heartbeat_overrides.protocols.{name}", name)
        for name in config.devices.heartbeat_overrides.protocols
    ]
    for where, name in named:
        if name is None or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
        out.append(
            f"{where}: protocol {name!r} is not a known protocol ({hint}); "
            "its DATA will be carried as hex"
        )
    return out


class StartError(Exception):
    """The gateway cannot start; ``status`` is its exit status, the message one line."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


DATA_DIR_SETTING = "--data-dir / data_dir"


def check_data_dir(path: str) -> Path:
    """Create the data directory if needed and check it can be written (``StartError``, 3).

    Checked before the storage opens, in the user's terms: a read-only
    directory was "unable to open database file", a file in its place
    "[Errno 17] File exists".
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise StartError(
            f"data dir {p} is a file, not a directory ({DATA_DIR_SETTING})", EXIT_STORAGE
        )
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartError(
            f"cannot create the data dir {p}: a part of its path is a file ({DATA_DIR_SETTING})",
            EXIT_STORAGE,
        ) from None
    except OSError as e:
        raise StartError(
            f"cannot create the data dir {p}: {e.strerror} ({DATA_DIR_SETTING})", EXIT_STORAGE
        ) from None
    # Root passes permission checks: writing a file is the one test that holds for it too
    # (a read-only mount).
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StartError(
            f"data dir {p} is not writable: {e.strerror} ({DATA_DIR_SETTING})", EXIT_STORAGE
        ) from None
    return p


def probe_port(host: str, port: int) -> None:
    """Bind (host, port) as the listener will, and let go: raises the OSError it would.

    Run before the storage opens, so that a busy port fails the start before
    the storage reserves a block of offsets (each failed start moved the next
    offset on by a block: 1048577, 2097153, ...). A port taken in between is
    still reported by the real listener.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            # As asyncio's create_server does: a port in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)


TOKEN_FILE = "operator.token"


def stored_token(data_dir: Path) -> tuple[str, bool]:
    """The operator token kept in the data dir, made (mode 0600) on the first start.

    Returns (token, made_now). So a restart does not log every browser out
    (docs/configuration.md, ``auth.token``). A token file others can read is
    made private again, with a warning.
    """
    path = data_dir / TOKEN_FILE
    try:
        with path.open(encoding="ascii") as fh:
            token = fh.read().strip()
        if token:
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                log.warning("%s was readable by others (mode %o): now 0600", path, mode)
                path.chmod(0o600)
            return token, False
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise StartError(
            f"cannot read the operator token file {path}: {e} (delete it to have a new one made)",
            EXIT_STORAGE,
        ) from None
    token = generate_token()
    tmp = path.with_name(f".{TOKEN_FILE}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
        os.replace(tmp, path)  # whole or not at all
    except OSError as e:
        raise StartError(
            f"cannot write the operator token file {path}: {e.strerror}", EXIT_STORAGE
        ) from None
    return token, True


GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Fewer, cheaper garbage collections once the gateway is ready.

    With 10,000 device sessions alive, the collector's passes over every
    tracked object stalled the event loop for tens of ms (p99.9 77-89 ms at
    10,000 frames/s). Objects alive at start are frozen out of collections,
    and the youngest generation is collected every 50,000 allocations instead
    of 700: p99 fell from 7-14 to 3-6 ms, p99.9 to 16-24 ms, for 8 MiB more
    RSS (docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


DemoStarter = Callable[[Any, int, str, int], Awaitable[Callable[[], Awaitable[None]]]]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_error(
    role: str, what: str, host: str, port: int, settings: tuple[str, str], e: OSError
) -> str:
    """One line naming the port's role, its address and the flags and keys that set it.

    ``settings``: the flag / key of the port's host, and of its port number.
    """
    address = _address(host, port)
    host_setting, port_setting = settings
    if e.errno == errno.EADDRINUSE:
        return f"{what} {address} is in use ({role}: {port_setting})"
    # Not here (EADDRNOTAVAIL), not allowed (EACCES below 1024): the host may be the fault.
    why = e.strerror or str(e)
    return f"cannot listen on the {what} {address}: {why} ({role}: {host_setting}, {port_setting})"


def _device_host(config: GatewayConfig) -> tuple[str, str]:
    """The device port's address and the flag / key that set it."""
    if config.device_host is not None:
        return config.device_host, "--device-host / device_host"
    return config.host, "--host / host"


def _check_ports(config: GatewayConfig) -> None:
    """Both ports can be listened on (``StartError``, 4, in the user's terms)."""
    device_host, device_host_setting = _device_host(config)
    checks = [
        ("devices", "device port", device_host, config.device_port, device_host_setting),
        ("dashboards and API", "HTTP port", config.host, config.http_port, "--host / host"),
    ]
    for role, what, host, port, host_setting in checks:
        port_setting = (
            "--device-port / device_port" if role == "devices" else "--http-port / http_port"
        )
        try:
            probe_port(host, port)
        except OSError as e:
            message = _listen_error(role, what, host, port, (host_setting, port_setting), e)
            raise StartError(message, EXIT_LISTEN) from None


async def serve(
    config: GatewayConfig,
    *,
    ready: Callable[[str], None] = print,
    explicit: Collection[str] = FITTED_LIMITS,
) -> int:
    """Run the gateway until SIGTERM or Ctrl-C; returns the exit status (``EXIT_*``).

    ``explicit``: the ``FITTED_LIMITS`` the user set; lowering one of them to
    fit the open-file limit is a warning, lowering a default only an info line.
    """
    with contextlib.ExitStack() as held:
        return await _serve(config, held, ready=ready, explicit=explicit)


async def _serve(
    config: GatewayConfig,
    held: contextlib.ExitStack,
    *,
    ready: Callable[[str], None],
    explicit: Collection[str],
) -> int:
    _load_protocols(config.protocols)
    for warning in protocol_warnings(config):
        log.warning("%s", warning)
    try:
        # Certificates first: a wrong path is the config's fault (2), before anything opens.
        tls: dict[str, TlsDoor] = build_tls(config)
    except TlsConfigError as e:
        log.error("cannot start the gateway: %s (tls, --tls-cert/--tls-key/--device-ca)", e)
        return EXIT_CONFIG
    try:
        data_dir = check_data_dir(config.data_dir)
        # Held shared while serving, so `iot-gateway restore` refuses to replace
        # the database under a running gateway (gateway/backup.py).
        try:
            held.enter_context(hold_data_dir(data_dir, exclusive=False))
        except DataDirBusy as e:
            raise StartError(str(e), EXIT_STORAGE) from None
        _check_ports(config)
        operator = config.auth.token
        generated = operator is None
        if operator is None:
            operator, made = stored_token(data_dir)
            if made:
                log.info("operator token made and kept in %s", data_dir / TOKEN_FILE)
    except StartError as e:
        log.error("cannot start the gateway: %s", e)
        return e.status
    tokens = TokenTable.make(operator, config.auth.viewer_token)
    config, lowered = fit_to_fd_limit(config, raise_fd_limit())
    for note in lowered:
        key = note.split(" ", 1)[0]
        log.log(logging.WARNING if key in explicit else logging.INFO, "%s", note)
    app = create_app(config, tokens, tls)
    rt = app[RUNTIME]
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=2.0,
        # aiohttp's keep-alive timer also runs before the first request: it is
        # what closes a connection whose headers trickle in (slow-loris).
        keepalive_timeout=config.http.idle_timeout,
    )
    try:
        # Storage and the device port start here (the app's cleanup_ctx): a busy
        # port or an unusable data dir is the user's to fix, so one line, no traceback.
        await runner.setup()
    except StorageError as e:
        # The app's startup has already undone whatever it had started.
        await runner.cleanup()
        log.error("cannot start the gateway: %s", e)
        return EXIT_STORAGE
    except OSError as e:
        # Storage wraps its own OS errors: an OSError here is the device port's.
        await runner.cleanup()
        server = rt.device_server
        _, host_setting = _device_host(config)
        message = _listen_error(
            "devices",
            "device port",
            server.host,
            server.port,
            (host_setting, "--device-port / device_port"),
            e,
        )
        log.error("cannot start the gateway: %s", message)
        return EXIT_LISTEN
    http_tls = rt.tls.get("http")
    site = CappedSite(
        runner,
        config.host,
        config.http_port,
        rt.http,
        wrap=None if http_tls is None else http_tls.wrap,
    )
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        message = _listen_error(
            "dashboards and API",
            "HTTP port",
            config.host,
            config.http_port,
            ("--host / host", "--http-port / http_port"),
            e,
        )
        log.error("cannot start the gateway: %s", message)
        return EXIT_LISTEN
    http_host, http_port = site.address
    dev_host, dev_port = rt.device_server.address
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if rt.tls:
        loop.add_signal_handler(signal.SIGHUP, _reload_tls, rt)
    stop_demo: Callable[[], Awaitable[None]] | None = None
    try:
        if config.demo:
            from .demo import start_demo

            stop_demo = await start_demo(rt, config.demo, dev_host, dev_port)
        url_host = "127.0.0.1" if http_host in ("0.0.0.0", "::") else http_host
        scheme = "https" if http_tls is not None else "http"
        page = f"{scheme}://{_address(url_host, http_port)}/"
        if generated:
            # In the fragment, which browsers never send: the token stays out of
            # request lines, proxy logs and Referer headers (docs/api.md §1).
            print(f"dashboard: {page}#token={operator}", file=sys.stderr, flush=True)
        elif config.demo:
            # A configured token is never printed: its owner has it already.
            print(f"dashboard: {page}", file=sys.stderr, flush=True)
        tune_gc()
        ready(f"ready http={http_host}:{http_port} devices={dev_host}:{dev_port}")
        sys.stdout.flush()
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if stop_demo is not None:
            await stop_demo()
        await runner.cleanup()
    return EXIT_OK


def _reload_tls(rt: Any) -> None:
    """SIGHUP: read the certificates, CRL and deny-list again (docs/tls.md); a file that
    cannot be used keeps the old ones, with an error line."""
    try:
        reload_tls(rt)
    except TlsConfigError as e:
        log.error("TLS reload failed, keeping the certificates in use: %s", e)
    else:
        log.info("TLS certificates reloaded (ports: %s)", ", ".join(sorted(rt.tls)))


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when the ``fast`` extra is installed (IOT_GATEWAY_LOOP=asyncio opts out).

    uvloop cut server CPU per small TCP read about 3x here; it stays optional
    because it has no wheels for every platform.
    """
    choice = os.environ.get("IOT_GATEWAY_LOOP", "auto").lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"IOT_GATEWAY_LOOP must be auto, uvloop or asyncio, not {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("IOT_GATEWAY_LOOP=uvloop but uvloop is not installed") from None
        else:
            log.info("event loop: uvloop")
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main())
    log.info("event loop: asyncio")
    return asyncio.run(main())


def _backup_or_restore(args: argparse.Namespace, config: GatewayConfig) -> int:
    """``iot-gateway backup DEST`` / ``restore SRC``: one line on success, one on failure."""
    data_dir = Path(config.data_dir)
    mark = config.storage.offset_mark
    try:
        if args.command == "backup":
            made = backup(data_dir, Path(args.dest), into_dir=args.dest.endswith("/"))
            print(
                f"backup {made.path}: {made.size} bytes in {made.seconds:.2f} s, "
                f"integrity ok, offsets up to {made.high_water}"
            )
            return EXIT_OK
        done = restore(Path(args.src), data_dir, offset_mark=None if mark is None else Path(mark))
    except BackupError as e:
        print(f"iot-gateway {args.command}: {e}", file=sys.stderr)
        return e.status
    if mark is None:
        print(
            "iot-gateway restore: warning: no storage.offset_mark is configured; offsets "
            "rely on the clock alone (docs/deployment.md, Backups)",
            file=sys.stderr,
        )
    bounds = ", ".join(f"{name} {value}" for name, value in done.sources.items())
    kept = f"; the replaced database is {done.replaced}" if done.replaced else ""
    print(
        f"restored {args.src} into {done.path}: offsets go on above {done.floor} ({bounds}){kept}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``iot-gateway`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "simulate":
        from simulators.cli import main as simulate_main

        return simulate_main(argv[1:])
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        config, explicit = load_config(args)
    except ConfigError as e:
        print(f"iot-gateway: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command in ("backup", "restore"):
        return _backup_or_restore(args, config)
    _setup_logging(config.log_level)
    try:
        return _run(lambda: serve(config, explicit=explicit))
    except ConfigError as e:
        print(f"iot-gateway: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
