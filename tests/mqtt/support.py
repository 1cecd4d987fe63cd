"""A private Mosquitto per test module, and an MQTT watcher for the tests (docs/mqtt.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from tests.support.wait import wait_until, wait_until_sync

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (Mosquitto takes its port from its config)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Mosquitto:
    """Debian's ``mosquitto`` on a free loopback port, no persistence; restartable on it."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # user -> password: a password file, and no anonymous clients.
    users: dict[str, str] | None = None
    # (certfile, keyfile): the listener speaks TLS (mqtts://).
    tls: tuple[Path, Path] | None = None

    @property
    def url(self) -> str:
        scheme = "mqtt" if self.tls is None else "mqtts"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        auth = "allow_anonymous true\n"
        if self.tls is not None:
            auth += f"certfile {self.tls[0]}\nkeyfile {self.tls[1]}\n"
        if self.users is not None:
            passwords = self.workdir / "passwords"
            passwords.write_text("")
            passwords.chmod(0o600)
            for user, password in self.users.items():
                subprocess.run(
                    [PASSWD, "-b", str(passwords), user, password], check=True, timeout=10
                )
            auth = auth.replace("allow_anonymous true", "allow_anonymous false")
            auth += f"password_file {passwords}\n"
        if (self.users is not None or self.tls is not None) and os.geteuid() == 0:
            # Started by root, Mosquitto becomes the user "mosquitto", who cannot read
            # a file under pytest's private (0700) directory: it stays who started it.
            auth += "user root\n"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n{auth}persistence false\nset_tcp_nodelay true\n"
        )
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until_sync(self._listening, f"mosquitto on port {self.port}", timeout=10)

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {self.proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@dataclass
class Watcher:
    """Every message seen on the subscribed filters, latest per topic (with its retain flag)."""

    client: aiomqtt.Client
    messages: list[aiomqtt.Message] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def last(self, topic: str) -> aiomqtt.Message | None:
        for m in reversed(self.messages):
            if m.topic.value == topic:
                return m
        return None

    def payload(self, topic: str) -> bytes | None:
        m = self.last(topic)
        return None if m is None else bytes(m.payload)

    def on(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.value == topic]

    async def until(self, topic: str, payload: bytes | None = None, timeout: float = 15) -> Any:
        """Until ``topic`` was last seen with ``payload`` (any payload when None)."""

        def seen() -> bool:
            p = self.payload(topic)
            return p is not None and (payload is None or p == payload)

        await wait_until(seen, f"{topic} = {payload!r}", timeout=timeout, changed=self.changed)
        return self.last(topic)


@contextlib.asynccontextmanager
async def watch(broker: Mosquitto, *filters: str) -> AsyncIterator[Watcher]:
    """An MQTT 5 client subscribed to ``filters``, its messages gathered in the background."""
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        w = Watcher(client)
        for f in filters:
            await client.subscribe(f, qos=1)

        async def gather() -> None:
            async for m in client.messages:
                w.messages.append(m)
                w.changed.set()

        task = asyncio.create_task(gather())
        try:
            yield w
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
