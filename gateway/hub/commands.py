"""Command routing: from a dashboard or HTTP caller to devices, and every status back.

A command goes to an online device at once (``sent``, then ``acked``,
``nacked`` or ``timeout``), to the node that holds the device in a cluster,
or into the engine's offline queue (``queued``, then delivered oldest first
at the device's next WELCOME, or ``expired``). A device never seen, a
command its protocol cannot encode, a full offline queue or a failing
storage make it ``rejected``, with ``error`` saying which (docs/api.md §3.1).
One ``CommandStatus`` enum names these from the device session to the wire.

The offline queue is written to a device at most once, even across a crash:
delivery marks a page of commands as being sent, durably, before it writes
them, and a command found so marked at start-up ends as ``timeout`` with
error ``gateway restarted`` (docs/deployment.md, "What a crash can lose").
Delivery reads the queue a page at a time and keeps no more commands
outstanding than the device's in-flight allowance, so a long queue costs
bounded memory and goes at the pace of the device's ACKs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from devices import (
    CommandHandle,
    CommandResult,
    CommandStatus,
    DeviceNotOnline,
    SessionConfig,
)
from frames import CommandError, get_protocol

from ..metrics import Metrics
from .engine import Engine, StatusCallback
from .messages import ClientError, CommandRequest, ErrorCode, command_status, now_ms
from .records import CommandEvent, QueuedCommand, QueueFull, StoreError
from .registry import Registry
from .store import FaultLog

log = logging.getLogger(__name__)

#: Characters a command's ``id`` may have (as a string) by default
#: (``dashboards.max_command_id``): it is kept with a queued command for up to
#: ``command_ttl`` (docs/api.md §3).
MAX_COMMAND_ID = 128
#: How ``error`` begins in a ``rejected`` status when the storage failed;
#: ``POST .../commands`` answers those with 503 ``storage_unavailable``.
STORAGE_UNAVAILABLE = "storage unavailable"
#: The error of a command found being sent at start-up (docs/api.md §3.1).
GATEWAY_RESTARTED = "gateway restarted"
#: The error of a queued command whose device was deleted (docs/api.md §4).
DEVICE_DELETED = "device deleted"
# Statuses after which a command has no other (docs/api.md §3.1).
_FINAL = frozenset(
    {
        CommandStatus.ACKED,
        CommandStatus.NACKED,
        CommandStatus.TIMEOUT,
        CommandStatus.EXPIRED,
        CommandStatus.REJECTED,
    }
)
# Queued commands' final results named one by one in the log per expiry pass.
_NAMED_EXPIRED = 10
# Expired commands taken from storage at once (memory stays bounded).
_EXPIRE_BATCH = 1000
# Commands named one by one in the log at start-up, of those interrupted.
_NAMED_INTERRUPTED = 100


class DeviceLinks(Protocol):
    """What command routing needs of the device side (``devices.DeviceManager`` is one).

    One that also has a ``config`` (a ``SessionConfig``, as the manager has)
    gives its in-flight allowance to the delivery of queued commands.
    """

    def is_online(self, client_id: str) -> bool: ...

    async def send_command(self, client_id: str, body: bytes) -> CommandHandle: ...


@dataclass(frozen=True, slots=True)
class CommandSettings:
    """How long queued commands wait, how often their expiry is checked, and bounds."""

    command_ttl: float = 3600.0  # seconds a queued command waits for its device
    expiry_interval: float = 1.0
    max_command_id: int = MAX_COMMAND_ID  # characters of a command's id
    delivery_page: int = 100  # queued commands read from storage at once when delivering


def is_storage_unavailable(status: dict[str, Any]) -> bool:
    """True for a ``rejected`` status caused by a failing storage (not the caller's fault)."""
    error = status.get("error")
    return (
        status.get("status") == str(CommandStatus.REJECTED)
        and isinstance(error, str)
        and error.startswith(STORAGE_UNAVAILABLE)
    )


def new_command_id() -> str:
    """A gateway command_id: unique, also across nodes and restarts (a random UUID)."""
    return uuid.uuid4().hex


def nack_message(protocol: str, code: int) -> str:
    """What a device's ACK status ``code`` means, in words (docs/api.md §3.1 ``nacked``)."""
    return get_protocol(protocol).ack_codes.get(code) or f"device error code {code}"


def _write_error(error: BaseException) -> str:
    """The ``error`` of a command whose link failed while it was being written."""
    if isinstance(error, TimeoutError):
        return "write timed out"
    return "link lost"


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
        #: Commands rejected by a bound or a failing storage, by reason (for /metrics).
        self.refused: collections.Counter[str] = collections.Counter()
        # Statuses of queued commands go back to whoever gave them, by queue key.
        self._owners: dict[int, StatusCallback] = {}
        # One delivery of the offline queue per device at a time.
        self._deliveries: dict[str, asyncio.Task[None]] = {}
        # Deliveries the storage cut short: tried again once it works (device -> session).
        self._undelivered: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.Task[None] | None = None
        self._expiry_faults = FaultLog(log, "command expiry")
        self._delivery_faults = FaultLog(log, "delivery of queued commands")

    # ---- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Report the commands a crash interrupted; start the expiry of queued commands."""
        self._spawn(self._settle_interrupted(), "interrupted commands")
        self._expiry = asyncio.create_task(self._expire_loop(), name="command expiry")

    async def stop(self) -> None:
        """Stop the expiry, deliveries and every wait for an ACK."""
        tasks = list(self._tasks)
        if self._expiry is not None:
            tasks.append(self._expiry)
            self._expiry = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("command task %s failed", task.get_name(), exc_info=task.exception())

    # ---- submitting -----------------------------------------------------------------------------

    async def submit(self, request: CommandRequest, reply: StatusCallback) -> list[CommandStatus]:
        """Route a command; statuses go to ``reply``. Returns the first status of each device.

        Raises ``ClientError``: ``bad_request`` for an ``id`` over
        ``max_command_id`` characters, ``not_found`` for a protocol with no
        device online.
        """
        self._check_id(request)
        if request.device is not None:
            return [await self._to_device(request, request.device, reply)]
        assert request.protocol is not None
        targets = self.registry.online_of(request.protocol)
        if not targets:
            raise ClientError(ErrorCode.NOT_FOUND, f"no online device speaks {request.protocol!r}")
        # Each device on its own: one whose link cannot take the command now
        # holds up nobody else (docs/protocol.md §4).
        return list(
            await asyncio.gather(*(self._to_device(request, device, reply) for device in targets))
        )

    def _check_id(self, request: CommandRequest) -> None:
        request_id = request.request_id
        if request_id is None:
            return
        limit = self._settings().max_command_id
        try:
            length = len(str(request_id))
        except ValueError:  # an integer too long to print
            length = limit + 1
        if length > limit:
            self.refused["max_command_id"] += 1
            raise ClientError(
                ErrorCode.BAD_REQUEST, f"a command's id may have at most {limit} characters"
            )

    def _reporter(
        self,
        request_id: Any,
        device: str,
        reply: StatusCallback,
        command_id: str | None = None,
        *,
        queued: bool = False,
        log_each: bool = True,
    ) -> Callable[..., CommandStatus]:
        """The function that reports each status of one command: counted, logged in
        the command log (when it has a ``command_id``), and sent to ``reply``.

        ``queued``: the command went through the offline queue, so its final
        result is also counted apart, and logged (nobody may be left to hear
        it) unless ``log_each`` is False: a caller reporting many at once logs
        them together.
        """

        def report(status: CommandStatus, **extra: Any) -> CommandStatus:
            self.metrics.command_results.labels(str(status)).inc()
            if status is CommandStatus.NACKED:
                state = self.registry.get(device)
                if state is not None:
                    state.nacks_count += 1
                code = extra.get("code")
                if isinstance(code, int):
                    extra["message"] = nack_message(
                        state.protocol if state is not None else "", code
                    )
            if command_id is not None:
                self.engine.log_command(
                    CommandEvent(command_id, request_id, device, str(status), now_ms(), extra)
                )
            if queued and status in _FINAL:
                self.metrics.queued_command_results.labels(str(status)).inc()
                if log_each:
                    log.info(
                        "queued command %s (id=%s) for %s: %s%s",
                        command_id,
                        request_id,
                        device,
                        status,
                        "".join(f" {k}={v}" for k, v in extra.items()),
                    )
            reply(command_status(request_id, device, status, command_id, **extra))
            return status

        return report

    async def _to_device(
        self, request: CommandRequest, device: str, reply: StatusCallback
    ) -> CommandStatus:
        command_id = new_command_id()
        report = self._reporter(request.request_id, device, reply, command_id)
        state = self.registry.get(device)
        if state is None:
            return report(CommandStatus.REJECTED, error=f"device {device!r} has never been seen")
        state.commands_count += 1
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
            except (OSError, TimeoutError) as e:
                # The link failed while the command was being written: it may
                # have reached the device, so it is not queued to be sent again.
                return report(CommandStatus.TIMEOUT, error=_write_error(e))
            else:
                return self._sent(handle, report, f"ack {device}")
        elif state.online:
            # Each status the holding node reports goes through this node's
            # reporter: counted, kept in its command log, sent with the caller's id.
            def relay(message: dict[str, Any]) -> None:
                extra = {k: message[k] for k in ("code", "error") if k in message}
                report(CommandStatus(message["status"]), **extra)

            forwarded = await self.engine.forward_command(device, body, relay, command_id)
            if forwarded is not None:
                return forwarded
        return await self._enqueue(request, device, body, reply, report, command_id)

    async def _enqueue(
        self,
        request: CommandRequest,
        device: str,
        body: bytes,
        reply: StatusCallback,
        report: Callable[..., CommandStatus],
        command_id: str,
    ) -> CommandStatus:
        ts = now_ms()
        try:
            queued = await self.engine.enqueue_command(
                QueuedCommand(
                    0,
                    None if request.request_id is None else str(request.request_id),
                    device,
                    request.command,
                    body,
                    ts,
                    ts + int(self._settings().command_ttl * 1000),
                    command_id,
                )
            )
        except QueueFull as e:
            self.refused[e.limit] += 1
            return report(CommandStatus.REJECTED, error=str(e))
        except StoreError as e:
            # The storage logs and counts its own fault; the caller gets an answer.
            self.refused["storage_unavailable"] += 1
            why = self.engine.health().failing or str(e)
            return report(CommandStatus.REJECTED, error=f"{STORAGE_UNAVAILABLE}: {why}")
        request_id = request.request_id
        self._owners[queued.key] = lambda m: reply({**m, "id": request_id})
        return report(CommandStatus.QUEUED)

    def run_forwarded(
        self, device: str, body: bytes, answer: Callable[[str, dict[str, Any]], None]
    ) -> None:
        """Another node's command for a device whose link is on this node (docs/cluster.md).

        Each status goes to ``answer`` (``sent``, then ``acked``, ``nacked`` or
        ``timeout``, with ``code``/``error``); ``gone`` when the device has no
        link here any more (the other node then queues the command).
        """
        self._spawn(self._run_forwarded(device, body, answer), f"forwarded {device}")

    async def _run_forwarded(
        self, device: str, body: bytes, answer: Callable[[str, dict[str, Any]], None]
    ) -> None:
        links = self.links
        if links is None or not links.is_online(device):
            answer("gone", {})
            return
        try:
            handle = await links.send_command(device, body)
        except DeviceNotOnline:
            answer("gone", {})
            return
        except (OSError, TimeoutError) as e:
            answer(str(CommandStatus.TIMEOUT), {"error": _write_error(e)})
            return
        if not (handle.seq < 0 and handle.result.done()):
            answer(str(CommandStatus.SENT), {})
        result = await handle.result
        extra: dict[str, Any] = {}
        if result.code is not None:
            extra["code"] = result.code
        if result.error is not None:
            extra["error"] = result.error
        answer(str(result.status), extra)

    def _sent(
        self, handle: CommandHandle, report: Callable[..., CommandStatus], name: str
    ) -> CommandStatus:
        """Report ``sent`` and, later, the result; or only the result of one never written."""
        if handle.seq < 0 and handle.result.done():
            # The link could not take it within the command timeout (the device
            # does not read): it was never written, and its result says so.
            return _report_result(handle.result.result(), report)
        self._spawn(self._await_result(handle, report), name)
        return report(CommandStatus.SENT)

    async def _await_result(
        self, handle: CommandHandle, report: Callable[..., CommandStatus]
    ) -> None:
        _report_result(await handle.result, report)

    # ---- the offline queue ----------------------------------------------------------------------

    def device_online(self, device: str, session: str) -> None:
        """On WELCOME: deliver the device's queued commands, oldest first (in the background)."""
        previous = self._deliveries.get(device)
        task = self._spawn(self._deliver_queued(device, session, previous), f"deliver {device}")
        self._deliveries[device] = task
        task.add_done_callback(partial(self._delivery_ended, device))

    def device_elsewhere(self, device: str) -> None:
        """The device came online on another cluster node: the commands queued on this
        node for it are forwarded there, oldest first (docs/cluster.md)."""
        previous = self._deliveries.get(device)
        task = self._spawn(self._deliver_remote(device, previous), f"forward queue {device}")
        self._deliveries[device] = task
        task.add_done_callback(partial(self._delivery_ended, device))

    def _elsewhere(self, device: str) -> bool:
        state = self.registry.get(device)
        return (
            state is not None
            and state.online
            and state.node is not None
            and state.node != self.engine.node
        )

    async def _deliver_remote(self, device: str, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        page_size = max(1, self._settings().delivery_page)
        after = 0
        try:
            while self._elsewhere(device):
                page = await self.engine.pending_commands(
                    device, now_ms(), after=after, limit=page_size
                )
                if not page:
                    return
                after = page[-1].key
                for cmd in page:
                    if not self._elsewhere(device):
                        return
                    # Durable before it leaves: written at most once, as locally.
                    if not await self.engine.mark_sending([cmd.key]):
                        continue
                    if not await self._forward_queued(device, cmd):
                        await self.engine.unmark_sending([cmd.key])
                        return
                    await self.engine.remove_commands([cmd.key])
        except StoreError as e:
            self._delivery_faults.failed(e)

    async def _forward_queued(self, device: str, cmd: QueuedCommand) -> bool:
        """One queued command to the node holding the device; False if it never left."""
        reporter: list[Callable[..., CommandStatus]] = []
        unavailable = False

        def relay(message: dict[str, Any]) -> None:
            nonlocal unavailable
            error = message.get("error")
            if message["status"] == "rejected" and str(error).startswith("cluster_unavailable"):
                unavailable = True  # never sent: it stays queued
                return
            if not reporter:
                reporter.append(self._queued_reporter(cmd))
            extra = {k: message[k] for k in ("code", "error") if k in message}
            reporter[0](CommandStatus(message["status"]), **extra)

        status = await self.engine.forward_command(
            device, cmd.body, relay, cmd.gateway_id or new_command_id()
        )
        return status is not None and not unavailable

    def _delivery_ended(self, device: str, task: asyncio.Task[None]) -> None:
        if self._deliveries.get(device) is task:
            del self._deliveries[device]

    def _current(self, device: str, session: str) -> bool:
        state = self.registry.get(device)
        return (
            state is not None
            and state.online
            and state.session == session
            and self.links is not None
        )

    async def _deliver_queued(
        self, device: str, session: str, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None and not previous.done():
            # Oldest first, one delivery at a time: the older one ends at once,
            # its session being gone, and leaves its unsent commands queued.
            await asyncio.wait([previous])
        try:
            await self._deliver(device, session)
        except StoreError as e:
            # What is left stays queued; tried again once the storage works.
            self._undelivered[device] = session
            self._delivery_faults.failed(e)
        else:
            self._delivery_faults.ok()

    async def _deliver(self, device: str, session: str) -> None:
        links = self.links
        if links is None:
            return
        # No more outstanding (written, result not yet known) than the device's
        # in-flight allowance: delivery goes at the pace of its ACKs.
        config = getattr(links, "config", None)
        if not isinstance(config, SessionConfig):
            config = SessionConfig()
        window = config.max_inflight_commands
        page_size = max(1, self._settings().delivery_page)
        outstanding = 0
        room = asyncio.Event()

        def freed(_: asyncio.Task[None]) -> None:
            nonlocal outstanding
            outstanding -= 1
            room.set()

        after = 0
        while self._current(device, session):
            page = await self.engine.pending_commands(
                device, now_ms(), after=after, limit=page_size
            )
            if not page:
                return
            after = page[-1].key
            position = 0
            while position < len(page):
                while outstanding >= window:
                    room.clear()
                    await room.wait()
                if not self._current(device, session):
                    return
                batch = page[position : position + window - outstanding]
                position += len(batch)
                by_key = {cmd.key: cmd for cmd in batch}
                # Durable before any byte is written: a crash from here on ends
                # these as interrupted, never as sent twice.
                marked = [by_key[key] for key in await self.engine.mark_sending(list(by_key))]
                watches, whole = await self._write_marked(device, marked, links)
                for watch in watches:
                    outstanding += 1
                    watch.add_done_callback(freed)
                if not whole:
                    return  # the link took no more: the rest waits for the next session

    async def _write_marked(
        self, device: str, marked: Sequence[QueuedCommand], links: DeviceLinks
    ) -> tuple[list[asyncio.Task[None]], bool]:
        """Write commands marked as being sent: the waits for their results, and
        whether the link took them all.

        Those written leave the queue. At the first that cannot be written
        (the device went away, or does not read), the rest wait for the
        device's next session, unmarked.
        """
        written: list[int] = []
        watches: list[asyncio.Task[None]] = []
        rest: list[int] = []  # marked, never handed to the link: they wait again
        whole = False
        try:
            for i, cmd in enumerate(marked):
                rest = [c.key for c in marked[i + 1 :]]
                try:
                    handle = await links.send_command(device, cmd.body)
                except DeviceNotOnline:
                    rest.insert(0, cmd.key)
                    break
                except (OSError, TimeoutError) as e:
                    written.append(cmd.key)  # it may have reached the device: never again
                    self._queued_reporter(cmd)(CommandStatus.TIMEOUT, error=_write_error(e))
                    break
                except asyncio.CancelledError:
                    # Stopping: this one may have been written (kept marked, it
                    # ends as interrupted); the others were not.
                    raise
                written.append(cmd.key)
                report = self._queued_reporter(cmd)
                if handle.seq < 0 and handle.result.done():
                    # Not written within the command timeout: the device does not read.
                    _report_result(handle.result.result(), report)
                    break
                report(CommandStatus.SENT)
                watches.append(self._spawn(self._await_result(handle, report), f"ack {device}"))
            else:
                rest = []
                whole = True
        finally:
            if rest:
                await self.engine.unmark_sending(rest)
            if written:
                await self.engine.remove_commands(written)
        return watches, whole

    def _queued_reporter(
        self, cmd: QueuedCommand, *, log_each: bool = True
    ) -> Callable[..., CommandStatus]:
        owner = self._owners.pop(cmd.key, None)
        # The owner puts back the request's own id (a number stays a number);
        # the queue keeps it as text, for the log and whoever else hears it.
        return self._reporter(
            cmd.command_id,
            cmd.device,
            owner or _nobody,
            cmd.gateway_id,
            queued=True,
            log_each=log_each,
        )

    def device_deleted(self, commands: Sequence[QueuedCommand]) -> None:
        """The queued commands of a device deleted over the API: each ends ``expired``."""
        for cmd in commands:
            self._queued_reporter(cmd, log_each=False)(CommandStatus.EXPIRED, error=DEVICE_DELETED)
        if commands:
            log.info(
                "%d queued commands for %s ended as expired (%s): %s",
                len(commands),
                commands[0].device,
                DEVICE_DELETED,
                _named(commands),
            )

    async def _settle_interrupted(self) -> None:
        """End the commands the last process was writing when it stopped (docs/api.md §3.1)."""
        try:
            found = await self.engine.interrupted_commands()
        except StoreError as e:
            log.error("cannot read the commands interrupted by the last stop: %s", e)
            return
        if not found:
            return
        log.warning(
            "%d queued commands were being sent when the gateway stopped: each ends as "
            "timeout (%s) and is never sent again",
            len(found),
            GATEWAY_RESTARTED,
        )
        for i, cmd in enumerate(found):
            if i < _NAMED_INTERRUPTED:
                log.info(
                    "command id=%s key=%d for %s: timeout (%s)",
                    cmd.command_id,
                    cmd.key,
                    cmd.device,
                    GATEWAY_RESTARTED,
                )
            # Whoever gave it was connected to the process that died: counted only
            # (and kept in the command log, where an HTTP caller finds it).
            self._queued_reporter(cmd, log_each=False)(
                CommandStatus.TIMEOUT, error=GATEWAY_RESTARTED
            )

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings().expiry_interval)
            try:
                while True:
                    expired = await self.engine.expire_commands(now_ms(), _EXPIRE_BATCH)
                    for cmd in expired:
                        self._queued_reporter(cmd, log_each=False)(CommandStatus.EXPIRED)
                    if expired:
                        log.info(
                            "%d queued commands expired (command_ttl): %s",
                            len(expired),
                            _named(expired),
                        )
                    if len(expired) < _EXPIRE_BATCH:
                        break
            except Exception as e:
                # Logged when it begins and now and then, not every interval.
                self._expiry_faults.failed(e)
                continue
            self._expiry_faults.ok()
            self._redeliver()

    def _redeliver(self) -> None:
        """Deliveries a storage fault cut short: again, now that the storage answers."""
        undelivered, self._undelivered = self._undelivered, {}
        for device, session in undelivered.items():
            if self._current(device, session) and device not in self._deliveries:
                self.device_online(device, session)


def _report_result(result: CommandResult, report: Callable[..., CommandStatus]) -> CommandStatus:
    extra: dict[str, Any] = {}
    if result.code is not None:
        extra["code"] = result.code
    if result.error is not None:
        extra["error"] = result.error
    return report(result.status, **extra)


def _named(commands: Sequence[QueuedCommand]) -> str:
    """The first few of ``commands`` by command_id, client id and device, for one log line."""
    shown = ", ".join(
        f"{c.gateway_id} (id={c.command_id}) for {c.device}" for c in commands[:_NAMED_EXPIRED]
    )
    return shown + (", ..." if len(commands) > _NAMED_EXPIRED else "")


def _nobody(message: dict[str, Any]) -> None:
    """Where statuses go when whoever gave a queued command has gone (or restarted)."""


__all__ = [
    "DEVICE_DELETED",
    "GATEWAY_RESTARTED",
    "MAX_COMMAND_ID",
    "STORAGE_UNAVAILABLE",
    "CommandRouter",
    "CommandSettings",
    "DeviceLinks",
    "is_storage_unavailable",
    "nack_message",
    "new_command_id",
]
