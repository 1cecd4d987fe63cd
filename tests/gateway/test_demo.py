"""``iot-gateway serve --demo N`` as a user runs it: a real process, real sockets, a real pty."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest


async def _line(stream: asyncio.StreamReader, pattern: str) -> re.Match[str]:
    while True:
        raw = await stream.readline()
        if not raw:
            raise EOFError(f"stream ended before {pattern!r}")
        m = re.search(pattern, raw.decode())
        if m:
            return m


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_demo_five_devices_one_serial_and_clean_exit(tmp_path: Path, loop: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--http-port",
        "0",
        "--device-port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        "--demo",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "IOT_GATEWAY_LOOP": loop},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            token = (await _line(proc.stderr, r"\?token=(\S+)")).group(1)
            ready = await _line(proc.stdout, r"^ready http=(\S+):(\d+) devices=(\S+):(\d+)$")
        base = f"http://{ready.group(1)}:{ready.group(2)}"
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    async with session.get(f"{base}/api/devices", headers=headers) as resp:
                        listing = json.loads(await resp.text())["devices"]
                    online = [d for d in listing if d["online"] and d["last"] is not None]
                    if len(online) == 5:
                        break
                    await asyncio.sleep(0.1)  # polling the API, as a user would
        assert sorted(d["transport"] for d in online) == ["serial", "tcp", "tcp", "tcp", "tcp"]
        assert {d["protocol"] for d in online} == {"env-sensor", "relay-4"}
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            code = await proc.wait()
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
