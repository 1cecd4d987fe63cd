"""``iot-gateway simulate``: simulated devices from the command line.

The gateway's CLI hands everything after ``simulate`` to ``main``. It starts
the devices (over TCP, or each on its own pseudo-terminal with ``--serial``),
shows one progress line (refreshed in place on a terminal, a plain line every
few seconds when piped), and prints a summary when the run ends: after
``--duration``, on Ctrl-C or SIGTERM (exit 0), or when every device has been
refused for good (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import textwrap
from collections.abc import Sequence
from typing import Final, TextIO

from .drivers import TlsClient, TlsSetupError
from .faults import Faults, FaultSpecError, parse_faults
from .runner import Simulation, SimulationStats
from .spec import MIX, PROTOCOL_CHOICES, make_specs

TTY_REFRESH: Final = 1.0  # seconds between progress refreshes on a terminal
PIPE_REFRESH: Final = 5.0  # ...and between progress lines when piped (logs stay readable)
MAX_DEVICES: Final = 10_000


def parse_gateway(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:7000, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number, not {port_text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, not {port}")
    return host, port


def _gateway(text: str) -> tuple[str, int]:
    try:
        return parse_gateway(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _faults(text: str) -> Faults:
    try:
        return parse_faults(text)
    except FaultSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text}")
    return value


def _device_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if not 1 <= value <= MAX_DEVICES:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_DEVICES}, not {value}")
    return value


class _WholeWords(argparse.HelpFormatter):
    """Help text wrapped between words only: a fault spec such as ``silent=30`` or
    ``split,merge`` is never cut in two (argparse's default wrote ``sil ent=30``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = " ".join(text.split())
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    """The ``simulate`` argument parser (also used by the gateway's CLI for ``--help``)."""
    p = argparse.ArgumentParser(
        prog="iot-gateway simulate",
        description="Simulated IoT devices that talk to a gateway, optionally misbehaving.",
        formatter_class=_WholeWords,
    )
    p.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        type=_gateway,
        help="the gateway's device port (required unless --serial)",
    )
    p.add_argument("--devices", metavar="N", type=_device_count, default=1, help="default 1")
    p.add_argument(
        "--protocol",
        choices=PROTOCOL_CHOICES,
        default=MIX,
        help=f"device protocol, or '{MIX}' to alternate them (default {MIX})",
    )
    p.add_argument(
        "--rate", metavar="HZ", type=_positive_float, default=1.0, help="DATA per second per device"
    )
    p.add_argument(
        "--serial",
        action="store_true",
        help="put each device on its own pseudo-terminal and print its path",
    )
    p.add_argument(
        "--no-hello",
        action="store_true",
        help="with --serial: send no HELLO (the gateway's link names client_id and protocol)",
    )
    p.add_argument(
        "--faults",
        metavar="SPEC",
        type=_faults,
        default=Faults(),
        help="faults separated by commas, each NAME or NAME=VALUE: split, merge=K, flip=P, "
        "garbage=P, drop=R, silent=S, badtoken; e.g. split,flip=0.001,silent=30",
    )
    p.add_argument("--duration", metavar="S", type=_positive_float, help="stop after S seconds")
    p.add_argument("--token", default="", help="device token sent in HELLO")
    p.add_argument("--seed", type=int, default=0, help="makes telemetry and faults repeatable")
    p.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="connect with TLS, trusting this CA (PEM) for the gateway's certificate",
    )
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="connect with TLS and present this client certificate (PEM); {client_id} in "
        "the path is each device's id (its CN must be the client_id: docs/tls.md)",
    )
    p.add_argument(
        "--tls-key", metavar="FILE", help="the private key of --tls-cert ({client_id} too)"
    )
    p.add_argument(
        "--prefix", default="sim", help="client_id prefix: PREFIX-1, PREFIX-2, ... (default sim)"
    )
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and cross-check the flags; a bad flag exits 2 with argparse's message."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.gateway is None and not args.serial:
        parser.error("--gateway HOST:PORT is required (or --serial for pseudo-terminals)")
    if args.no_hello and not args.serial:
        parser.error("--no-hello only applies to --serial devices; TCP devices must send HELLO")
    try:
        make_specs(1, prefix=args.prefix)
    except ValueError:
        parser.error(f"--prefix {args.prefix!r}: client ids allow only A-Za-z0-9._:-")
    if (args.tls_ca or args.tls_cert or args.tls_key) and args.serial:
        parser.error("--tls-ca/--tls-cert/--tls-key apply to TCP devices, not --serial")
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    return args


def tls_client(args: argparse.Namespace) -> TlsClient | None:
    """The devices' TLS settings, or None for plain TCP."""
    if not (args.tls_ca or args.tls_cert):
        return None
    return TlsClient(args.tls_ca, args.tls_cert, args.tls_key)


async def simulate(
    args: argparse.Namespace,
    *,
    out: TextIO,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> int:
    """Run the simulation ``args`` describe, reporting to ``out``; return the exit code."""
    stop = stop or asyncio.Event()
    specs = make_specs(
        args.devices,
        protocol=args.protocol,
        rate=args.rate,
        token=args.token,
        seed=args.seed,
        prefix=args.prefix,
        hello=not args.no_hello,
        faults=args.faults,
    )
    tls = tls_client(args)
    sim = Simulation(specs, gateway=args.gateway, serial=args.serial, tls=tls)
    target = "pseudo-terminals" if args.serial else "{}:{}".format(*args.gateway)
    if tls is not None:
        target += " (TLS)"
    _say(
        out,
        f"simulating {len(specs)} device(s), protocol {args.protocol}, {args.rate:g} Hz, "
        f"faults {args.faults.describe()} -> {target}",
    )
    for dev in sim.pty_devices:
        line = f"serial {dev.spec.client_id} {dev.spec.protocol} {dev.path}"
        if not dev.spec.hello:
            line += f"  (gateway: --serial {dev.serial_spec})"
        _say(out, line)

    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here: the caller stops us
    timer = loop.call_later(args.duration, stop.set) if args.duration else None
    tty = out.isatty()
    try:
        running = asyncio.ensure_future(sim.run(stop))
        while True:
            done, _ = await asyncio.wait({running}, timeout=TTY_REFRESH if tty else PIPE_REFRESH)
            if done:
                break
            line = sim.stats().progress_line()
            # On a terminal: rewrite the line in place and erase what a longer one left.
            out.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
            out.flush()
        stats = running.result()
    finally:
        if timer is not None:
            timer.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
        sim.close()
    if tty:
        out.write("\n")
    _say(out, stats.summary())
    return _exit_code(stats)


def _exit_code(stats: SimulationStats) -> int:
    # Every device refused for good (a wrong token, say) is a failed run; being
    # stopped by the user or the clock is not.
    return 1 if stats.devices and stats.stopped == stats.devices else 0


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``iot-gateway simulate ARGS``; returns the exit code (2 for bad flags)."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse exits on --help and on bad flags
        return e.code if isinstance(e.code, int) else 2
    try:
        return asyncio.run(simulate(args, out=sys.stdout))
    except KeyboardInterrupt:
        # Ctrl-C before the handlers were in place: still a clean stop.
        return 0
    except TlsSetupError as e:
        print(f"iot-gateway simulate: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Our side failed before any device ran (e.g. no pseudo-terminals left).
        print(f"iot-gateway simulate: cannot start the devices: {e}", file=sys.stderr)
        return 1
