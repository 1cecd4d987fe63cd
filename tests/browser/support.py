"""A real gateway in a child process for the browser tests, and small HTTP helpers.

The gateway runs as a user runs it (``python -m gateway.cli serve --demo 4``),
so the browser sees the real page, the real WebSocket and real simulated
devices; the tests stop it with SIGTERM and start it again on the same ports
and data directory to watch the page recover.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output" / "browser"  # screenshots (gitignored)
TIMEOUT_MS = 20_000  # for every wait on the page; each waits on a condition, never a clock
OPERATOR = "op-browser-token"
VIEWER = "view-browser-token"
DEMO_DEVICES = (
    4  # serve --demo 4: demo-1 and demo-3 (env-sensor), demo-2 and demo-serial-1 (relay-4)
)
READY = re.compile(r"ready http=([\d.]+):(\d+) devices=([\d.]+):(\d+)")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class GatewayProcess:
    """``iot-gateway serve --demo 4`` in a child process; ports are learnt from its ready line."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.http_port = 0  # 0 on the first start: the system picks; kept for restarts
        self.device_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def page_url(self, token: str | None) -> str:
        return f"{self.url}/" if token is None else f"{self.url}/?token={token}"

    def start(self) -> None:
        """Start it and wait for its ready line (same ports as last time, if it ran before)."""
        assert self.proc is None, "already running"
        command = [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
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
            "--demo",
            str(DEMO_DEVICES),
        ]
        with self.log_path.open("ab") as log:
            # The child keeps its own copy of the log's descriptor.
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        line = self._ready_line()
        match = READY.search(line)
        if match is None:
            self.kill()
            raise AssertionError(f"gateway did not get ready: {line!r}\n{self.log_tail()}")
        self.http_port = int(match.group(2))
        self.device_port = int(match.group(4))

    def _ready_line(self) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buffer = b""
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return buffer.decode(errors="replace") + " (timed out)"
                chunk = os.read(fd, 4096)
                if not chunk:
                    return buffer.decode(errors="replace") + " (exited)"
                buffer += chunk
        return buffer.decode(errors="replace").splitlines()[0]

    def stop(self) -> None:
        """SIGTERM, as a service manager would, and wait for a clean exit."""
        proc = self.proc
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"gateway ignored SIGTERM\n{self.log_tail()}") from None
        self._close()
        assert code == 0, f"gateway exited with {code}\n{self.log_tail()}"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
            self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ---- HTTP API (docs/api.md §4) ----

    def get(self, path: str, token: str = OPERATOR) -> Any:
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["device"]: d for d in self.get("/api/devices")["devices"]}

    def stored_offsets(self, device: str, since: int, until: int) -> list[int]:
        """Offsets of ``device``'s stored telemetry with since < offset <= until, oldest first."""
        offsets: list[int] = []
        after = since
        while True:
            page = self.get(f"/api/devices/{device}/telemetry?since={after}&limit=1000")
            rows = [row["offset"] for row in page["telemetry"]]
            offsets.extend(o for o in rows if o <= until)
            if len(rows) < 1000 or rows[-1] >= until:
                return offsets
            after = rows[-1]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll a condition the test cannot await (the gateway's HTTP state) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
