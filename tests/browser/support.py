"""What the browser tests share besides their fixtures: the demo gateway's setup and page URLs.

The gateway runs as a user runs it (``iot-gateway serve --demo 4``, through
``tests.support.gateway``), so the browser sees the real page, the real
WebSocket and real simulated devices; the tests stop it with SIGTERM and
start it again on the same ports and data directory to watch the page
recover. The sync Playwright API owns this thread's event loop, so these
tests use the gateway helper's blocking ``*_sync`` methods.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from frames import Data, get_protocol
from simulators.handshake import DeviceHandshake, MessageReader, encode
from tests.support.gateway import OPERATOR, ROOT, VIEWER, GatewayProcess

__all__ = [
    "OPERATOR",
    "OUTPUT",
    "ROOT",
    "TIMEOUT_MS",
    "VIEWER",
    "demo_gateway",
    "hello_device",
    "listed_devices",
    "page_url",
    "send_data",
]

OUTPUT = ROOT / "test-output" / "browser"  # screenshots (gitignored)
TIMEOUT_MS = 20_000  # for every wait on the page; each waits on a condition, never a clock
DEMO_DEVICES = 4  # demo-1 and demo-3 (env-sensor), demo-2 and demo-serial-1 (relay-4)


def demo_gateway(workdir: Path) -> GatewayProcess:
    """``serve --demo 4`` with the tests' tokens, not started yet."""
    return GatewayProcess(
        workdir, token=OPERATOR, viewer_token=VIEWER, args=["--demo", str(DEMO_DEVICES)]
    )


def page_url(gateway: GatewayProcess, token: str | None, *, query: bool = False) -> str:
    """The dashboard page with ``#token=`` as the gateway prints it (``?token=``: an old link)."""
    if token is None:
        return f"{gateway.url}/"
    return f"{gateway.url}/?token={token}" if query else f"{gateway.url}/#token={token}"


def listed_devices(gateway: GatewayProcess) -> dict[str, dict[str, Any]]:
    """``GET /api/devices`` by device id, every page of it (docs/api.md §4)."""
    listed: dict[str, dict[str, Any]] = {}
    query = ""
    while True:
        body = gateway.get_json_sync(f"/api/devices{query}")
        listed.update((d["device"], d) for d in body["devices"])
        if body["next"] is None:
            return listed
        query = f"?after={body['next']}"


def hello_device(
    gateway: GatewayProcess, client_id: str, protocol: str = "env-sensor"
) -> socket.socket:
    """A raw device (env-sensor by default) on TCP that has said HELLO and got its WELCOME.

    Blocking, like everything under sync Playwright; the socket's timeout
    bounds each wait for the gateway. Close the socket to take it offline.
    """
    s = socket.create_connection(gateway.device_address, timeout=TIMEOUT_MS / 1000)
    handshake = DeviceHandshake(client_id, protocol)
    messages = MessageReader(strict=True)
    s.sendall(encode(handshake.hello()))
    while not handshake.welcomed:
        data = s.recv(4096)
        assert data, f"the gateway closed {client_id}'s link before its WELCOME"
        for message in messages.feed(data):
            handshake.receive(message)
            assert not handshake.refused, handshake.error
    return s


def send_data(s: socket.socket, protocol: str, values: dict[str, Any], seq: int = 1) -> None:
    """One DATA frame with ``values`` encoded as ``protocol`` lays them out (docs/protocols.md)."""
    body = get_protocol(protocol).encode_data(values)
    s.sendall(encode(Data(seq & 0xFF, body)))
