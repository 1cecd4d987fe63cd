"""A private redis-server per test module, and gateway nodes joined to it.

Debian's ``redis-server`` on a free loopback port with nothing on disk
(``--save "" --appendonly no``): the shared one on 6379 is never touched.
Each test takes its own key prefix (``--cluster-prefix``), so tests share the
module's server without flushing anything.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until_sync

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A loopback port free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """``redis-server`` in a child process; ``restart()`` brings it back empty."""

    def __init__(
        self,
        workdir: Path,
        *,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key, CA) files; then the port speaks TLS only."""
        self.workdir = workdir
        self.password = password
        self.tls = tls
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL nodes are given (``--cluster``)."""
        if self.tls is not None:
            # redis-py takes the CA from the URL's query (no config key needed).
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self._proc = subprocess.Popen(
            [
                REDIS_SERVER,
                *self._listen(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--maxmemory-policy",
                "noeviction",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until_sync(self.ping, "redis-server answering PING", timeout=10)

    def _listen(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        cert, key, ca = self.tls
        return [
            "--port", "0", "--tls-port", str(self.port),
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
        ]  # fmt: skip

    def ping(self) -> bool:
        """True when the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                if self.tls is None:
                    return self._pong(raw)
                context = ssl.create_default_context(cafile=str(self.tls[2]))
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    return self._pong(s)
        except OSError:
            return False

    @staticmethod
    def _pong(s: socket.socket) -> bool:
        s.sendall(b"PING\r\n")
        reply = s.recv(64)
        # With a password, NOAUTH is the answer of a server that is up.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        """Kill it (SIGKILL: it keeps nothing anyway) and wait."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: empty."""
        self.stop()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self.start()
                return
            except AssertionError:  # the port not free again yet
                continue
        self.start()


async def listed(
    gw: GatewayProcess, device: str, *, online: bool = True, node: str | None = None
) -> bool:
    """True when ``gw`` lists ``device`` as (not) online, on ``node`` when given."""
    status, entry = await asyncio.to_thread(gw.request_sync, "GET", f"/api/devices/{device}")
    if status != 200:
        return False
    return bool(entry["online"] is online and (node is None or entry.get("node") == node))


class LinkProxy:
    """A TCP proxy between one node and Redis, in the test's event loop: ``cut()``
    closes every connection and refuses new ones until ``heal()``; ``deafen()``
    passes the node's requests on to Redis but drops Redis's replies (a link
    that fails after the request arrived) until ``heal()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.deaf = False
        self.dropped = 0  # bytes of replies dropped while deaf

    @property
    def url(self) -> str:
        """The URL the node is given instead of Redis's."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Listen (again) on the proxy's port."""
        self._server = await asyncio.start_server(
            self._pipe, "127.0.0.1", self.port, reuse_address=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            try:
                while data := await src.read(65536):
                    if replies and self.deaf:
                        self.dropped += len(data)
                        continue
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer, False), copy(up_reader, writer, True))
        self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        """Refuse new connections and close the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def deafen(self) -> None:
        """Requests still reach Redis; its replies are dropped (until ``heal()``)."""
        self.deaf = True

    async def heal(self) -> None:
        """Accept connections again (a deaf link is cut first: its replies are lost)."""
        if self.deaf:
            await self.cut()
            self.deaf = False
        if self._server is None:
            await self.start()

    async def aclose(self) -> None:
        """Stop for good."""
        await self.cut()
