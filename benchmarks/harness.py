"""Shared plumbing of the end-to-end benchmarks: child processes, /proc readings, statistics.

The benchmarks run every party in its own process (gateway or bridge, Mosquitto,
load generator, dashboards) so that each one's CPU can be read apart from the
others in ``/proc/PID/stat``. Children speak to the orchestrator in JSON lines on
stdout (``{"event": "ready", ...}`` then ``{"event": "done", ...}``); the gateway
is started by the tests' own helper (``tests.support.gateway``), so that its
ready line, config file and shutdown are read one way everywhere. Every wait
here has a deadline, and every child started is stopped (SIGTERM, then SIGKILL)
by the same object that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from tests.support.gateway import GatewayProcess
from tests.support.wait import WaitTimeout, wait_until

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = ROOT / "benchmarks" / "results"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
LOOPS: Final = ("uvloop", "asyncio")

T = TypeVar("T")


# ---- event loops -----------------------------------------------------------------------------


def uvloop_available() -> bool:
    """True when uvloop can be imported (the project's ``fast`` extra)."""
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    """Run ``main`` on uvloop (when asked and installed) or on asyncio's own loop."""
    if loop == "uvloop" and uvloop_available():
        uvloop: Any = importlib.import_module("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


# ---- /proc -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process: CPU seconds (user + system, every thread) and memory."""

    at: float  # time.time()
    cpu: float
    rss: int  # bytes
    hwm: int  # peak RSS, bytes


def sample(pid: int) -> ProcSample:
    """Read ``/proc/PID/stat`` (utime + stime) and ``/proc/PID/status`` (VmRSS, VmHWM)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return ProcSample(time.time(), (utime + stime) / CLOCK_TICKS, rss, hwm)


def sample_all(pids: Iterable[int]) -> dict[int, ProcSample]:
    """One sample of each process."""
    return {pid: sample(pid) for pid in pids}


def cpu_between(before: Mapping[int, ProcSample], after: Mapping[int, ProcSample]) -> float:
    """CPU seconds the processes used between two ``sample_all`` readings, summed."""
    return sum(after[pid].cpu - before[pid].cpu for pid in before)


def all_cpu() -> dict[int, float]:
    """CPU seconds of every process on the machine now, by pid (for the noise estimate)."""
    out: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def others_cpu(
    before: Mapping[int, float], after: Mapping[int, float], ours: Iterable[int]
) -> float:
    """CPU seconds used between two ``all_cpu`` readings by processes not in ``ours``.

    Processes that started and ended in between are missed: a lower bound.
    """
    mine = set(ours) | {os.getpid()}
    return sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid not in mine)


def fd_limit() -> int:
    """This process's soft RLIMIT_NOFILE (children inherit it)."""
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---- statistics ------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (NaN when empty)."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return float(ordered[rank - 1])


def latency_summary(latencies_us: Sequence[int]) -> dict[str, float]:
    """p50 / p90 / p99 / p99.9 / max of latencies in microseconds, in milliseconds."""
    ordered = sorted(latencies_us)
    out = {
        f"p{str(q).replace('.', '_').removesuffix('_0')}_ms": percentile(ordered, q) / 1000
        for q in (50.0, 90.0, 99.0, 99.9)
    }
    out["max_ms"] = (ordered[-1] / 1000) if ordered else float("nan")
    out["samples"] = len(ordered)
    return out


def read_latencies(paths: Iterable[Path]) -> list[int]:
    """The latencies (microseconds, int32 native order) written by dashboard processes."""
    import array

    values = array.array("i")
    for p in paths:
        if p.exists():
            values.frombytes(p.read_bytes())
    return values.tolist()


# ---- child processes -------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    """A child process exited early, printed nonsense, or missed a deadline."""


@dataclass(slots=True)
class Child:
    """A child process that prints JSON lines on stdout (the gateway is a ``GatewayProcess``)."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def line(self, timeout: float) -> str:
        """The next stdout line; ChildFailed if the child ends or is silent too long."""
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise ChildFailed(f"{self.name}: no output for {timeout:g} s") from None
        if not raw:
            code = await self.proc.wait()
            raise ChildFailed(
                f"{self.name} exited with {code}; see {self.log_path}:\n{self.tail()}"
            )
        text = raw.decode().rstrip("\n")
        self.lines.append(text)
        return text

    async def event(self, name: str, timeout: float) -> dict[str, Any]:
        """Skip stdout lines until the JSON event ``name``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"{self.name}: no {name!r} within {timeout:g} s")
            text = await self.line(left)
            if not text.startswith("{"):
                continue
            obj: dict[str, Any] = json.loads(text)
            if obj.get("event") == name:
                return obj

    async def send(self, obj: Mapping[str, Any]) -> None:
        """One JSON line to the child's stdin (see ``read_go``)."""
        stdin = self.proc.stdin
        if stdin is None:
            raise ChildFailed(f"{self.name} was started without a stdin pipe")
        stdin.write(json.dumps(obj).encode() + b"\n")
        await stdin.drain()

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def wait(self, timeout: float) -> int:
        """Until the child exits by itself (it is killed past ``timeout``)."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.stop(1.0)
            raise ChildFailed(f"{self.name} did not finish within {timeout:g} s") from None


async def spawn(
    name: str,
    argv: Sequence[str],
    logdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    stdin: bool = False,
) -> Child:
    """Start ``argv`` with stdout piped, stderr to ``logdir/name.log``, stdin piped if asked."""
    log_path = logdir / f"{name}.log"
    write_bytes(log_path, b"")
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - opening a local file is instant
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            limit=1 << 20,
        )
    return Child(name, proc, log_path)


async def read_go() -> dict[str, Any]:
    """In a child: wait for the orchestrator's one JSON line on stdin (the timing plan)."""
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("stdin closed before the go line")
    plan: dict[str, Any] = json.loads(line)
    return plan


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file, making its directory (a plain function: async code calls it briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def module(name: str, *args: object) -> list[str]:
    """argv running ``benchmarks.<name>`` with this interpreter."""
    return [sys.executable, "-m", f"benchmarks.{name}", *(str(a) for a in args)]


# ---- the systems under test ------------------------------------------------------------------


def bench_gateway_config(**sections: Mapping[str, Any]) -> dict[str, Any]:
    """A gateway config for benchmarks: limits opened so that the load is not refused."""
    table: dict[str, dict[str, Any]] = {
        "devices": {
            "max_frames_per_second": 1_000_000.0,
            "rate_burst": 1_000_000.0,
            "max_connections": 60_000,
            "max_devices": 100_000,
        },
        "dashboards": {"max_dashboards": 5_000},
        "http": {"max_connections": 6_000},
    }
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    return table


@dataclass(slots=True)
class Server:
    """A server under test: its process, and where devices (and dashboards) connect."""

    process: Child | GatewayProcess  # the gateway, or the bridge
    devices: tuple[str, int]
    http: tuple[str, int] | None = None
    token: str = ""
    extra: list[Child] = field(default_factory=list)  # e.g. Mosquitto beside the bridge

    @property
    def pids(self) -> list[int]:
        """Every server-side process: their CPU is summed."""
        return [self.process.pid, *(c.pid for c in self.extra)]

    async def stop(self) -> None:
        """SIGTERM to each, SIGKILL past 10 s."""
        await self.process.stop(timeout=10.0)
        for c in self.extra:
            await c.stop()


async def start_gateway(
    workdir: Path,
    *,
    loop: str,
    config: Mapping[str, Any],
    token: str = "bench-token",
    name: str = "gateway",
    timeout: float = 30.0,
    log_level: str = "warning",
) -> Server:
    """``iot-gateway serve`` on free ports, with ``IOT_GATEWAY_LOOP`` set to ``loop``.

    Started by the tests' own helper (``tests.support.gateway``): config file,
    ready line and shutdown are handled as in the tests. Its stderr goes to
    ``workdir/NAME.log``; ``log_level`` is ``--log-level`` (``benchmarks.hostile``
    keeps the default ``info``, whose lines the attacks can provoke).
    """
    # BENCH_GATEWAY_CMD runs another build (e.g. a patched one) in the gateway's place.
    command = os.environ.get("BENCH_GATEWAY_CMD") or str(
        Path(sys.executable).parent / "iot-gateway"
    )
    gateway = GatewayProcess(
        workdir,
        config,
        token=token,
        args=["--log-level", log_level],
        env={"IOT_GATEWAY_LOOP": loop},
        command=command.split(),
        cwd=ROOT,  # BENCH_GATEWAY_CMD may name the venv relative to the repository
        name=name,
    )
    await gateway.start(timeout)
    return Server(gateway, gateway.device_address, gateway.http_address, token)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_mosquitto(workdir: Path, *, timeout: float = 10.0) -> Child:
    """Our own Mosquitto on a free loopback port, from a config file written here.

    QoS 0, no persistence, Nagle off (as the gateway's sockets): the broker's
    fastest setting. The port is in ``child.name`` after the colon.
    """
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    write_bytes(
        conf,
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "persistence false",
                "set_tcp_nodelay true",
                "max_connections -1",
                "max_queued_messages 1000",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "",
            ]
        ).encode(),
    )
    child = await spawn(f"mosquitto:{port}", [binary, "-c", str(conf)], workdir)

    async def listening() -> bool:
        if child.proc.returncode is not None:
            raise ChildFailed(f"mosquitto exited with {child.proc.returncode}:\n{child.tail()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    try:
        # Mosquitto says nothing when it listens: its port is tried until it answers.
        await wait_until(listening, f"mosquitto listening on {port}", timeout=timeout)
    except WaitTimeout as e:
        await child.stop()
        raise ChildFailed(str(e)) from None
    return child


def mosquitto_port(child: Child) -> int:
    return int(child.name.rpartition(":")[2])


async def start_bridge(workdir: Path, *, loop: str, timeout: float = 20.0) -> Server:
    """The reference: our Mosquitto plus ``benchmarks.bridge`` publishing to it."""
    broker = await start_mosquitto(workdir)
    try:
        child = await spawn(
            "bridge",
            module("bridge", "--mqtt", f"127.0.0.1:{mosquitto_port(broker)}", "--loop", loop),
            workdir,
        )
        ready = await child.event("ready", timeout)
    except BaseException:
        await broker.stop()
        raise
    return Server(child, (ready["host"], int(ready["port"])), None, "", [broker])


# ---- reports ---------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosquitto = None
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [binary, "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        mosquitto = out.splitlines()[0].strip() if out else None
    mem_total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_bytes": mem_total,
        "fd_limit": fd_limit(),
        "load_avg_at_start": os.getloadavg(),
        "versions": {
            d: _version(d) for d in ("aiohttp", "uvloop", "paho-mqtt", "crcmod-plus", "construct")
        },
        "mosquitto": mosquitto,
        "git": _git_state(),
    }


def _git_state() -> str | None:
    """The commit measured, with ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def write_result(name: str, result: Mapping[str, Any], path: Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` (or ``path``) and return where."""
    out = path or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{name}", *sys.argv[1:]]),
        "machine": machine(),
        # A run of another gateway build (benchmarks.levers) says so here.
        "gateway_cmd": os.environ.get("BENCH_GATEWAY_CMD"),
        "bench_levers": os.environ.get("BENCH_LEVERS"),
        **result,
    }
    # default=str: results carry the parsed arguments, paths among them.
    out.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return out


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"
