"""Helpers for the resilience suite: a gateway in a child process, raw devices, dashboards.

The gateway runs as users run it (``python -m gateway.cli serve``) so that a
crash is a dead process, kill -9 is real, and its memory and file descriptors
are its own (``/proc/PID``). Every wait here has a deadline; the fixture in
``conftest.py`` kills whatever a test leaves running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp

import frames
from tests.devices.support import Client
from tests.gateway.support import Dash

ROOT: Final = Path(__file__).resolve().parents[2]
OPERATOR: Final = "op-resilience"
VIEWER: Final = "view-resilience"
READY: Final = re.compile(r"ready http=([\d.]+):(\d+) devices=([\d.]+):(\d+)")
START_TIMEOUT: Final = 30.0
# Log lines that mean an exception escaped somewhere it should not have.
CRASH_MARKERS: Final = (
    "Traceback (most recent call last)",
    "Error handling request",
    "Exception in callback",
    "Task exception was never retrieved",
    "CRITICAL",
)


class Closable(Protocol):
    async def aclose(self) -> None: ...


# What tests open (device clients, dashboard readers): the autouse fixture in
# conftest.py closes whatever a failing test left open, so that one failure
# does not leak sockets into the next test's warnings.
OPEN: list[Closable] = []


def toml(table: Mapping[str, Any]) -> str:
    """A TOML document for flat sections and ``[[serial]]`` arrays (enough for these tests)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, Mapping | list)]
    for k, v in table.items():
        if isinstance(v, Mapping):
            lines.append(f"[{k}]")
            lines.extend(f"{kk} = {value(vv)}" for kk, vv in v.items())
        elif isinstance(v, list):
            for entry in v:
                lines.append(f"[[{k}]]")
                lines.extend(f"{kk} = {value(vv)}" for kk, vv in entry.items())
    return "\n".join(lines) + "\n"


class GatewayProcess:
    """``python -m gateway.cli serve`` in a child process, restartable on the same ports."""

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any] | None = None,
        *,
        extra_args: list[str] | None = None,
        fd_limit: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config_path = workdir / "gateway.toml"
        self.config_path.write_text(toml(config or {}))
        self.log_path = workdir / "gateway.log"
        self.extra_args = extra_args or []
        self.fd_limit = fd_limit
        self.http_port = 0
        self.device_port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not running"
        return self.proc.pid

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> None:
        """Start it and wait for its ready line; later starts reuse the same ports."""
        assert self.proc is None, "already running"
        argv = [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--device-port",
            str(self.device_port),
            "--data-dir",
            str(self.data_dir),
            "--token",
            OPERATOR,
            "--viewer-token",
            VIEWER,
            *self.extra_args,
        ]
        limit = self.fd_limit

        def preexec() -> None:  # pragma: no cover - runs in the child
            if limit is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=preexec if limit is not None else None,
            )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"gateway not ready in {START_TIMEOUT:g} s\n{self.log_tail()}"
            ) from None
        match = READY.search(line.decode(errors="replace"))
        if match is None:
            await self.kill()
            raise AssertionError(f"gateway did not start: {line!r}\n{self.log_tail()}")
        self.http_port = int(match.group(2))
        self.device_port = int(match.group(4))
        self.starts += 1

    async def kill(self) -> None:
        """SIGKILL (kill -9): no shutdown code runs."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status (killed past ``timeout``)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise AssertionError(f"gateway ignored SIGTERM\n{self.log_tail()}") from None
        return proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def rss(self) -> int:
        """Resident memory, bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def crashes(self) -> list[str]:
        """Log lines that show an exception escaping (empty when all is well)."""
        return [line for line in self.log().splitlines() if any(m in line for m in CRASH_MARKERS)]

    # ---- HTTP ----

    async def get_json(self, path: str, token: str = OPERATOR) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                self.http + path,
                headers={"Authorization": f"Bearer {token}"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp,
        ):
            assert resp.status == 200, f"GET {path}: {resp.status} {await resp.text()}"
            return await resp.json()

    async def post_json(self, path: str, body: Any, token: str = OPERATOR) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.http + path,
                json=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp,
        ):
            return resp.status, await resp.json()

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` as ``{"name{labels}": value}``."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.http + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp,
        ):
            text = await resp.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, number = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(number)
        return out

    async def healthy(self) -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(self.http + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp,
            ):
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def stored_offsets(self, device: str) -> list[int]:
        """Offsets of every stored telemetry message of ``device``, oldest first."""
        offsets: list[int] = []
        after = 0
        while True:
            page = await self.get_json(f"/api/devices/{device}/telemetry?since={after}&limit=1000")
            rows = [row["offset"] for row in page["telemetry"]]
            offsets.extend(rows)
            if len(rows) < 1000:
                return offsets
            after = rows[-1]

    # ---- clients ----

    async def device(self, client_id: str, protocol: str = "env-sensor") -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.device_port)
        client = Client(reader, writer)
        OPEN.append(client)
        await client.hello(client_id, protocol)
        return client

    async def dashboard(
        self,
        session: aiohttp.ClientSession,
        *targets: dict[str, Any],
        token: str = OPERATOR,
    ) -> Dash:
        """A dashboard past its welcome, subscribed to each target (to all if none)."""
        ws = await session.ws_connect(f"{self.http}/ws?token={token}", max_msg_size=0)
        dash = Dash(ws)
        OPEN.append(_WsCloser(ws))
        await dash.expect("welcome")
        for target in targets or ({"all": True},):
            await dash.request({"op": "subscribe", **target}, "subscribed")
        return dash


class _WsCloser:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def aclose(self) -> None:
        await self.ws.close()


class _WriterCloser:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def track(writer: asyncio.StreamWriter) -> asyncio.StreamWriter:
    """Have the autouse fixture close ``writer`` if the test does not."""
    OPEN.append(_WriterCloser(writer))
    return writer


def data_frame(seq: int, temperature: float = 21.5) -> bytes:
    """An env-sensor DATA frame."""
    body = frames.get_protocol("env-sensor").encode_data(
        {"temperature_c": temperature, "humidity_pct": 40.0, "battery_pct": 90}
    )
    return frames.encode_frame(frames.Data(seq & 0xFF, body).encode())


async def stream(client: Client, rate: float, stop: asyncio.Event, sent: list[float]) -> None:
    """Send DATA at ``rate`` Hz until ``stop``; append each send's time to ``sent``."""
    seq = 0
    period = 1.0 / rate
    while not stop.is_set():
        seq += 1
        client.send_raw(data_frame(seq))
        sent.append(time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period)


class Telemetry:
    """Reads a dashboard in the background: offsets and arrival times per device."""

    def __init__(self, dash: Dash) -> None:
        self.dash = dash
        self.by_device: dict[str, list[tuple[int, float]]] = {}
        self.other: list[dict[str, Any]] = []
        self.gaps: list[float] = []
        self.last_at: float | None = None
        self._changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())
        OPEN.append(self)

    async def _run(self) -> None:
        with contextlib.suppress(EOFError, asyncio.CancelledError):
            while True:
                msg = await self.dash.recv(timeout=3600)
                now = time.monotonic()
                if msg.get("op") == "telemetry":
                    if self.last_at is not None:
                        self.gaps.append(now - self.last_at)
                    self.last_at = now
                    self.by_device.setdefault(msg["device"], []).append((msg["offset"], now))
                else:
                    self.other.append(msg)
                self._changed.set()

    def count(self, device: str, since: float = 0.0) -> int:
        return sum(1 for _, at in self.by_device.get(device, []) if at >= since)

    def offsets(self, device: str | None = None) -> list[int]:
        if device is not None:
            return [o for o, _ in self.by_device.get(device, [])]
        return sorted(o for rows in self.by_device.values() for o, _ in rows)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                if self.task.done():
                    raise AssertionError("the dashboard closed")
                await self._changed.wait()

    async def aclose(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.dash.ws.close()


async def poll(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0, every: float = 0.1
) -> None:
    """Poll a condition that has no event of its own (a child's /metrics) until it holds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)
