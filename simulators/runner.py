"""Runs many simulated devices at once and totals what they did.

``iot-gateway simulate`` and the gateway's ``serve --demo`` both start their
devices through here: ``run_devices`` for TCP devices, ``Simulation`` when
the caller also wants the pty paths or live statistics.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from frames.backoff import BackoffPolicy

from .drivers import DeviceDriver, PtyDevice, TcpDevice, TlsClient
from .faults import FaultCounters
from .handshake import error_name
from .spec import DeviceSpec


@dataclass(slots=True)
class SimulationStats:
    """Totals over every device of a simulation, at one moment."""

    devices: int = 0
    links_up: int = 0  # devices with a TCP connection or an open pty session
    online: int = 0  # devices whose session is up (WELCOME received, or fixed serial)
    stopped: int = 0  # devices ended by a fatal ERROR
    sessions: int = 0  # sessions that came up (WELCOME received, or fixed serial)
    frames_sent: int = 0
    data_sent: int = 0
    acks_sent: int = 0
    nacks_sent: int = 0
    errors_received: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    overflow_bytes: int = 0  # pty bytes lost because nobody read the port
    faults: FaultCounters = field(default_factory=FaultCounters)
    last_failure: str | None = None
    last_error: str | None = None  # the latest ERROR a device got from the gateway

    def progress_line(self) -> str:
        """One line: online devices, frames, acks, reconnects (what the CLI refreshes)."""
        line = (
            f"online {self.online}/{self.devices}  frames {self.frames_sent}  "
            f"acks {self.acks_sent}  reconnects {self.reconnects}"
        )
        if self.errors_received:
            line += f"  errors {self.errors_received}"
        if self.connect_failures:
            line += f"  connect failures {self.connect_failures}"
        return line

    def summary(self) -> str:
        """Several lines for the end of a run, fault counters included."""
        lines = [
            f"devices {self.devices}, sessions {self.sessions}, stopped {self.stopped}",
            f"frames sent {self.frames_sent} (data {self.data_sent}), "
            f"acks {self.acks_sent}, nacks {self.nacks_sent}",
            f"reconnects {self.reconnects}, connect failures {self.connect_failures}, "
            f"errors received {self.errors_received}",
        ]
        struck = {k: v for k, v in dataclasses.asdict(self.faults).items() if v}
        if struck:
            lines.append("faults: " + ", ".join(f"{k} {v}" for k, v in struck.items()))
        if self.overflow_bytes:
            lines.append(f"pty bytes lost while nobody read: {self.overflow_bytes}")
        if self.last_error:
            lines.append(f"last error from the gateway: {self.last_error}")
        if self.last_failure:
            lines.append(f"last failure: {self.last_failure}")
        return "\n".join(lines)


class Simulation:
    """A set of simulated devices, over TCP to ``gateway`` or each on its own pty.

    Pty devices are opened at construction: read ``pty_devices`` for their
    paths before calling ``run``.
    """

    def __init__(
        self,
        specs: Sequence[DeviceSpec],
        *,
        gateway: tuple[str, int] | None = None,
        serial: bool = False,
        backoff: BackoffPolicy | None = None,
        tls: TlsClient | None = None,
    ) -> None:
        self.devices: list[DeviceDriver] = []
        if serial:
            try:
                for spec in specs:
                    self.devices.append(PtyDevice(spec, backoff=backoff))
            except BaseException:
                self.close()
                raise
        else:
            if gateway is None:
                raise ValueError("TCP devices need the gateway's (host, port)")
            host, port = gateway
            self.devices = [TcpDevice(spec, host, port, backoff=backoff, tls=tls) for spec in specs]

    @property
    def pty_devices(self) -> list[PtyDevice]:
        """The devices on pseudo-terminals (empty for a TCP simulation)."""
        return [d for d in self.devices if isinstance(d, PtyDevice)]

    def stats(self) -> SimulationStats:
        """Totals now; cheap enough to call for every progress line."""
        s = SimulationStats(devices=len(self.devices))
        for d in self.devices:
            c = d.model.counters
            s.links_up += d.link_up
            s.online += d.model.online
            s.stopped += d.model.stopped
            s.sessions += c.sessions
            s.frames_sent += c.frames_sent
            s.data_sent += c.data_sent
            s.acks_sent += c.acks_sent
            s.nacks_sent += c.nacks_sent
            s.errors_received += c.errors_received
            s.reconnects += c.reconnects
            s.connect_failures += d.connect_failures
            if isinstance(d, PtyDevice):
                s.overflow_bytes += d.overflow_bytes
            s.faults.add(d.injector.counters)
            if d.last_failure:
                s.last_failure = f"{d.spec.client_id}: {d.last_failure}"
            err = d.model.last_error
            if err is not None:
                s.last_error = f"{d.spec.client_id}: {error_name(err.code)} {err.reason!r}"
        return s

    async def run(self, stop: asyncio.Event) -> SimulationStats:
        """Run every device until ``stop`` is set (or all of them stopped on fatal ERRORs)."""
        try:
            async with asyncio.TaskGroup() as group:
                for d in self.devices:
                    group.create_task(d.run(stop), name=f"simulated {d.spec.client_id}")
        finally:
            self.close()
        return self.stats()

    def close(self) -> None:
        """Release the pseudo-terminals (TCP devices hold nothing between runs)."""
        for d in self.devices:
            if isinstance(d, PtyDevice):
                d.close()


async def run_devices(
    specs: Sequence[DeviceSpec],
    gateway_host: str,
    gateway_port: int,
    stop: asyncio.Event,
    *,
    backoff: BackoffPolicy | None = None,
    tls: TlsClient | None = None,
) -> SimulationStats:
    """Run ``specs`` as TCP devices against the gateway until ``stop`` is set; return totals.

    ``tls``: connect with TLS (docs/tls.md)."""
    simulation = Simulation(specs, gateway=(gateway_host, gateway_port), backoff=backoff, tls=tls)
    return await simulation.run(stop)
