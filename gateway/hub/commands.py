"""Command routing: from a dashboard or HTTP caller to devices, and every status back.

A command goes to an online device at once (``sent``, then ``acked``,
``nacked`` or ``timeout``), to the node that holds the device in a cluster,
or into the engine's offline queue (``queued``, then delivered oldest first
at the device's next WELCOME, or ``expired``). A device never seen, or a
command its protocol cannot encode, is ``rejected`` (docs/api.md §3.1).
One ``CommandStatus`` enum names these from the device session to the wire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from devices import CommandHandle, CommandResult, CommandStatus, DeviceNotOnline
from frames import CommandError, get_protocol

from ..metrics import Metrics
from .engine import Engine, StatusCallback
from .messages import ClientError, CommandRequest, ErrorCode, command_status, now_ms
from .records import QueuedCommand
from .registry import Registry

log = logging.getLogger(__name__)


class DeviceLinks(Protocol):
    """What command routing needs of the device side (``devices.DeviceManager`` is one)."""

    def is_online(self, client_id: str) -> bool: ...

    async def send_command(self, client_id: str, body: bytes) -> CommandHandle: ...


@dataclass(frozen=True, slots=True)
class CommandSettings:
    """How long queued commands wait and how often their expiry is checked."""

    command_ttl: float = 3600.0  # seconds a queued command waits for its device
    expiry_interval: float = 1.0


class CommandRouter:
    """Submits commands, delivers queued ones, expires them, reports every status."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        metrics: Metrics,
        settings: Callable[[], CommandSettings],
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self._settings = settings
        self.links: DeviceLinks | None = None
        # Statuses of queued commands go back to whoever gave them, by queue key.
        self._owners: dict[int, StatusCallback] = {}
        # Queued commands being written now: their delivery reports them, not expiry.
        self._delivering: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.Task[None] | None = None

    # ---- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the expiry of queued commands."""
        self._expiry = asyncio.create_task(self._expire_loop(), name="command expiry")

    async def stop(self) -> None:
        """Stop the expiry and every wait for an ACK."""
        tasks = list(self._tasks)
        if self._expiry is not None:
            tasks.append(self._expiry)
            self._expiry = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("command task %s failed", task.get_name(), exc_info=task.exception())

    # ---- submitting -----------------------------------------------------------------------------

    async def submit(self, request: CommandRequest, reply: StatusCallback) -> list[CommandStatus]:
        """Route a command; statuses go to ``reply``. Returns the first status of each device."""
        if request.device is not None:
            return [await self._to_device(request, request.device, reply)]
        assert request.protocol is not None
        targets = self.registry.online_of(request.protocol)
        if not targets:
            raise ClientError(ErrorCode.NOT_FOUND, f"no online device speaks {request.protocol!r}")
        return [await self._to_device(request, device, reply) for device in targets]

    def _reporter(
        self, request_id: Any, device: str, reply: StatusCallback
    ) -> Callable[..., CommandStatus]:
        def report(status: CommandStatus, **extra: Any) -> CommandStatus:
            self.metrics.command_results.labels(str(status)).inc()
            reply(command_status(request_id, device, status, **extra))
            return status

        return report

    async def _to_device(
        self, request: CommandRequest, device: str, reply: StatusCallback
    ) -> CommandStatus:
        report = self._reporter(request.request_id, device, reply)
        state = self.registry.get(device)
        if state is None:
            return report(CommandStatus.REJECTED, error=f"device {device!r} has never been seen")
        try:
            body = get_protocol(state.protocol).encode_command(request.command)
        except CommandError as e:
            return report(CommandStatus.REJECTED, error=str(e))
        links = self.links
        if state.online and links is not None and links.is_online(device):
            try:
                handle = await links.send_command(device, body)
            except DeviceNotOnline:
                pass  # went offline meanwhile: queue it below
            else:
                self._spawn(self._await_result(handle, report), f"ack {device}")
                return report(CommandStatus.SENT)
        elif state.online:
            forwarded = await self.engine.forward_command(device, body, reply)
            if forwarded is not None:
                return forwarded
        ts = now_ms()
        queued = await self.engine.enqueue_command(
            QueuedCommand(
                0,
                None if request.request_id is None else str(request.request_id),
                device,
                request.command,
                body,
                ts,
                ts + int(self._settings().command_ttl * 1000),
            )
        )
        request_id = request.request_id
        self._owners[queued.key] = lambda m: reply({**m, "id": request_id})
        return report(CommandStatus.QUEUED)

    async def _await_result(
        self, handle: CommandHandle, report: Callable[..., CommandStatus]
    ) -> None:
        result: CommandResult = await handle.result
        extra: dict[str, Any] = {}
        if result.code is not None:
            extra["code"] = result.code
        if result.error is not None:
            extra["error"] = result.error
        report(result.status, **extra)

    # ---- the offline queue ----------------------------------------------------------------------

    def device_online(self, device: str, session: str) -> None:
        """On WELCOME: deliver the device's queued commands, oldest first (in the background)."""
        self._spawn(self._deliver_queued(device, session), f"deliver {device}")

    async def _deliver_queued(self, device: str, session: str) -> None:
        for cmd in await self.engine.pending_commands(device, now_ms()):
            state = self.registry.get(device)
            if state is None or state.session != session or self.links is None:
                return
            owner = self._owners.get(cmd.key)
            self._delivering.add(cmd.key)
            try:
                handle = await self.links.send_command(device, cmd.body)
            except DeviceNotOnline:
                return  # still queued; delivered at the next WELCOME
            finally:
                self._delivering.discard(cmd.key)
            await self.engine.remove_command(cmd.key)
            self._owners.pop(cmd.key, None)
            report = self._reporter(None, device, owner or _nobody)
            report(CommandStatus.SENT)
            if owner is not None:
                self._spawn(self._await_result(handle, report), f"ack {device}")

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings().expiry_interval)
            try:
                expired = await self.engine.expire_commands(now_ms())
            except Exception:
                log.exception("command expiry failed")
                continue
            for cmd in expired:
                if cmd.key in self._delivering:
                    continue  # written to its device meanwhile: ``sent`` follows
                owner = self._owners.pop(cmd.key, None)
                self._reporter(None, cmd.device, owner or _nobody)(CommandStatus.EXPIRED)


def _nobody(message: dict[str, Any]) -> None:
    """Where statuses go when whoever gave a queued command has gone (or restarted)."""


__all__ = ["CommandRouter", "CommandSettings", "DeviceLinks"]
