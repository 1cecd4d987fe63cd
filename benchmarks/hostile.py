"""Measured claim: real devices and ``/healthz`` hold up while the gateway is attacked.

Run ``.venv/bin/python -m benchmarks.hostile`` (``--quick``: a few seconds a
phase, under a minute). One gateway (``iot-gateway serve``, default config but
for a device token and a viewer token, default log level) serves, all on
127.0.0.1 and in one run:

* 1,000 real devices at 10 Hz (``benchmarks.loadgen``'s devices and pacing,
  saying HELLO with the device token), each DATA stamped with its send time
  (``benchmarks.stamp``);
* one measuring dashboard subscribed to all (``benchmarks.dashboards``'s
  client), which bins each telemetry message by the phase it was sent in;
* ``/healthz`` polled 10 times a second, each on a new connection as a load
  balancer does.

Then phases of a warm-up and a measured window each, with the attacks of
docs/limits.md running from the phase's start to its window's end, each in its
own process (``--role attack``), so that its CPU is read apart:

``quiet``
    nothing else: the reference.
``flood``
    one connection that never says HELLO and writes valid-CRC DATA frames as
    fast as the gateway reads them; when the gateway closes it, it connects
    again at once (and it gives up a connection itself after 5 s).
``takeover``
    two connections fighting over one client_id with the device token: each
    says HELLO, holds the session until the gateway closes its link
    (REPLACED, or RATE_LIMITED past ``devices.max_takeovers``), and connects
    again at once.
``stalled+churn``
    50 viewer dashboards that subscribe to all and never read again (a 4 KiB
    receive buffer), and a loop of device sessions: connect, HELLO, WELCOME,
    close, over 200 client_ids.
``quiet-after``
    nothing again: does the gateway come back, and does it give memory back?
``all``
    the three attacks at once.

``--phases`` picks and orders them; ``stalled-only`` (no churn) and
``churn-only`` (no stalled dashboards) take the fourth attack apart. The
quiet phase always runs: it is the reference.

For each phase: the real devices' device -> dashboard latency (p50, p99,
p99.9) and what was lost, ``/healthz`` latency (p50, p99) and failures, the
gateway's RSS at the phase's start, at its window's start and end, and its
peak, its CPU, the attackers' own counts and CPU, the ``/metrics`` counters the
attacks move (links closed by reason, refusals by limit, ...; scraped between
phases, with how long each scrape waited for the gateway) and the bytes the
gateway logged. The targets (issue 12): every phase's p99s within 2x of the
quiet run's, and RSS growth bounded.

Figures go to the terminal and to ``benchmarks/results/hostile.json``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import aiohttp

from benchmarks import dashboards, harness, loadgen, stamp
from benchmarks.harness import Child
from frames import Data, Error, Welcome, encode_frame
from simulators.handshake import DeviceHandshake, MessageReader, encode, error_name
from tests.support.gateway import GatewayProcess

OPERATOR_TOKEN: Final = "bench-token"
VIEWER_TOKEN: Final = "bench-viewer-token"
DEVICE_TOKEN: Final = "bench-device-token"
DEVICE_PREFIX: Final = "real"
CONTESTED: Final = "contested"  # the client_id the takeover storm fights over
TARGET_RATIO: Final = 2.0

ATTACKS: Final = ("flood", "takeover", "stalled")


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    attacks: tuple[str, ...]
    # For the ``stalled`` attack: None takes --stalled / --churners.
    stalled: int | None = None
    churners: int | None = None


PHASES: Final = (
    Phase("quiet", ()),
    Phase("flood", ("flood",)),
    Phase("takeover", ("takeover",)),
    Phase("stalled+churn", ("stalled",)),
    Phase("quiet-after", ()),
    Phase("all", ATTACKS),
)
# Not run unless named in --phases: the two halves of stalled+churn apart.
EXTRA_PHASES: Final = (
    Phase("stalled-only", ("stalled",), churners=0),
    Phase("churn-only", ("stalled",), stalled=0),
)
ALL_PHASES: Final = {p.name: p for p in (*PHASES, *EXTRA_PHASES)}


def wall_to_loop(wall: float) -> float:
    """The event loop's time at wall-clock time ``wall`` (``time.time()``)."""
    return asyncio.get_running_loop().time() + (wall - time.time())


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


def emit(obj: Mapping[str, Any]) -> None:
    """One JSON line to the orchestrator."""
    print(json.dumps(obj), flush=True)


# ---- role: the real devices (benchmarks.loadgen's, with the device token) ---------------------


async def devices_role(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.gateway.rpartition(":")
    totals = loadgen.Totals((0.0, 0.0))
    ids = [f"{DEVICE_PREFIX}-{i:05d}" for i in range(args.devices)]
    t0 = time.monotonic()
    devices = await loadgen.connect_all(
        host, int(port), ids, "env-sensor", totals, 200, token=DEVICE_TOKEN
    )
    emit(
        {
            "event": "ready",
            "welcomed": totals.welcomed,
            "failed": totals.failed,
            "connect_s": round(time.monotonic() - t0, 3),
        }
    )
    plan = await harness.read_go()
    phases: list[dict[str, Any]] = plan["phases"]
    rate = args.devices * args.rate
    per_phase: list[dict[str, Any]] = []
    # One pace() per phase, back to back: the devices send without a pause, and
    # each phase's sends inside its window are counted apart.
    for i, ph in enumerate(phases):
        seg_end = phases[i + 1]["start"] if i + 1 < len(phases) else plan["send_end"]
        totals.window_ns = (int(ph["window_start"] * 1e9), int(ph["window_end"] * 1e9))
        totals.sent_in_window = 0
        lag = await loadgen.pace(
            devices, rate, wall_to_loop(ph["start"]), wall_to_loop(seg_end), False
        )
        per_phase.append(
            {
                "phase": ph["name"],
                "sent_in_window": totals.sent_in_window,
                "max_lag_s": round(lag, 4),
            }
        )
    lost_while_sending = totals.lost
    await asyncio.sleep(args.linger)
    for dev in devices:
        dev.close()
    await asyncio.sleep(0.2)
    return {
        "event": "done",
        "welcomed": totals.welcomed,
        "sent": totals.sent,
        "per_phase": per_phase,
        # Real devices whose link the gateway closed (a takeover of a real id,
        # a limit hit by a real device): should be none.
        "links_lost_while_sending": lost_while_sending,
        "errors": dict(totals.errors),
    }


# ---- role: the measuring dashboard (benchmarks.dashboards's client) ---------------------------


class PhasedReader(dashboards.Reader):
    """A dashboard's bookkeeping that bins each telemetry message by the phase it was sent in."""

    def __init__(self, stats: dashboards.Stats, windows: Sequence[tuple[float, float]]) -> None:
        super().__init__(0, stats)
        self.set_windows(windows)

    def set_windows(self, windows: Sequence[tuple[float, float]]) -> None:
        self.windows = [(int(a * 1e9), int(b * 1e9)) for a, b in windows]
        self.latencies = [array.array("i") for _ in windows]
        self.counts = [0] * len(windows)
        self.foreign = 0  # telemetry of a device that is not a real one: must stay 0

    def lines(self, lines: Iterable[str | bytes], received_ns: int) -> None:
        s = self.stats
        for line in lines:
            obj: dict[str, Any] = json.loads(line)
            if obj.get("op") != "telemetry":
                super().lines([line], received_ns)
                continue
            s.telemetry += 1
            if not str(obj.get("device", "")).startswith(DEVICE_PREFIX):
                self.foreign += 1
                continue
            offset = obj["offset"]
            if offset <= self.last_offset:
                s.regressions += 1
            self.last_offset = offset
            sent = stamp.sent_ns(obj["data"], received_ns)
            for i, (w0, w1) in enumerate(self.windows):
                if w0 <= sent <= w1:
                    self.counts[i] += 1
                    self.latencies[i].append((received_ns - sent) // 1000)
                    break


async def dashboard_role(args: argparse.Namespace) -> dict[str, Any]:
    stats = dashboards.Stats((0.0, 0.0))
    reader = PhasedReader(stats, [])
    subscribed = asyncio.Event()
    url = f"http://{args.http}/ws?token={OPERATOR_TOKEN}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        task = asyncio.ensure_future(dashboards.ws_dashboard(session, url, reader, subscribed))
        try:
            async with asyncio.timeout(30.0):
                waiter = asyncio.ensure_future(subscribed.wait())
                await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            if task.done():
                task.result()
                raise ConnectionError("the dashboard closed before subscribing")
            emit({"event": "ready"})
            plan = await harness.read_go()
            phases: list[dict[str, Any]] = plan["phases"]
            reader.set_windows([(p["window_start"], p["window_end"]) for p in phases])
            await sleep_until(plan["stop_at"])
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return {
        "event": "done",
        "telemetry": stats.telemetry,
        "per_phase": [
            {
                "phase": p["name"],
                "delivered": reader.counts[i],
                "latency": harness.latency_summary(reader.latencies[i]),
            }
            for i, p in enumerate(phases)
        ],
        "foreign_telemetry": reader.foreign,
        "lagged": stats.lagged,
        "dropped": stats.dropped,
        "offset_regressions": stats.regressions,
        "closed_early": stats.closed_early,
        "close_codes": dict(stats.close_codes),
        "other_ops": dict(stats.other),
    }


# ---- role: the attackers ---------------------------------------------------------------------


class Tally:
    """An attacker's counts for one phase."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.durations: list[float] = []  # seconds: connection lifetimes or session times

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(sorted(self.counts.items()))
        if self.durations:
            d = sorted(self.durations)
            out["duration_p50_ms"] = round(harness.percentile(d, 50) * 1000, 2)
            out["duration_p99_ms"] = round(harness.percentile(d, 99) * 1000, 2)
            out["duration_max_ms"] = round(d[-1] * 1000, 2)
        return out


def flood_chunk(size: int = 65536) -> bytes:
    """Valid-CRC env-sensor DATA frames back to back, about ``size`` bytes."""
    frame = encode_frame(Data(0, bytes(5)).encode())
    return frame * (size // len(frame))


class FloodLink(asyncio.Protocol):
    """One flooding connection: DATA frames whenever the socket takes more, never a HELLO."""

    def __init__(self, chunk: bytes, tally: Tally) -> None:
        self.chunk = chunk
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.reader = MessageReader()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.fill()

    def fill(self) -> None:
        t = self.transport
        # write() calls pause_writing() once the kernel's buffer is full: at the
        # pace the gateway reads.
        while t is not None and not self.paused and not t.is_closing():
            t.write(self.chunk)
            self.tally.counts["bytes_into_socket"] += len(self.chunk)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.fill()

    def data_received(self, data: bytes) -> None:
        for msg in self.reader.feed(data):
            if isinstance(msg, Error):
                self.tally.counts[f"error_{error_name(msg.code)}"] += 1
            else:
                self.tally.counts[f"got_{type(msg).__name__}"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)


async def flood(host: str, port: int, until: float, tally: Tally, give_up_after: float) -> None:
    """Flood, and connect again the moment the gateway closes the connection."""
    loop = asyncio.get_running_loop()
    chunk = flood_chunk()
    while time.time() < until and tally.counts["connections"] < 1_000_000:
        try:
            transport, link = await loop.create_connection(
                lambda: FloodLink(chunk, tally), host, port
            )
        except OSError as e:
            tally.counts[f"connect_failed_{e.errno}"] += 1
            await asyncio.sleep(0.01)
            continue
        tally.counts["connections"] += 1
        opened = time.monotonic()
        try:
            await asyncio.wait_for(
                asyncio.shield(link.closed), min(give_up_after, max(0.0, until - time.time()))
            )
            tally.counts["closed_by_gateway"] += 1
        except TimeoutError:
            tally.counts["closed_by_us"] += 1
            transport.abort()
            await link.closed
        tally.durations.append(time.monotonic() - opened)


class DeviceConn:
    """A device-side connection over streams: HELLO, then messages until the link closes."""

    def __init__(self, client_id: str, token: str) -> None:
        self.handshake = DeviceHandshake(client_id, "env-sensor", token)
        self.reader = MessageReader()

    async def session(
        self, host: str, port: int, tally: Tally, *, hold: bool, until: float
    ) -> None:
        """Connect and say HELLO; then hold the link until the gateway closes it (``hold``,
        answering PINGs) or close it at the WELCOME. Counts what the gateway said."""
        try:
            r, w = await asyncio.open_connection(host, port)
        except OSError as e:
            tally.counts[f"connect_failed_{e.errno}"] += 1
            await asyncio.sleep(0.01)
            return
        tally.counts["connections"] += 1
        self.handshake.reset()
        self.reader.new_link()
        opened = time.monotonic()
        try:
            w.write(encode(self.handshake.hello()))
            tally.counts["hellos"] += 1
            async with asyncio.timeout(max(0.1, until - time.time())):
                while data := await r.read(4096):
                    for msg in self.reader.feed(data):
                        reply = self.handshake.receive(msg)
                        if reply is not None:
                            w.write(encode(reply))
                        if isinstance(msg, Welcome):
                            tally.counts["welcomed"] += 1
                            if not hold:
                                tally.durations.append(time.monotonic() - opened)
                                return
                        elif isinstance(msg, Error):
                            tally.counts[f"error_{error_name(msg.code)}"] += 1
                tally.counts["closed_by_gateway"] += 1
        except TimeoutError:
            tally.counts["held_to_the_end"] += 1
        except OSError:
            tally.counts["reset_by_gateway"] += 1
        finally:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
            if hold:
                tally.durations.append(time.monotonic() - opened)


async def takeover_storm(host: str, port: int, until: float, tally: Tally) -> None:
    """Two connections fighting over one client_id, each back at once when it loses."""

    async def fighter() -> None:
        conn = DeviceConn(CONTESTED, DEVICE_TOKEN)
        while time.time() < until and tally.counts["connections"] < 1_000_000:
            await conn.session(host, port, tally, hold=True, until=until)

    await asyncio.gather(fighter(), fighter())


async def stalled_and_churn(
    host: str,
    port: int,
    http: tuple[str, int],
    until: float,
    tally: Tally,
    stalled: int,
    churners: int,
) -> None:
    """``stalled`` dashboards that never read, and ``churners`` loops of short device sessions."""
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        began = time.monotonic()
        for _ in range(stalled):
            if time.time() >= until:
                break
            try:
                held.append(await dashboards.stalled_dashboard(*http, VIEWER_TOKEN, 4096))
                tally.counts["stalled_connected"] += 1
            except (OSError, TimeoutError) as e:
                tally.counts[f"stalled_failed_{type(e).__name__}"] += 1
        tally.counts["stalled_connect_ms"] = round((time.monotonic() - began) * 1000)

        async def churn(k: int) -> None:
            n = 0
            while time.time() < until and n < 1_000_000:
                # 200 ids per loop, each back only long after its last session
                # (a new client_id each time would be finding 5, not this one).
                conn = DeviceConn(f"churn{k}-{n % 200}", DEVICE_TOKEN)
                await conn.session(host, port, tally, hold=False, until=until)
                n += 1

        await asyncio.gather(*(churn(k) for k in range(churners)))
        await sleep_until(until)  # with no churn loop, the stalled dashboards stay to the end
        # A stalled dashboard reads nothing, so it cannot see its own close: the
        # gateway's closes are in /metrics (iot_dashboards_closed_total, ...).
    finally:
        for _, w in held:
            cast(asyncio.Transport, w.transport).abort()


async def attack_role(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.gateway.rpartition(":")
    http_host, _, http_port = args.http.rpartition(":")
    emit({"event": "ready"})
    plan = await harness.read_go()
    per_phase: dict[str, Any] = {}
    for interval in plan["intervals"]:
        await sleep_until(interval["start"])
        tally = Tally()
        until = interval["end"]
        if args.attack == "flood":
            await flood(host, int(port), until, tally, args.flood_give_up)
        elif args.attack == "takeover":
            await takeover_storm(host, int(port), until, tally)
        else:
            await stalled_and_churn(
                host,
                int(port),
                (http_host, int(http_port)),
                until,
                tally,
                interval["stalled"],
                interval["churners"],
            )
        per_phase[interval["phase"]] = tally.report()
    # Alive to the end, so that the orchestrator reads every process's CPU in every phase.
    await sleep_until(plan["stop_at"])
    return {"event": "done", "attack": args.attack, "per_phase": per_phase}


# ---- the orchestrator ------------------------------------------------------------------------


@dataclass(slots=True)
class Poll:
    at: float  # wall time the request started
    seconds: float
    status: int  # 0: no answer (refused, reset, timed out)


async def poll_healthz(url: str, start: float, end: float, rate: float, out: list[Poll]) -> None:
    """GET /healthz ``rate`` times a second, each on a new connection, from ``start`` to ``end``.

    On a schedule, not one after another, so that a slow answer does not thin
    out the samples; at most 100 in flight, each given 10 s.
    """
    timeout = aiohttp.ClientTimeout(total=10.0)
    gate = asyncio.Semaphore(100)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=0), timeout=timeout
    ) as session:

        async def one(at: float) -> None:
            t0 = time.perf_counter()
            status = 0
            try:
                async with session.get(url) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            out.append(Poll(at, time.perf_counter() - t0, status))
            gate.release()

        tasks: set[asyncio.Task[None]] = set()
        k = 0
        while (at := start + k / rate) < end:
            await sleep_until(at)
            await gate.acquire()
            task = asyncio.ensure_future(one(time.time()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.wait(tasks, timeout=11.0)


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """The counters (``*_total``) that moved, and the gauges that matter, at the end."""
    out: dict[str, float] = {}
    for key, value in after.items():
        name = key.partition("{")[0]
        if name.endswith("_total") and not name.endswith("_created"):
            delta = value - before.get(key, 0.0)
            if delta:
                out[key] = delta
    for gauge in ("iot_dashboards", "iot_device_links", "iot_devices_online", "iot_devices_known"):
        if gauge in after:
            out[f"{gauge} (at the end)"] = after[gauge]
    return out


def rss_parts(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of ``/proc/PID/status``, bytes (what the RSS is made of)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


@dataclass(slots=True)
class Boundary:
    """The gateway read between two phases: RSS, the size of its log, and /metrics.

    The /metrics scrape waits its turn on the gateway's loop (seconds, when the
    loop is swamped), so it runs beside the timeline rather than in its way:
    ``scrape`` is its task, and ``scraped_at`` says when it answered.
    """

    at: float
    rss: int
    rss_parts: dict[str, int]
    log_bytes: int
    scrape: asyncio.Task[tuple[dict[str, float] | None, float]]

    @classmethod
    def read(cls, gw: GatewayProcess) -> Boundary:
        try:
            log_bytes = gw.log_path.stat().st_size
        except OSError:
            log_bytes = 0
        return cls(
            time.time(),
            harness.sample(gw.pid).rss,
            rss_parts(gw.pid),
            log_bytes,
            asyncio.ensure_future(cls._scrape(gw)),
        )

    @staticmethod
    async def _scrape(gw: GatewayProcess) -> tuple[dict[str, float] | None, float]:
        try:
            metrics: dict[str, float] | None = (await gw.metrics()).flat()
        except OSError:
            metrics = None
        return metrics, time.time()


def slope(series: Sequence[tuple[float, int]]) -> float:
    """Bytes per second over the second half of an RSS series (least squares)."""
    half = list(series[len(series) // 2 :])
    if len(half) < 2:
        return 0.0
    xs = [t for t, _ in half]
    ys = [float(r) for _, r in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def spawn_role(
    name: str, role: str, argv: Sequence[object], workdir: Path, loop: str
) -> Child:
    return await harness.spawn(
        name, harness.module("hostile", "--role", role, "--loop", loop, *argv), workdir, stdin=True
    )


async def orchestrate(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    phases = [ALL_PHASES[name] for name in args.phases]
    config = {
        "auth": {"viewer_token": VIEWER_TOKEN},
        "devices": {"token": DEVICE_TOKEN},
    }
    server = await harness.start_gateway(
        workdir, loop=args.loop, config=config, token=OPERATOR_TOKEN, log_level="info"
    )
    gw = server.process
    assert isinstance(gw, GatewayProcess)
    device_addr = f"{server.devices[0]}:{server.devices[1]}"
    assert server.http is not None
    http_addr = f"{server.http[0]}:{server.http[1]}"
    children: list[Child] = []
    attackers: dict[str, Child] = {}
    polls: list[Poll] = []
    results: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(0.5)
        rss_empty = harness.sample(gw.pid).rss
        dash = await spawn_role("dashboard", "dashboard", ["--http", http_addr], workdir, "uvloop")
        children.append(dash)
        await dash.event("ready", 60)
        devs = await spawn_role(
            "devices",
            "devices",
            ["--gateway", device_addr, "--devices", args.devices, "--rate", args.rate],
            workdir,
            "uvloop",
        )
        children.append(devs)
        ready = await devs.event("ready", 120)
        if ready["failed"]:
            raise harness.ChildFailed(f"{ready['failed']} real devices could not connect")
        for attack in ATTACKS:
            if any(attack in p.attacks for p in phases):
                attackers[attack] = await spawn_role(
                    f"attack-{attack}",
                    "attack",
                    [
                        "--attack",
                        attack,
                        "--gateway",
                        device_addr,
                        "--http",
                        http_addr,
                        "--flood-give-up",
                        args.flood_give_up,
                    ],
                    workdir,
                    "uvloop",
                )
        for a in attackers.values():
            await a.event("ready", 60)
        children.extend(attackers.values())
        rss_connected = harness.sample(gw.pid).rss

        t0 = time.time() + 1.0
        span = args.warmup + args.measure
        timeline = [
            {
                "name": p.name,
                "start": t0 + i * span,
                "window_start": t0 + i * span + args.warmup,
                "window_end": t0 + (i + 1) * span,
            }
            for i, p in enumerate(phases)
        ]
        send_end = timeline[-1]["window_end"] + 0.5
        stop_at = send_end + 2.0
        await dash.send({"phases": timeline, "stop_at": stop_at})
        await devs.send({"phases": timeline, "send_end": send_end})
        for attack, child in attackers.items():
            await child.send(
                {
                    "intervals": [
                        {
                            "phase": p.name,
                            "start": t["start"],
                            "end": t["window_end"],
                            "stalled": args.stalled if p.stalled is None else p.stalled,
                            "churners": args.churners if p.churners is None else p.churners,
                        }
                        for p, t in zip(phases, timeline, strict=True)
                        if attack in p.attacks
                    ],
                    "stop_at": stop_at,
                }
            )
        poller = asyncio.ensure_future(
            poll_healthz(
                f"{gw.url}/healthz", t0, timeline[-1]["window_end"], args.health_rate, polls
            )
        )
        watched = {"gateway": gw.pid, **{c.name: c.pid for c in children}}
        # Phases are back to back: what is read at a window's end (RSS, /metrics,
        # the log's size) is also the next phase's start.
        await sleep_until(t0 - 0.1)
        boundary = Boundary.read(gw)
        boundaries = [boundary]
        for p, t in zip(phases, timeline, strict=True):
            print(f"phase {p.name}: attacks {', '.join(p.attacks) or 'none'}", flush=True)
            await sleep_until(t["window_start"])
            before = harness.sample_all(watched.values())
            everyone_before = harness.all_cpu()
            series: list[tuple[float, int]] = [(0.0, before[gw.pid].rss)]
            while time.time() < t["window_end"]:
                await asyncio.sleep(min(0.25, max(0.0, t["window_end"] - time.time())))
                series.append((time.time() - t["window_start"], harness.sample(gw.pid).rss))
            after = harness.sample_all(watched.values())
            everyone_after = harness.all_cpu()
            end = Boundary.read(gw)
            boundaries.append(end)
            window = after[gw.pid].at - before[gw.pid].at
            results.append(
                {
                    "phase": p.name,
                    "attacks": list(p.attacks),
                    "timeline": t,
                    "window_s": window,
                    "rss": {
                        "phase_start": boundary.rss,
                        "window_start": before[gw.pid].rss,
                        "window_end": after[gw.pid].rss,
                        "peak": max(r for _, r in series),
                        "growth": after[gw.pid].rss - boundary.rss,
                        "slope_second_half_per_s": slope(series),
                        "parts_at_start": boundary.rss_parts,
                        "parts_at_end": end.rss_parts,
                        "series": [(round(s, 2), r) for s, r in series],
                    },
                    "cores": {
                        name: (after[pid].cpu - before[pid].cpu) / window
                        for name, pid in watched.items()
                    },
                    "other_cores": harness.others_cpu(
                        everyone_before, everyone_after, watched.values()
                    )
                    / window,
                    "gateway_log_bytes": end.log_bytes - boundary.log_bytes,
                }
            )
            boundary = end
        await poller
        scrapes = [await b.scrape for b in boundaries]
        for i, r in enumerate(results):
            (m0, at0), (m1, at1) = scrapes[i], scrapes[i + 1]
            r["metrics"] = counter_deltas(m0 or {}, m1 or {})
            r["metrics_scraped"] = m0 is not None and m1 is not None
            # How late each scrape answered: the gateway's loop was that busy, and
            # the counters run that far past the phase.
            r["metrics_scrape_s"] = [
                round(at0 - boundaries[i].at, 3),
                round(at1 - boundaries[i + 1].at, 3),
            ]
        dev_done = await devs.event("done", 60)
        dash_done = await dash.event("done", 60)
        attack_done = {name: await c.event("done", 60) for name, c in attackers.items()}
        for c in children:
            await c.wait(30)
    finally:
        for c in children:
            await c.stop(5)
        exit_ = await gw.stop()
    crashes = gw.crashes()

    for i, r in enumerate(results):
        sent = dev_done["per_phase"][i]["sent_in_window"]
        got = dash_done["per_phase"][i]
        r["devices"] = {
            "sent": sent,
            "delivered": got["delivered"],
            "lost": sent - got["delivered"],
            "latency": got["latency"],
            "loadgen_max_lag_s": dev_done["per_phase"][i]["max_lag_s"],
        }
        t = r["timeline"]
        mine = sorted(
            (q for q in polls if t["window_start"] <= q.at < t["window_end"]),
            key=lambda q: q.seconds,
        )
        answered = [q.seconds * 1e6 for q in mine if q.status == 200]
        r["healthz"] = {
            "polls": len(mine),
            "ok": len(answered),
            "statuses": dict(Counter(str(q.status) for q in mine)),
            "latency": harness.latency_summary([round(x) for x in answered]),
        }
        r["attackers"] = {
            name: d["per_phase"][r["phase"]]
            for name, d in attack_done.items()
            if r["phase"] in d["per_phase"]
        }
    quiet = next(r for r in results if r["phase"] == "quiet")
    for r in results:
        r["p99_ratio"] = ratio(
            r["devices"]["latency"]["p99_ms"], quiet["devices"]["latency"]["p99_ms"]
        )
        r["healthz_p99_ratio"] = ratio(
            r["healthz"]["latency"]["p99_ms"], quiet["healthz"]["latency"]["p99_ms"]
        )
    return {
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("role", "attack", "gateway", "http")
        },
        "config": config,
        "rss_empty": rss_empty,
        "rss_connected": rss_connected,
        "phases": results,
        "devices": dev_done,
        "dashboard": {k: v for k, v in dash_done.items() if k != "per_phase"},
        "gateway_exit": str(exit_),
        "gateway_crashes": crashes[:20],
    }


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def verdict(x: float) -> str:
    if math.isnan(x):
        return "MISSED: nothing arrived"
    return "met" if x <= TARGET_RATIO else "MISSED"


def attacker_summary(r: Mapping[str, Any]) -> str:
    """The attackers' own counts, short."""
    parts = []
    a = r["attackers"]
    if "flood" in a:
        f = a["flood"]
        parts.append(
            f"flood: {f.get('connections', 0)} conns, {f.get('closed_by_gateway', 0)} closed by "
            f"the gateway (p50 {f.get('duration_p50_ms', math.nan)} ms), "
            f"{f.get('closed_by_us', 0)} given up"
        )
    if "takeover" in a:
        t = a["takeover"]
        parts.append(
            f"takeover: {t.get('hellos', 0)} HELLOs, {t.get('welcomed', 0)} welcomed, "
            f"{t.get('error_REPLACED', 0)} REPLACED, {t.get('error_RATE_LIMITED', 0)} RATE_LIMITED"
        )
    if "stalled" in a:
        s = a["stalled"]
        parts.append(
            f"stalled: {s.get('stalled_connected', 0)} connected; churn: "
            f"{s.get('welcomed', 0)} sessions (p50 {s.get('duration_p50_ms', math.nan)} ms)"
        )
    return "; ".join(parts)


INTERESTING: Final = (
    "iot_device_links_closed_total",
    "iot_device_refused_total",
    "iot_device_replaced_total",
    "iot_dashboards_closed_total",
    "iot_slow_dashboards_closed_total",
    "iot_telemetry_dropped_total",
    "iot_device_throttled_total",
    "iot_device_log_lines_suppressed_total",
    "iot_garbage_links_closed_total",
    "iot_refused_total",
)


def num(x: float, spec: str = ".2f", suffix: str = "") -> str:
    """``x`` formatted, or ``-`` when it is NaN (no sample: nothing answered)."""
    return "-" if math.isnan(x) else f"{x:{spec}}{suffix}"


def print_report(result: Mapping[str, Any]) -> None:
    rows = result["phases"]
    print()
    print(
        "| phase | device p50 ms | p99 ms | p99 / quiet | p99.9 ms | delivered | lost "
        "| /healthz p50 ms | p99 ms | p99 / quiet | polls ok | RSS start -> end MiB (peak) "
        "| gateway cores | attackers cores |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    mib = 1 << 20
    for r in rows:
        lat, h, rss = r["devices"]["latency"], r["healthz"], r["rss"]
        attack_cores = sum(v for k, v in r["cores"].items() if k.startswith("attack-"))
        print(
            f"| {r['phase']} | {num(lat['p50_ms'])} | {num(lat['p99_ms'])} "
            f"| {num(r['p99_ratio'], '.2f', 'x')} | {num(lat['p99_9_ms'])} "
            f"| {r['devices']['delivered']:,} | {r['devices']['lost']:,} "
            f"| {num(h['latency']['p50_ms'])} | {num(h['latency']['p99_ms'])} "
            f"| {num(r['healthz_p99_ratio'], '.2f', 'x')} | {h['ok']}/{h['polls']} "
            f"| {rss['phase_start'] / mib:.1f} -> {rss['window_end'] / mib:.1f} "
            f"({rss['peak'] / mib:.1f}) | {r['cores']['gateway']:.2f} | {attack_cores:.2f} |"
        )
    print()
    for r in rows:
        moved = {
            k: v for k, v in r["metrics"].items() if k.startswith(INTERESTING) or "at the end" in k
        }
        print(f"{r['phase']}: {attacker_summary(r) or 'no attack'}")
        a0 = r["rss"]["parts_at_start"].get("RssAnon", 0)
        a1 = r["rss"]["parts_at_end"].get("RssAnon", 0)
        print(
            f"  RSS slope (window's 2nd half) {r['rss']['slope_second_half_per_s'] / 1024:+.0f} "
            f"KiB/s, anonymous {a0 / mib:.1f} -> {a1 / mib:.1f} MiB; gateway log "
            f"+{r['gateway_log_bytes']:,} bytes; /metrics scrapes took "
            f"{r['metrics_scrape_s'][0]:.2f}, {r['metrics_scrape_s'][1]:.2f} s; others "
            f"{r['other_cores']:.2f} cores; loadgen lag max {r['devices']['loadgen_max_lag_s']} s"
        )
        if r["metrics_scraped"]:
            print(f"  /metrics: {json.dumps(moved, sort_keys=True)}")
        else:
            print("  /metrics: not scraped (no answer within 10 s)")
        if r["other_cores"] > 0.25:
            print(f"  NOISY: other processes used {r['other_cores']:.2f} cores in this window")
    print()
    for r in rows:
        if r["phase"] == "quiet":
            continue
        h = r["healthz"]
        print(
            f"target {r['phase']}: device p99 {num(r['p99_ratio'], '.2f', 'x')} of quiet "
            f"({verdict(r['p99_ratio'])}), /healthz p99 {num(r['healthz_p99_ratio'], '.2f', 'x')} "
            f"({verdict(r['healthz_p99_ratio'])}; {h['ok']} of {h['polls']} answered), "
            f"RSS {r['rss']['growth'] / mib:+.1f} MiB over the phase"
        )
    first, last = rows[0]["rss"], rows[-1]["rss"]
    print(
        f"RSS: {result['rss_empty'] / mib:.1f} MiB empty, {result['rss_connected'] / mib:.1f} "
        f"with the devices, {first['window_end'] / mib:.1f} after the quiet phase, "
        f"{last['window_end'] / mib:.1f} at the end; highest "
        f"{max(r['rss']['peak'] for r in rows) / mib:.1f}"
    )
    d = result["dashboard"]
    if d["closed_early"] or d["foreign_telemetry"] or d["offset_regressions"]:
        print(f"ODD: measuring dashboard {json.dumps(d)}")
    if result["devices"]["links_lost_while_sending"]:
        print(f"ODD: {result['devices']['links_lost_while_sending']} real device links lost")
    if result["gateway_crashes"]:
        print(f"ODD: the gateway logged tracebacks: {result['gateway_crashes'][:3]}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a few seconds a phase (under a minute)")
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10.0, help="DATA frames per second per device")
    p.add_argument("--warmup", type=float, help="seconds of each phase before its window")
    p.add_argument("--measure", type=float, help="seconds of each phase's window")
    p.add_argument(
        "--phases",
        default=",".join(ph.name for ph in PHASES),
        help="comma-separated, in the order given, from: " + ", ".join(ALL_PHASES),
    )
    p.add_argument("--stalled", type=int, default=50, help="stalled dashboards")
    p.add_argument("--churners", type=int, default=1, help="session churn loops")
    p.add_argument(
        "--flood-give-up",
        type=float,
        default=5.0,
        help="seconds after which the flooder closes a connection the gateway keeps open",
    )
    p.add_argument("--health-rate", type=float, default=10.0, help="/healthz polls per second")
    p.add_argument("--loop", choices=harness.LOOPS, default="uvloop")
    p.add_argument("--workdir", help="keep logs and data here (default: a temp dir)")
    p.add_argument("--output", type=Path)
    # The child processes' roles (run by the orchestrator, not by hand).
    p.add_argument("--role", choices=["main", "devices", "dashboard", "attack"], default="main")
    p.add_argument("--attack", choices=ATTACKS)
    p.add_argument("--gateway", metavar="HOST:PORT", help="device port")
    p.add_argument("--http", metavar="HOST:PORT", help="HTTP port")
    p.add_argument("--linger", type=float, default=1.5)
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.measure = args.measure or (3.0 if args.quick else 15.0)
    wanted = args.phases.split(",")
    unknown = set(wanted) - set(ALL_PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    if len(set(wanted)) != len(wanted):
        p.error("a phase named twice")
    if "quiet" not in wanted:
        wanted.insert(0, "quiet")  # the reference every ratio is taken against
    args.phases = wanted
    return args


ROLES: Final[Mapping[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]]] = {
    "devices": devices_role,
    "dashboard": dashboard_role,
    "attack": attack_role,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role != "main":
        emit(harness.run(ROLES[args.role](args), args.loop))
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        workdir = Path(args.workdir or tmp)
        result = harness.run(orchestrate(args, workdir), "asyncio")
    result["seconds"] = time.monotonic() - started
    print_report(result)
    out = harness.write_result("hostile", result, args.output)
    print(f"whole run {result['seconds']:.0f} s; results written to {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
