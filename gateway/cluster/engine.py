"""``RedisEngine``: the hub's ``Engine`` seam filled by a Redis server shared by N nodes.

One Redis stream, the *log*, carries every node's telemetry and presence in
one order; a Lua script (gateway/cluster/scripts.py) gives each entry the next
integer offset as its explicit id. Every node reads the whole log from its
cursor (``XREAD BLOCK`` on a connection of its own) and keeps a replica of the
telemetry in its own SQLite, which answers replay, history and ``last`` on
that node. What a node is responsible for (its devices' registry rows, its
queued commands and its command log) stays in its own SQLite too, so a Redis
wiped clean is reseeded from the nodes. See docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from devices import CommandStatus, DeviceTelemetry
from frames.backoff import Backoff, BackoffPolicy

from ..hub.engine import EngineSink, LocalEngine, Presence, StatusCallback
from ..hub.messages import dumps
from ..hub.records import (
    CommandEvent,
    CommandLog,
    DeviceDeletion,
    DeviceRecord,
    QueuedCommand,
    StoreHealth,
    TelemetryRecord,
)
from .config import ClusterConfig
from .scripts import DELETE, LABELS, LEASE, OFFLINE, ONLINE, RESET, TELEMETRY
from .wire import Line, decode_batch, decode_line, encode_batch, split_batch

log = logging.getLogger(__name__)

_encode = dumps  # compact JSON, set up once (gateway/hub/messages.py)

# Telemetry messages per sequencer call at most: one round trip for whatever
# waited. Not smaller: a node whose loop is slowed for a moment (a busy
# machine) sees its calls take longer; with a small cap its sequencer then
# fell behind its devices for good (a cap of 500 at 100 ms a call is 5,000
# messages/s, a node's share of the target load), and its outbox grew to
# seconds of telemetry. The whole outbox in one call catches up at once.
_BATCH = 5000
# Entries per XREAD (an entry is a presence change or a batch of up to _BATCH
# messages, a few dozen at the target load): small enough that a node
# catching up yields to its devices (it also yields after each batch).
_READ_COUNT = 20
# Seconds the sequencer and the reader wait to let a batch gather: each Redis
# call costs the node 50-100 us of Python (redis-py), so at a few thousand
# messages/s one call per message cost 3-4x the single node's CPU per frame.
_LINGER = 0.005
# The spool keeps at least this many messages (``cluster.spool`` 0 included).
_SPOOL_FLOOR = 500
# Own batches kept until they come back from the log (normally a handful).
_SENT_KEPT = 1000
# Reconnect backoff (s): full jitter, doubled up to the cap, reset after a success.
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0
# Redis unreachable this long: /healthz says degraded (docs/cluster.md).
_DEGRADED_AFTER = 2.0
# Seconds a command's statuses stay in Redis for other nodes' GET /api/commands/{id}.
_COMMAND_LOG_TTL = 7 * 24 * 3600


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class ClusterCounters:
    """The node's cluster counters (``/metrics``)."""

    sequenced: int = 0  # telemetry messages this node had sequenced
    read: int = 0  # log entries this node read
    spool_dropped: int = 0  # telemetry dropped at the spool's bound, never sequenced
    nodes_lost: int = 0  # devices this node declared node_lost
    redis_errors: int = 0
    trimmed: int = 0  # log entries trimmed before this node read them


def _backoff() -> Backoff:
    """The project's one reconnect backoff (frames.backoff), with the cluster's bounds."""
    return Backoff(BackoffPolicy(_BACKOFF_MIN, _BACKOFF_MAX))


@dataclass(frozen=True, slots=True)
class _Share:
    """A registry change for Redis: one of this node's devices came or went (fenced)."""

    presence: Presence
    record: DeviceRecord


class RedisEngine:
    """A node of a cluster: ``LocalEngine`` for what it keeps, Redis for what it shares."""

    def __init__(self, local: LocalEngine, config: ClusterConfig) -> None:
        assert config.node_id is not None
        self.local = local
        self.config = config
        self._node = config.node_id
        p = config.prefix
        self._k_seq, self._k_log = f"{p}:seq", f"{p}:log"
        self._k_dev, self._k_owner = f"{p}:dev", f"{p}:owner"
        self._k_fence, self._k_nodes = f"{p}:fence", f"{p}:nodes"
        self._k_batch, self._k_labels = f"{p}:batch", f"{p}:labels"
        self._k_inbox = self._inbox(self._node)
        self._inbox_cursor = f"{_now_ms()}-0"  # entries from before this start are stale
        # Commands this node forwarded, by command_id: where their statuses go,
        # and the first one awaited by ``forward_command``.
        self._forwarded: dict[str, tuple[StatusCallback, asyncio.Future[CommandStatus | None]]] = {}
        self._sink: EngineSink | None = None
        self._r: aioredis.Redis | None = None
        self._rx: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Telemetry waiting for its offset (the spool while Redis is away).
        self._outbox: deque[tuple[DeviceTelemetry, str]] = deque()
        self._wake = asyncio.Event()
        # Registry changes, applied in order (retried while Redis is away).
        self._ops: deque[Callable[[], Awaitable[None]] | _Share] = deque()
        self._ops_wake = asyncio.Event()
        # Set when both the outbox and the registry changes are empty.
        self._idle = asyncio.Event()
        # Own batches sequenced, by their first offset, until they come back
        # from the log: their messages are delivered from here, decoded
        # already, with when each frame was decoded (the pipeline latency).
        self._sent: dict[int, list[tuple[DeviceTelemetry, str]]] = {}
        # The batch being sequenced, with its id: retried as it is (the same
        # messages, the same id) until Redis answers, so a call that timed out
        # after Redis ran it is not sequenced twice (scripts.TELEMETRY).
        self._inflight: tuple[str, list[tuple[DeviceTelemetry, str]]] | None = None
        self._run = os.urandom(6).hex()  # batch ids of another run never match
        self._batches = 0
        # Own messages already delivered here unsequenced (Redis was away).
        self._shown: set[tuple[str, int, int]] = set()
        # This node's online devices: their fences and what reseeds Redis.
        self._mine: dict[str, tuple[Presence, DeviceRecord]] = {}
        self._fences: dict[str, str] = {}
        # The labels set over the API as this node knows them (the hub's copy):
        # a change read from the log is applied only when it differs.
        self._labels: dict[str, dict[str, Any]] = {}
        # Local writes started by entries of the log (labels, deletions).
        self._local_writes: set[asyncio.Task[None]] = set()
        self._cursor = 0  # the last offset read from the log
        self._hwm = 0  # the highest offset this node has seen (kept in its SQLite)
        self._nodes: list[str] = [self._node]
        self._last_ok = time.monotonic()
        self._failing: str | None = None
        self._connected = False
        self.counters = ClusterCounters()

    # ---- the seam's properties ------------------------------------------------------------------

    @property
    def node(self) -> str:
        """This node's name (``--node-id``)."""
        return self._node

    @property
    def clustered(self) -> bool:
        """A node of a cluster."""
        return True

    def nodes(self) -> list[str]:
        """The live nodes (their leases not expired), this one included."""
        return sorted(set(self._nodes) | {self._node})

    def cluster_status(self) -> dict[str, Any]:
        """``/healthz``'s ``cluster`` object (docs/api.md §4)."""
        out: dict[str, Any] = {
            "node": self._node,
            "nodes": self.nodes(),
            "state": "degraded" if self.degraded else "ok",
        }
        if self.degraded:
            out["error"] = self._failing or "redis unreachable"
        return out

    @property
    def degraded(self) -> bool:
        """True while Redis has been unreachable for a while."""
        return (
            self._failing is not None and time.monotonic() - self._last_ok > _DEGRADED_AFTER
        ) or not self._connected

    def _ok(self) -> None:
        self._last_ok = time.monotonic()
        self._failing = None

    def _fail(self, what: str, e: Exception) -> None:
        self.counters.redis_errors += 1
        first = self._failing is None
        self._failing = f"cluster_unavailable: {what}: {e}"
        if first:
            log.warning("cluster: %s failed: %s", what, e)
            # What waits for its offset reaches this node's dashboards now
            # (the batch in flight too: its reply may never come).
            waiting = list(self._outbox)
            if self._inflight is not None:
                waiting[:0] = self._inflight[1]
            for event, data_json in waiting:
                self._show(event, data_json)

    def _inbox(self, node: str) -> str:
        return f"{self.config.prefix}:inbox:{node}"

    # ---- life cycle -----------------------------------------------------------------------------

    async def _connect(self) -> None:
        if self._r is not None:
            return
        cfg = self.config
        url = cfg.url
        assert url is not None
        self._r = aioredis.Redis.from_url(
            url,
            password=cfg.password,
            decode_responses=True,
            socket_timeout=3.0,
            socket_connect_timeout=3.0,
            retry_on_timeout=False,
            protocol=2,
        )
        # Blocking reads on a connection of their own, with a socket timeout
        # longer than the block: a dead link is noticed, a quiet one is not an error.
        self._rx = aioredis.Redis.from_url(
            url,
            password=cfg.password,
            decode_responses=True,
            socket_timeout=cfg.block + 5.0,
            socket_connect_timeout=3.0,
            retry_on_timeout=False,
            protocol=2,
        )
        self._s_telemetry = self._r.register_script(TELEMETRY)
        self._s_online = self._r.register_script(ONLINE)
        self._s_offline = self._r.register_script(OFFLINE)
        self._s_lease = self._r.register_script(LEASE)
        self._s_reset = self._r.register_script(RESET)
        self._s_labels = self._r.register_script(LABELS)
        self._s_delete = self._r.register_script(DELETE)
        newest = await self.local.history(0, limit=1, newest=True)
        self._hwm = self._cursor = newest[0].offset if newest else 0

    async def open(self, sink: EngineSink) -> None:
        """Join the cluster: take a lease, learn the registry, start reading the log."""
        await self._connect()
        await self.local.open(sink)
        self._sink = sink
        try:
            # Devices Redis says this node holds are from its previous run
            # (killed, restarted before its lease expired): offline now.
            await self._s_reset(
                keys=[self._k_seq, self._k_log, self._k_dev, self._k_owner],
                args=[self._floor(), self.config.stream_maxlen, self._node, _now_ms()],
            )
            await self._lease()
            await self._load_registry(sink)
        except (RedisError, OSError) as e:
            # Started while Redis is away: local work goes on (degraded).
            self._fail("joining the cluster", e)
        else:
            self._connected = True
        for coro, name in (
            (self._read_loop(), "cluster log reader"),
            (self._send_loop(), "cluster sequencer"),
            (self._ops_loop(), "cluster registry"),
            (self._lease_loop(), "cluster lease"),
        ):
            self._tasks.append(asyncio.create_task(coro, name=name))

    async def close(self) -> None:
        """Say this node's devices went (``shutdown``), leave the cluster, stop."""
        # Registry changes already queued (the devices' offline) get a chance.
        self._idle.clear()
        if self._ops or self._outbox:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 3.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._local_writes, return_exceptions=True)
        self._tasks.clear()
        if self._r is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._r.zrem(self._k_nodes, self._node)
            await self._r.aclose()
        if self._rx is not None:
            await self._rx.aclose()
        self._r = self._rx = None
        self._sink = None
        await self.local.close()

    async def _load_registry(self, sink: EngineSink) -> None:
        """Other nodes' devices, as presence (the hub's registry learns them)."""
        assert self._r is not None
        entries: Any = await self._r.hgetall(self._k_dev)
        for device, raw in entries.items():
            e = json.loads(raw)
            if e.get("node") == self._node:
                continue
            sink.deliver_presence(_presence(device, e, str(e.get("node", ""))))

    # ---- telemetry ------------------------------------------------------------------------------

    def publish_telemetry(self, event: DeviceTelemetry) -> None:
        """To the spool; the sequencer task gives it its offset. Never blocks."""
        outbox = self._outbox
        if len(outbox) >= max(self.config.spool, _SPOOL_FLOOR):
            gone, _ = outbox.popleft()
            self._shown.discard((gone.client_id, gone.seq, gone.ts))
            self.counters.spool_dropped += 1
        data_json = _encode(event.data)
        outbox.append((event, data_json))
        if self._failing is not None:
            self._show(event, data_json)
        self._wake.set()

    def _show(self, event: DeviceTelemetry, data_json: str) -> None:
        """Deliver an own message to this node's dashboards before it has an offset
        (``"offset": null``): Redis is away (docs/cluster.md, "Degraded mode")."""
        key = (event.client_id, event.seq, event.ts)
        if key in self._shown or self._sink is None:
            return
        self._shown.add(key)
        # Not yet sequenced: None where the offset goes (the hub sends it as null).
        record = TelemetryRecord(
            cast(int, None), event.client_id, event.protocol, event.ts, event.seq, event.data
        )
        self._sink.deliver_telemetry(record, data_json, 0.0)

    def _floor(self) -> int:
        # Microseconds of wall clock, or above what this node has seen (a
        # board without a real-time clock boots in the past).
        return max(_now_ms() * 1000, self._hwm + 1)

    async def _send_loop(self) -> None:
        backoff = _backoff()
        while True:
            await self._wake.wait()
            await asyncio.sleep(_LINGER)
            self._wake.clear()
            while self._outbox or self._inflight is not None:
                try:
                    if self._inflight is None and self._failing is not None:
                        # Redis away: a new batch is formed only once it answers,
                        # so what waits stays in the spool, under its bound.
                        assert self._r is not None
                        await self._r.ping()
                    await self._sequence()
                except (RedisError, OSError) as e:
                    self._fail("sequencing telemetry", e)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
                self._ok()
            if not self._ops:
                self._idle.set()

    async def _sequence(self) -> None:
        """One call: the batch in flight again, else the next one from the outbox."""
        if self._inflight is None:
            outbox = self._outbox
            batch = [outbox.popleft() for _ in range(min(_BATCH, len(outbox)))]
            self._batches += 1
            self._inflight = (f"{self._run}.{self._batches}", batch)
        batch_id, batch = self._inflight
        heads, data = encode_batch(
            [(e.client_id, e.protocol, e.ts, e.seq, data_json) for e, data_json in batch]
        )
        cfg = self.config
        args: list[Any] = [
            self._floor(), cfg.stream_maxlen, self._node, len(batch), heads, data, batch_id
        ]  # fmt: skip
        assert self._r is not None
        first = await self._s_telemetry(keys=[self._k_seq, self._k_log, self._k_batch], args=args)
        self._inflight = None
        self.counters.sequenced += len(batch)
        first = int(first)
        if first > self._cursor:  # else the reader was quicker than this reply: read already
            sent = self._sent
            sent[first] = batch
            while len(sent) > _SENT_KEPT:  # never read back (trimmed from the log)
                del sent[next(iter(sent))]

    async def _read_loop(self) -> None:
        backoff = _backoff()
        block_ms = int(self.config.block * 1000)
        while True:
            try:
                assert self._rx is not None
                reply = await self._rx.xread(
                    {self._k_log: f"{self._cursor}-0", self._k_inbox: self._inbox_cursor},
                    count=_READ_COUNT,
                    block=block_ms,
                )
            except (RedisError, OSError) as e:
                self._fail("reading the log", e)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._ok()
            streams: Any = reply or []
            for stream, entries in streams:
                if stream == self._k_inbox:
                    for entry_id, fields in entries:
                        self._inbox_cursor = entry_id
                        self._message(fields)
                    continue
                for entry_id, fields in entries:
                    self._entry(int(entry_id.split("-", 1)[0]), fields)
                    if fields.get("k") in ("t", "b"):
                        # Between batches, the loop serves devices and the sequencer.
                        await asyncio.sleep(0)
            if streams and sum(len(entries) for _, entries in streams) < _READ_COUNT:
                # Caught up: let the next read find a few entries rather than
                # one. (Behind, read on at once.)
                await asyncio.sleep(_LINGER)

    def _entry(self, offset: int, f: dict[str, str]) -> None:
        if offset <= self._cursor:
            return
        self._cursor = offset
        self._hwm = max(self._hwm, offset)
        sink = self._sink
        kind = f.get("k")
        if kind == "t" or kind == "b":
            self._telemetry_entry(offset, kind, f)
            return
        self.counters.read += 1
        if kind == "l":
            self._labels_entry(f)
            return
        if kind == "d":
            self._deletion_entry(f)
            return
        if kind == "p":
            node = f.get("n", "")
            if node == self._node:
                # Own presence was delivered when it happened; node_lost of this
                # node (it was cut off) is undone by the reseed of the next lease.
                return
            try:
                e = json.loads(f.get("e", "{}"))
            except ValueError:
                e = {}
            presence = Presence(
                f["d"],
                f.get("p", ""),
                f.get("o") == "1",
                int(f.get("t", "0")),
                f.get("r", ""),
                node=node,
                transport=e.get("transport"),
            )
            if sink is not None:
                sink.deliver_presence(presence)
            if presence.online and presence.device in self._mine:
                # Takeover across nodes: the newest HELLO, elsewhere, wins. The
                # registry already names the new node, so the old session's
                # end is no offline; its fence is dropped, so nothing reaches Redis.
                self._mine.pop(presence.device, None)
                self._fences.pop(presence.device, None)
                # The hub's ``replaced`` (not part of the sink's protocol: a
                # single node never calls it).
                replaced = getattr(sink, "replaced", None)
                if replaced is not None:
                    replaced(presence.device)

    def _telemetry_entry(self, offset: int, kind: str, f: dict[str, str]) -> None:
        """A batch of telemetry: into this node's replica, to its dashboards."""
        sink = self._sink
        append = self.local.storage.append_telemetry
        try:
            first = int(f["f"])
        except (KeyError, ValueError):
            log.warning("cluster: malformed telemetry entry %s skipped", offset)
            return
        mine = f.get("n") == self._node
        own = self._sent.pop(first, None) if mine else None
        if own is not None:
            # This node's own batch: its messages are here, decoded already.
            self.counters.read += len(own)
            shown = self._shown
            for i, (event, data_json) in enumerate(own):
                record = TelemetryRecord(
                    first + i, event.client_id, event.protocol, event.ts, event.seq, event.data
                )
                append(record, data_json)
                if shown:
                    # Delivered here already, with a null offset (Redis was away).
                    key = (event.client_id, event.seq, event.ts)
                    if key in shown:
                        shown.discard(key)
                        continue
                if sink is not None:
                    sink.deliver_telemetry(record, data_json, event.received)
            return
        lines: list[Line]
        try:
            if kind == "t":
                lines = decode_batch(f["h"], f["m"])
            else:
                lines = []
                for i, line in enumerate(split_batch(f["m"])):
                    try:
                        lines.append(decode_line(line))
                    except ValueError:
                        log.warning("cluster: malformed telemetry at offset %s skipped", first + i)
                        lines.append(("", "", 0, 0, ""))  # keeps the offsets of the others
        except (KeyError, ValueError) as e:
            log.warning("cluster: malformed telemetry entry %s skipped: %s", offset, e)
            return
        self.counters.read += len(lines)
        shown_here = self._shown if mine else None
        loads = json.loads
        for i, (device, protocol, ts, seq, data_json) in enumerate(lines):
            if not device:
                continue
            try:
                record = TelemetryRecord(first + i, device, protocol, ts, seq, loads(data_json))
            except ValueError:
                log.warning("cluster: malformed telemetry at offset %s skipped", first + i)
                continue
            if shown_here:
                # An own message read before its batch's reply reached the
                # sequencer, shown here while Redis was away: not again.
                key = (device, seq, ts)
                if key in shown_here:
                    shown_here.discard(key)
                    append(record, data_json)
                    continue
            append(record, data_json)
            if sink is not None:
                sink.deliver_telemetry(record, data_json, 0.0)

    def seam(self) -> int:
        """Above every offset delivered: the next one read from the log is higher."""
        return self._cursor + 1

    async def flush(self) -> None:
        """The local replica's pending rows committed."""
        await self.local.flush()

    async def history(
        self,
        after: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 100,
        from_ts: int | None = None,
        to_ts: int | None = None,
        newest: bool = False,
    ) -> list[TelemetryRecord]:
        """From this node's replica of the log."""
        return await self.local.history(
            after,
            until=until,
            device=device,
            protocol=protocol,
            limit=limit,
            from_ts=from_ts,
            to_ts=to_ts,
            newest=newest,
        )

    async def latest(self) -> dict[str, TelemetryRecord]:
        """From this node's replica."""
        return await self.local.latest()

    # ---- presence and the registry --------------------------------------------------------------

    def publish_presence(self, presence: Presence, record: DeviceRecord) -> None:
        """Kept locally, delivered locally now, and shared through the log (fenced)."""
        presence = Presence(
            presence.device,
            presence.protocol,
            presence.online,
            presence.ts,
            presence.reason,
            node=self._node,
            transport=record.transport,
        )
        self.local.publish_presence(presence, record)
        if presence.online:
            self._mine[presence.device] = (presence, record)
        else:
            self._mine.pop(presence.device, None)
        self._op(_Share(presence, record))

    def _op(self, op: Callable[[], Awaitable[None]] | _Share) -> None:
        self._ops.append(op)
        self._ops_wake.set()

    async def _share_many(self) -> int:
        """The presence changes at the front of the queue, in one pipeline (one round
        trip for the 1,000 HELLOs of a node's start-up, not 1,000); how many were done.

        A device's change after another of the same device waits for the next
        pipeline: its offline needs the fence its online returns.
        """
        assert self._r is not None
        shares: list[_Share] = []
        seen: set[str] = set()
        for op in self._ops:
            if not isinstance(op, _Share) or op.presence.device in seen or len(shares) >= 500:
                break
            seen.add(op.presence.device)
            shares.append(op)
        keys = [self._k_seq, self._k_log, self._k_dev, self._k_owner, self._k_fence]
        queued: list[tuple[str, bool]] = []  # (device, online), one per script queued
        async with self._r.pipeline(transaction=False) as pipe:
            for share in shares:
                presence, record = share.presence, share.record
                entry = _encode(
                    {
                        "node": self._node,
                        "online": presence.online,
                        "protocol": presence.protocol,
                        "transport": record.transport,
                        "ts": presence.ts,
                        "reason": presence.reason,
                        "first_seen": record.first_seen_ms,
                        "last_seen": record.last_seen_ms,
                    }
                )
                args: list[Any] = [
                    self._floor(), self.config.stream_maxlen, self._node, presence.device,
                    entry, presence.protocol, presence.ts, presence.reason,
                ]  # fmt: skip
                if presence.online:
                    await self._s_online(keys=keys, args=args, client=pipe)
                    queued.append((presence.device, True))
                else:
                    # Taken only once done: a failed pipeline is retried with it.
                    fence = self._fences.get(presence.device)
                    if fence is not None:
                        await self._s_offline(keys=keys, args=[*args, fence], client=pipe)
                        queued.append((presence.device, False))
            results: list[Any] = await pipe.execute() if queued else []
        for (device, online), result in zip(queued, results, strict=True):
            if online:
                self._fences[device] = str(result)
            else:
                self._fences.pop(device, None)
        return len(shares)

    async def _ops_loop(self) -> None:
        backoff = _backoff()
        while True:
            await self._ops_wake.wait()
            self._ops_wake.clear()
            while self._ops:
                head = self._ops[0]
                try:
                    done = 1
                    if isinstance(head, _Share):
                        done = await self._share_many()
                    else:
                        await head()
                except (RedisError, OSError) as e:
                    self._fail("sharing the registry", e)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                for _ in range(done):
                    self._ops.popleft()
                backoff.reset()
                self._ok()
            if not self._outbox and self._inflight is None:
                # (A batch in flight is not done: ``close`` waits for it too.)
                self._idle.set()

    async def _lease(self) -> None:
        assert self._r is not None
        ttl_ms = int(self.config.node_lost_after * 1000)
        had, live, lost = await self._s_lease(
            keys=[self._k_seq, self._k_log, self._k_dev, self._k_owner, self._k_nodes],
            args=[self._floor(), self.config.stream_maxlen, self._node, ttl_ms, self._hwm],
        )
        self._nodes = list(live)
        self.counters.nodes_lost += int(lost)
        if not had and self._mine:
            # Redis lost this node (wiped, or the node was declared lost while
            # cut off): announce its devices again, with new fences.
            log.info("cluster: reseeding %d devices of this node", len(self._mine))
            for presence, record in list(self._mine.values()):
                self._op(_Share(presence, record))
        if not had:
            # Redis may have been wiped: the labels it lost come back from here.
            await self._reseed_labels(await self._labels_missing())

    async def _labels_missing(self) -> dict[str, dict[str, Any]]:
        """This node's labels that Redis has no entry for."""
        if not self._labels or self._r is None:
            return {}
        devices = list(self._labels)
        present = await self._r.hmget(self._k_labels, devices)
        return {d: self._labels[d] for d, v in zip(devices, present, strict=True) if v is None}

    async def _lease_loop(self) -> None:
        period = self.config.node_lost_after / 4
        while True:
            await asyncio.sleep(period if self._failing is None else min(period, 0.5))
            try:
                await self._lease()
            except (RedisError, OSError) as e:
                self._fail("renewing the lease", e)
                continue
            self._connected = True
            self._ok()

    async def remember(self, record: DeviceRecord) -> None:
        """Kept locally; a device of this node that stops with it is offline (``shutdown``)."""
        await self.local.remember(record)
        mine = self._mine.pop(record.device, None)
        if mine is not None and record.offline_reason is not None:
            presence = Presence(
                record.device,
                record.protocol,
                False,
                record.last_seen_ms,
                record.offline_reason,
                node=self._node,
                transport=record.transport,
            )
            self._op(_Share(presence, record))

    async def known_devices(self) -> list[DeviceRecord]:
        """This node's registry rows (other nodes' devices come as presence at ``open``)."""
        return await self.local.known_devices()

    async def forget_devices(self, devices: list[str]) -> None:
        """Locally."""
        await self.local.forget_devices(devices)

    async def delete_device(self, device: str) -> DeviceDeletion:
        """Locally now, then on every node through the log (docs/cluster.md, "Labels and
        deletions"); retried in order while Redis is away."""
        deletion = await self.local.delete_device(device)
        self._labels.pop(device, None)
        self._op(lambda: self._share_deletion(device))
        return deletion

    async def _share_deletion(self, device: str) -> None:
        await self._s_delete(
            keys=[self._k_seq, self._k_log, self._k_dev, self._k_owner, self._k_labels],
            args=[self._floor(), self.config.stream_maxlen, self._node, device],
        )

    async def set_labels(self, device: str, labels: dict[str, Any] | None) -> None:
        """Locally (durably) now, then on every node through the log; retried in
        order while Redis is away."""
        await self.local.set_labels(device, labels)
        if labels is None:
            self._labels.pop(device, None)
        else:
            self._labels[device] = labels
        self._op(lambda: self._share_labels(device, labels))

    async def _share_labels(self, device: str, labels: dict[str, Any] | None) -> None:
        await self._s_labels(
            keys=[self._k_seq, self._k_log, self._k_labels],
            args=[
                self._floor(),
                self.config.stream_maxlen,
                self._node,
                device,
                "" if labels is None else _encode(labels),
            ],
        )

    async def labels(self) -> dict[str, dict[str, Any]]:
        """The cluster's labels: Redis's, where it has an entry (a tombstone "" is
        none), else this node's. Kept locally too, so that a node started while
        Redis is away still has them. Labels Redis has no entry for at all (it
        was wiped) are reseeded from this node."""
        local = await self.local.labels()
        try:
            await self._connect()
            assert self._r is not None
            shared: Any = await self._r.hgetall(self._k_labels)
        except (RedisError, OSError) as e:
            self._fail("reading the labels", e)
            self._labels = dict(local)
            return dict(local)
        out: dict[str, dict[str, Any]] = {}
        for device, raw in shared.items():
            try:
                value = json.loads(raw) if raw else None
            except ValueError:
                continue
            if isinstance(value, dict):
                out[device] = value
            if local.get(device) != value:
                await self.local.set_labels(device, value if isinstance(value, dict) else None)
        missing = {d: v for d, v in local.items() if d not in shared}
        out.update(missing)
        self._labels = dict(out)
        await self._reseed_labels(missing)
        return out

    async def _reseed_labels(self, labels: dict[str, dict[str, Any]]) -> None:
        """Labels this node keeps that Redis has no entry for (wiped): set if still absent."""
        if not labels or self._r is None:
            return
        with contextlib.suppress(RedisError, OSError):
            async with self._r.pipeline(transaction=False) as pipe:
                for device, value in labels.items():
                    pipe.hsetnx(self._k_labels, device, _encode(value))
                await pipe.execute()

    def _labels_entry(self, f: dict[str, str]) -> None:
        """Labels set on some node (this one too: the log's order wins everywhere)."""
        device = f.get("d", "")
        try:
            raw = f.get("v", "")
            value = json.loads(raw) if raw else None
        except ValueError:
            log.warning("cluster: malformed labels of %s skipped", device)
            return
        labels = value if isinstance(value, dict) else None
        if not device or self._labels.get(device) == labels:
            return
        if labels is None:
            self._labels.pop(device, None)
        else:
            self._labels[device] = labels
        self._local_write(self.local.set_labels(device, labels), f"labels of {device}")
        tell = getattr(self._sink, "labels_elsewhere", None)
        if tell is not None:
            tell(device, labels)

    def _deletion_entry(self, f: dict[str, str]) -> None:
        """A device deleted over the API on another node: deleted here too."""
        device = f.get("d", "")
        if not device or f.get("n") == self._node or device in self._mine:
            return  # this node deleted it already, or holds it (online again)
        self._labels.pop(device, None)
        self._local_write(self._delete_here(device), f"deleting {device}")

    async def _delete_here(self, device: str) -> None:
        deletion = await self.local.delete_device(device)
        tell = getattr(self._sink, "deleted_elsewhere", None)
        if tell is not None:
            tell(device, deletion)

    def _local_write(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro, name=f"cluster: {what}")
        self._local_writes.add(task)
        task.add_done_callback(self._local_written)

    def _local_written(self, task: asyncio.Task[None]) -> None:
        self._local_writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A storage fault: the hub reports the storage failing (/healthz).
            log.error("%s failed: %s", task.get_name(), task.exception())

    # ---- commands: kept by the node that took them ----------------------------------------------

    def log_command(self, event: CommandEvent) -> None:
        """Locally, durably, and to Redis so that every node answers for it."""
        self.local.log_command(event)
        self._op(lambda: self._share_log(event))

    async def _share_log(self, event: CommandEvent) -> None:
        assert self._r is not None
        key = f"{self.config.prefix}:cmd:{event.gateway_id}"
        row = _encode(
            {
                "id": event.request_id,
                "device": event.device,
                "status": event.status,
                "ts": event.ts,
                **event.extra,
            }
        )
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.rpush(key, row)
            pipe.expire(key, _COMMAND_LOG_TTL)
            await pipe.execute()

    async def command_log(self, gateway_id: str) -> CommandLog | None:
        """This node's, else the one another node shared through Redis."""
        found = await self.local.command_log(gateway_id)
        if found is not None or self._r is None:
            return found
        try:
            rows = await self._r.lrange(f"{self.config.prefix}:cmd:{gateway_id}", 0, -1)
        except (RedisError, OSError):
            return None
        if not rows:
            return None
        history = [json.loads(row) for row in rows]
        first = history[0]
        for entry in history:
            entry.pop("id", None)
            entry.pop("device", None)
        return CommandLog(
            gateway_id, first.get("id"), str(first.get("device")), history[-1]["status"], history
        )

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Locally, durably."""
        return await self.local.enqueue_command(command)

    async def pending_commands(
        self, device: str, now_ms: int, *, after: int = 0, limit: int | None = None
    ) -> list[QueuedCommand]:
        """Locally."""
        return await self.local.pending_commands(device, now_ms, after=after, limit=limit)

    async def mark_sending(self, keys: Sequence[int]) -> list[int]:
        """Locally."""
        return await self.local.mark_sending(keys)

    async def unmark_sending(self, keys: Sequence[int]) -> None:
        """Locally."""
        await self.local.unmark_sending(keys)

    async def remove_commands(self, keys: Sequence[int]) -> None:
        """Locally."""
        await self.local.remove_commands(keys)

    async def interrupted_commands(self) -> list[QueuedCommand]:
        """Locally."""
        return await self.local.interrupted_commands()

    async def expire_commands(self, now_ms: int, limit: int = 1000) -> list[QueuedCommand]:
        """Locally."""
        return await self.local.expire_commands(now_ms, limit)

    def health(self) -> StoreHealth:
        """The local storage's (the cluster's state is ``cluster_status``)."""
        return self.local.health()

    async def forward_command(
        self, device: str, body: bytes, reply: StatusCallback, command_id: str | None = None
    ) -> CommandStatus | None:
        """Through the holding node's inbox; its statuses come back through this node's.

        None when no other node holds the device (the hub queues the command).
        ``rejected`` with ``cluster_unavailable`` while Redis cannot be reached;
        ``timeout`` when the holding node does not answer.
        """
        if command_id is None:
            return None
        r = self._r
        try:
            if r is None or self.degraded:
                raise RedisError(self._failing or "redis unreachable")
            found = await r.hget(self._k_owner, device)
            if found is None:
                return None
            holder = found if isinstance(found, str) else found.decode()
            if holder == self._node:
                return None
            first: asyncio.Future[CommandStatus | None] = asyncio.get_running_loop().create_future()
            self._forwarded[command_id] = (reply, first)
            await r.xadd(
                self._inbox(holder),
                {"k": "c", "c": command_id, "d": device, "b": body.hex(), "f": self._node},
                maxlen=10_000,
                approximate=True,
            )
        except (RedisError, OSError) as e:
            self._forwarded.pop(command_id or "", None)
            reply({"status": str(CommandStatus.REJECTED), "error": f"cluster_unavailable: {e}"})
            return CommandStatus.REJECTED
        try:
            status = await asyncio.wait_for(asyncio.shield(first), self.config.node_lost_after)
        except TimeoutError:
            self._forwarded.pop(command_id, None)
            reply({"status": str(CommandStatus.TIMEOUT), "error": f"node {holder} did not answer"})
            return CommandStatus.TIMEOUT
        if status is None:
            self._forwarded.pop(command_id, None)
        return status

    def _message(self, f: dict[str, str]) -> None:
        """An entry of this node's inbox: a command to run, or a status of one forwarded."""
        kind = f.get("k")
        command_id = f.get("c", "")
        if kind == "c":
            run = getattr(self._sink, "run_forwarded", None)
            origin = f.get("f", "")
            if run is None or not origin:
                return
            try:
                body = bytes.fromhex(f.get("b", ""))
            except ValueError:
                return

            def answer(status: str, extra: dict[str, Any]) -> None:
                fields = {"k": "s", "c": command_id, "s": status, "x": _encode(extra)}
                self._op(lambda: self._answer(origin, fields))

            run(f.get("d", ""), body, answer)
        elif kind == "s":
            waiting = self._forwarded.get(command_id)
            if waiting is None:
                return
            reply, first = waiting
            status = f.get("s", "")
            if status == "gone":
                if not first.done():
                    first.set_result(None)
                return
            try:
                extra = json.loads(f.get("x", "{}"))
                value = CommandStatus(status)
            except ValueError:
                return
            reply({"status": status, **extra})
            if not first.done():
                first.set_result(value)
            if value not in (CommandStatus.SENT, CommandStatus.QUEUED):
                self._forwarded.pop(command_id, None)

    async def _answer(self, origin: str, fields: dict[str, str]) -> None:
        assert self._r is not None
        await self._r.xadd(self._inbox(origin), fields, maxlen=10_000, approximate=True)  # type: ignore[arg-type]


def _presence(device: str, e: dict[str, Any], node: str) -> Presence:
    return Presence(
        device,
        str(e.get("protocol", "")),
        bool(e.get("online")),
        int(e.get("ts") or 0),
        str(e.get("reason") or ""),
        node=node,
        transport=e.get("transport"),
    )
