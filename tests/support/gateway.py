"""``iot-gateway serve`` in a child process, for every test and benchmark that needs a real one.

Signals, exit statuses, stdout buffering, kill -9, and a process's own memory
and descriptors (``/proc/PID``) only behave for real in a real process. The
browser tests, the resilience suite, the command-line tests and the
end-to-end benchmarks all start the gateway through ``GatewayProcess``, so its
start-up contract is read in one place (docs/configuration.md, Command-line
flags): once it listens, ``serve`` prints exactly one line to stdout,
``ready http=HOST:PORT devices=HOST:PORT``, after the dashboard URL on stderr
when it made its own token; it exits 0 after SIGTERM or SIGINT, 2 on a bad
config, 3 when its storage cannot be opened, 4 when a port cannot be listened on.

The class blocks at its core (``subprocess.Popen``, reads with a deadline),
because the browser tests run under sync Playwright, which owns the thread's
event loop: they call the ``*_sync`` methods. Coroutines call the plain names,
which run the same code in a worker thread so that the caller's event loop
keeps serving its own sockets (dashboards, devices) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import resource
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.support.metrics import Metrics, parse_metrics
from tests.support.toml_writer import dumps

ROOT: Final = Path(__file__).resolve().parents[2]
OPERATOR: Final = "op-test-token"
VIEWER: Final = "view-test-token"
READY: Final = re.compile(r"ready http=(\S+):(\d+) devices=(\S+):(\d+)")
DASHBOARD: Final = re.compile(r"^dashboard: \S+#token=(\S+)$", re.MULTILINE)
START_TIMEOUT: Final = 30.0  # a cold interpreter on a busy 2-core machine
STOP_TIMEOUT: Final = 20.0
# Log lines that mean an exception escaped somewhere it should not have.
CRASH_MARKERS: Final = (
    "Traceback (most recent call last)",
    "Error handling request",
    "Exception in callback",
    "Task exception was never retrieved",
    "CRITICAL",
)


@dataclass(frozen=True, slots=True)
class Exit:
    """How a run of the gateway ended."""

    code: int  # exit status; -9 after SIGKILL
    stdout: str  # what it printed after the ready line (everything, if it never got ready)
    stderr: str  # this run's log
    elapsed: float  # seconds from the signal (or from the start of the wait) to the exit
    killed: bool = False  # SIGKILLed because it outlived the stop's timeout

    def __str__(self) -> str:
        how = " (killed: it outlived SIGTERM's timeout)" if self.killed else ""
        tail = "\n".join(self.stderr.splitlines()[-40:])
        return f"exit status {self.code}{how} after {self.elapsed:.1f} s; stderr:\n{tail}"


class GatewayProcess:
    """``iot-gateway serve`` in a child process, restartable on the same ports and data.

    The config dict (None: no ``--config``) is written to ``WORKDIR/NAME.toml``
    at each start; stderr is appended to ``WORKDIR/NAME.log``; the data
    directory is ``WORKDIR/NAME-data``. Unless ``bare``, the flags are
    ``--host 127.0.0.1``, ``--http-port``, ``--device-port`` (0 on the first
    start, then the ports it got, so a restart keeps them) and ``--data-dir``;
    ``--token``/``--viewer-token`` when given; then ``args``. ``bare`` leaves
    out the listening and data flags, for the tests of the command line that
    pass their own. The environment is this process's without any
    ``IOT_GATEWAY_*`` variable (a developer's shell must not change what runs),
    plus ``env``.
    """

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any] | None = None,
        *,
        args: Sequence[str] = (),
        bare: bool = False,
        token: str | None = None,
        viewer_token: str | None = None,
        env: Mapping[str, str] | None = None,
        fd_limit: int | None = None,
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
        name: str = "gateway",
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.config: dict[str, Any] | None = None if config is None else dict(config)
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.data_dir = workdir / f"{name}-data"
        self.args = list(args)
        self.bare = bare
        self.token_flag = token
        self.viewer_token = viewer_token
        self.env = dict(env or {})
        self.fd_limit = fd_limit
        # ``command`` replaces ``python -m gateway.cli`` (benchmarks run other builds).
        self.command = list(command or [sys.executable, "-m", "gateway.cli"])
        self.cwd = cwd or workdir
        # Learnt from the ready line (and kept for restarts).
        self.http_host = self.device_host = "127.0.0.1"
        self.http_port = 0
        self.device_port = 0
        self.ready_line = ""
        # The operator token: the one given, or the one the gateway printed.
        self.token: str | None = token
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._stdout = b""  # read past the ready line
        self._log_from = 0  # this run's stderr starts here in the log

    # ---- state ----

    @property
    def running(self) -> bool:
        """Started and not yet stopped, killed or waited for (it may have died meanwhile)."""
        return self._proc is not None

    def alive(self) -> bool:
        """Running and its process has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The process id of the current run, or of the last one (for reports after a stop)."""
        assert self._pid is not None, f"{self.name} never started"
        return self._pid

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the HTTP port."""
        return f"http://{self.http_host}:{self.http_port}"

    @property
    def http_address(self) -> tuple[str, int]:
        return self.http_host, self.http_port

    @property
    def device_address(self) -> tuple[str, int]:
        return self.device_host, self.device_port

    def argv(self) -> list[str]:
        """The command line the next start runs."""
        argv = [*self.command, "serve"]
        if self.config is not None:
            argv += ["--config", str(self.config_path)]
        if not self.bare:
            argv += ["--host", "127.0.0.1", "--http-port", str(self.http_port)]
            argv += ["--device-port", str(self.device_port), "--data-dir", str(self.data_dir)]
        if self.token_flag is not None:
            argv += ["--token", self.token_flag]
        if self.viewer_token is not None:
            argv += ["--viewer-token", self.viewer_token]
        return argv + self.args

    # ---- its log ----

    def stderr(self) -> str:
        """What the current (or last) run wrote to stderr so far."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_from)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log(self) -> str:
        """Every run's stderr."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def crashes(self) -> list[str]:
        """Log lines that show an exception escaping (empty when all is well)."""
        return [line for line in self.log().splitlines() if any(m in line for m in CRASH_MARKERS)]

    # ---- /proc ----

    def _proc_dir(self) -> Path:
        # Only while it runs: a reaped pid may already be another process's.
        assert self._proc is not None, f"{self.name} is not running"
        return Path(f"/proc/{self._proc.pid}")

    def rss(self) -> int:
        """Resident memory, bytes."""
        for line in (self._proc_dir() / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        """Open file descriptors."""
        return len(os.listdir(self._proc_dir() / "fd"))

    # ---- start and stop: blocking ----

    def launch(self) -> None:
        """Start the process without waiting for its ready line (for start-up failures)."""
        assert self._proc is None, f"{self.name} is already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            self.config_path.write_text(dumps(self.config))
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stdout = b""
        self.ready_line = ""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("IOT_GATEWAY_")}
        environ |= {"PYTHONUNBUFFERED": "1", **self.env}
        limit = self.fd_limit

        def preexec() -> None:  # pragma: no cover - runs in the child
            # resource is imported by the parent: an import here could deadlock on
            # a lock another thread held at fork time.
            assert limit is not None
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with self.log_path.open("ab") as log:
            # The child keeps its own copy of the log's descriptor.
            self._proc = subprocess.Popen(
                self.argv(),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=environ,
                preexec_fn=preexec if limit is not None else None,
            )
        self._pid = self._proc.pid

    def start_sync(self, timeout: float = START_TIMEOUT) -> None:
        """Start it and wait for its ready line; a later start reuses the same ports.

        If no ready line comes (it exited, or ``timeout`` passed), the process
        is killed and AssertionError says why, with its stderr.
        """
        self.launch()
        self._await_ready(timeout)

    def _await_ready(self, timeout: float) -> None:
        proc = self._proc
        assert proc is not None
        buffer, why = self._read_until(proc, b"\n", timeout)
        line, newline, rest = buffer.partition(b"\n")
        text = line.decode(errors="replace")
        match = READY.fullmatch(text)
        if not newline or match is None:
            gone = self._collect(proc, time.monotonic(), kill=True)
            raise AssertionError(
                f"{self.name} did not get ready ({why or 'not a ready line'}): "
                f"stdout {buffer!r}\n{gone}"
            )
        self.ready_line = text + "\n"
        self._stdout = rest
        self.http_host, self.http_port = match.group(1), int(match.group(2))
        self.device_host, self.device_port = match.group(3), int(match.group(4))
        if self.token_flag is None and (printed := DASHBOARD.search(self.stderr())):
            # Printed (and flushed) before the ready line, so it is in the log by now.
            self.token = printed.group(1)
        self.starts += 1

    @staticmethod
    def _read_until(
        proc: subprocess.Popen[bytes], end: bytes | None, timeout: float
    ) -> tuple[bytes, str]:
        """Read stdout until ``end`` (None: end of file) or ``timeout``; what came, and why not."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buffer = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while end is None or end not in buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return buffer, f"nothing more on stdout within {timeout:g} s"
                chunk = os.read(fd, 65536)
                if not chunk:
                    return buffer, "" if end is None else "stdout closed: it exited"
                buffer += chunk
        return buffer, ""

    def stop_sync(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> Exit:
        """Send ``sig`` (SIGTERM, as a service manager does) and wait for the exit.

        Past ``timeout`` it is SIGKILLed and the Exit says ``killed``; a caller
        that expects a clean shutdown asserts ``exit.code == 0``.
        """
        proc = self._proc
        assert proc is not None, f"{self.name} is not running"
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self._collect(proc, started, kill=True)
        return self._collect(proc, started)

    def kill_sync(self) -> Exit | None:
        """SIGKILL (kill -9: no shutdown code runs); None if it was not running."""
        proc = self._proc
        if proc is None:
            return None
        return self._collect(proc, time.monotonic(), kill=True)

    def wait_exit_sync(self, timeout: float) -> Exit:
        """Wait for it to exit by itself; past ``timeout``, kill it and raise AssertionError."""
        proc = self._proc
        assert proc is not None, f"{self.name} is not running"
        started = time.monotonic()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            gone = self._collect(proc, started, kill=True)
            raise AssertionError(f"{self.name} still ran after {timeout:g} s\n{gone}") from None
        return self._collect(proc, started)

    def _collect(
        self, proc: subprocess.Popen[bytes], started: float, *, kill: bool = False
    ) -> Exit:
        """Reap the process (killing it first if asked) and close its pipe."""
        killed = False
        if kill and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            killed = True
        code = proc.wait(STOP_TIMEOUT)
        elapsed = time.monotonic() - started
        # The rest of stdout; bounded, in case something it started still holds the pipe.
        rest, _ = self._read_until(proc, None, 5.0)
        assert proc.stdout is not None
        proc.stdout.close()
        self._proc = None
        stdout = (self._stdout + rest).decode(errors="replace")
        self._stdout = b""
        return Exit(code, stdout, self.stderr(), elapsed, killed)

    # ---- start and stop: coroutines (the same, in a worker thread) ----

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """``start_sync`` for coroutines."""
        # Popen here, in the caller's thread: fork with preexec_fn is safest in one
        # thread; only the wait for the ready line goes to a worker.
        self.launch()
        await asyncio.to_thread(self._await_ready, timeout)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> Exit:
        """``stop_sync`` for coroutines."""
        return await asyncio.to_thread(self.stop_sync, sig, timeout)

    async def kill(self) -> Exit | None:
        """``kill_sync`` for coroutines."""
        return await asyncio.to_thread(self.kill_sync)

    async def wait_exit(self, timeout: float) -> Exit:
        """``wait_exit_sync`` for coroutines."""
        return await asyncio.to_thread(self.wait_exit_sync, timeout)

    # ---- HTTP API (docs/api.md §4): blocking ----

    def request_sync(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        """One request with the operator token (or ``token``); the status and the JSON body."""
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:  # a 4xx or 5xx answer (docs/api.md §2)
            with e:
                text = e.read().decode(errors="replace")
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, text

    def get_json_sync(self, path: str, token: str | None = None) -> Any:
        """``GET path``'s JSON body; AssertionError unless the status is 200."""
        status, body = self.request_sync("GET", path, token=token)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def metrics_sync(self) -> Metrics:
        """``GET /metrics``, parsed."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return parse_metrics(response.read().decode())

    def healthy_sync(self) -> bool:
        """``GET /healthz`` answers 200 within 5 s."""
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                return bool(response.status == 200)
        except (OSError, http.client.HTTPException):  # refused, reset, timed out, not 2xx
            return False

    def stored_offsets_sync(
        self, device: str, since: int = 0, until: int | None = None
    ) -> list[int]:
        """Offsets of ``device``'s stored telemetry with since < offset <= until, oldest first."""
        offsets: list[int] = []
        after = since
        while True:
            page = self.get_json_sync(f"/api/devices/{device}/telemetry?since={after}&limit=1000")
            rows = [row["offset"] for row in page["telemetry"]]
            offsets.extend(o for o in rows if until is None or o <= until)
            if len(rows) < 1000 or (until is not None and rows[-1] >= until):
                return offsets
            after = rows[-1]

    # ---- HTTP API: coroutines ----

    async def get_json(self, path: str, token: str | None = None) -> Any:
        """``get_json_sync`` for coroutines."""
        return await asyncio.to_thread(self.get_json_sync, path, token)

    async def post_json(self, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
        """``POST path`` with a JSON body: the status and the JSON answer."""
        return await asyncio.to_thread(self.request_sync, "POST", path, body, token)

    async def metrics(self) -> Metrics:
        """``metrics_sync`` for coroutines."""
        return await asyncio.to_thread(self.metrics_sync)

    async def healthy(self) -> bool:
        """``healthy_sync`` for coroutines."""
        return await asyncio.to_thread(self.healthy_sync)

    async def stored_offsets(
        self, device: str, since: int = 0, until: int | None = None
    ) -> list[int]:
        """``stored_offsets_sync`` for coroutines."""
        return await asyncio.to_thread(self.stored_offsets_sync, device, since, until)
