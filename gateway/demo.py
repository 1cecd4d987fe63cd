"""``serve --demo N``: simulated devices inside the gateway's own process.

A mix of env-sensor and relay-4 devices: all but one over TCP to the device
port, and one relay on a pseudo-terminal that the gateway opens as a real
serial link (transport ``serial`` in the devices listing), so a new user sees
both kinds of link without any hardware.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

from devices import SerialLink, SerialPortConfig
from simulators import DeviceSpec, PtyDevice, TlsClient, make_specs, run_devices

from .app import Runtime

log = logging.getLogger(__name__)


async def start_demo(
    rt: Runtime, count: int, device_host: str, device_port: int, *, rate: float = 1.0
) -> Callable[[], Awaitable[None]]:
    """Start ``count`` simulated devices; returns a coroutine function that stops them."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[object]] = []
    links: list[SerialLink] = []
    pty: PtyDevice | None = None
    tcp_count = count
    if count >= 1:
        # One device on a pseudo-terminal with a fixed identity: no HELLO, since
        # a port opening may discard what was written before it opened.
        pty = PtyDevice(DeviceSpec("demo-serial-1", "relay-4", rate=rate, hello=False))
        tcp_count = count - 1
        link = SerialLink(rt.manager, SerialPortConfig.parse(pty.serial_spec))
        link.start()
        links.append(link)
        rt.serial_links.append(link)
        tasks.append(asyncio.create_task(pty.run(stop), name="demo serial device"))
    if tcp_count:
        specs = make_specs(tcp_count, protocol="mix", rate=rate, prefix="demo")
        connect_host = "127.0.0.1" if device_host in ("0.0.0.0", "::", "") else device_host
        tls = None
        door = rt.tls.get("devices")
        if door is not None:
            # To this very process on loopback: TLS as any device, no certificate check.
            tls = TlsClient(insecure=True)
            if door.context.verify_mode == ssl.CERT_REQUIRED:
                log.warning(
                    "demo: the TCP demo devices have no client certificates: the device "
                    "port (tls.device_ca) refuses them (docs/tls.md)"
                )
        tasks.append(
            asyncio.create_task(
                run_devices(specs, connect_host, device_port, stop, tls=tls),
                name="demo tcp devices",
            )
        )
    log.info("demo: %d simulated devices (%d over TCP, %d serial)", count, tcp_count, len(links))

    async def stop_demo() -> None:
        stop.set()
        for link in links:
            await link.stop()
            if link in rt.serial_links:
                rt.serial_links.remove(link)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("demo device stopped with %r", result)
        if pty is not None:
            with contextlib.suppress(OSError):
                pty.close()

    return stop_demo
