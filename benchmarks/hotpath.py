"""Where a telemetry message's CPU goes inside the gateway, stage by stage, without sockets.

Run ``.venv/bin/python -m benchmarks.hotpath`` (``--quick`` for a short run).
The end-to-end figures depend on a shared 2-core machine's other load; this
one does not, so it is the ruler for hot spots and for the fixes to them. It
drives the gateway's real objects in one process: ``DeviceSession`` (fed one
frame per ``data_received``, as a socket read delivers a low-rate device's
frame) -> ``DeviceManager`` -> ``Hub`` (real ``SQLiteStorage``, its writer
thread running) -> one subscribed ``Dashboard``, drained as the WebSocket
writer drains it (``take`` + ``"\\n".join``) but with no socket under it.

It prints:

* the whole pipeline's CPU per message: the event-loop thread alone (what caps
  the input rate: one thread) and the process (adding the SQLite writer thread);
* each stage timed alone on the same frames (median of repeats, GC off);
* a cProfile of the pipeline, top functions by own time;
* levers: the same work done another way (not project code, measured here so
  that a proposed fix comes with its gain).

Figures go to ``benchmarks/results/hotpath.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness, stamp
from devices import (
    CloseReason,
    DeviceManager,
    DeviceSession,
    DeviceTelemetry,
    SessionConfig,
    Transport,
)
from frames import Data, FrameDecoder, Hello, decode_message, encode_frame, get_protocol
from gateway.hub import Hub, HubConfig, LocalEngine, Role, dumps, telemetry_message, telemetry_text
from gateway.metrics import Metrics
from gateway.storage import SQLiteStorage, TelemetryRecord


class NullLink:
    """A LinkPort that drops what the session writes (WELCOME)."""

    kind = Transport.TCP
    peer = "bench"

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass


def frames_for(devices: int, count: int) -> list[bytes]:
    """``count`` env-sensor DATA frames, round-robin over ``devices`` (send times inside)."""
    now = time.time_ns()
    return [
        encode_frame(Data((i // devices) & 0xFF, stamp.body(now + i * 1000)).encode())
        for i in range(count)
    ]


async def pipeline(
    count: int, devices: int, workdir: Path, *, profile: cProfile.Profile | None = None
) -> dict[str, float]:
    """Frames through the real session, hub and storage; CPU per message."""
    storage = SQLiteStorage(workdir / f"hot-{time.monotonic_ns()}.sqlite3")
    metrics = Metrics()
    hub = Hub(LocalEngine(storage), HubConfig(queue_size=1 << 20), metrics)
    manager = DeviceManager(
        hub, SessionConfig(max_frames_per_second=1e9, rate_burst=1e9, max_devices=1 << 20)
    )
    hub.attach(manager)
    await storage.open()
    await hub.start()
    sessions = []
    for i in range(devices):
        s = DeviceSession(manager, NullLink())
        s.start()
        s.data_received(encode_frame(Hello(0, f"hot-{i:05d}", "env-sensor").encode()))
        sessions.append(s)
    dash = hub.connect_dashboard(Role.VIEWER, "bench")
    await hub.handle(dash, {"op": "subscribe", "all": True})
    dash.take(1 << 20)
    frames = frames_for(devices, count)
    batch = 256
    delivered = 0
    gc.collect()
    t_wall, t_thread, t_proc = time.perf_counter(), time.thread_time(), time.process_time()
    if profile is not None:
        profile.enable()
    for i, frame in enumerate(frames):
        sessions[i % devices].data_received(frame)
        if dash.telemetry_queued >= batch:
            text = "\n".join(dash.take(batch))
            delivered += text.count("\n") + 1
    # take() until empty, not a look at the queue: the same script runs on
    # older trees whose Dashboard queue had another shape.
    while items := dash.take(batch):
        delivered += len(items)
    if profile is not None:
        profile.disable()
    thread_s = time.thread_time() - t_thread
    await storage.flush()
    proc_s = time.process_time() - t_proc
    wall_s = time.perf_counter() - t_wall
    for s in sessions:
        s.close(CloseReason.SHUTDOWN)
    await hub.stop()
    await storage.close()
    if delivered != count:
        raise RuntimeError(f"delivered {delivered} of {count}")
    return {
        "messages": count,
        "loop_thread_us_per_msg": thread_s / count * 1e6,
        "process_us_per_msg": proc_s / count * 1e6,
        "wall_us_per_msg": wall_s / count * 1e6,
        "single_thread_ceiling_msgs_per_s": count / thread_s,
    }


def timed(fn: Callable[[], object], n: int, repeats: int) -> float:
    """Median microseconds per call of ``fn`` (called ``n`` times per repeat), GC off."""
    runs = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t) / n * 1e6)
    finally:
        if gc_was:
            gc.enable()
    return statistics.median(runs)


def stages(n: int, repeats: int) -> dict[str, float]:
    """Each step of the path of one DATA frame, alone, in microseconds per message."""
    frame = frames_for(1, 1)[0]
    payload = frame[3:-2]
    body = payload[2:]
    env = get_protocol("env-sensor")
    data = env.decode_data(body)
    decoder = FrameDecoder(frame_timeout=1.0)
    record = TelemetryRecord(123456, "hot-00001", "env-sensor", 1_700_000_000_000, 7, data)
    metrics = Metrics()
    message = telemetry_message(record)
    text = dumps(message)
    items = [text] * 256

    def telemetry_event() -> object:
        return DeviceTelemetry("hot-00001", "env-sensor", 7, data, int(time.time() * 1000), 1.0)

    def metrics_step() -> None:
        if metrics.count_telemetry():
            metrics.observe_pipeline(0.0004)

    out = {
        "frame decode (FrameDecoder.feed, one frame)": timed(
            lambda: decoder.feed(frame, 1.0), n, repeats
        ),
        "message decode (decode_message)": timed(lambda: decode_message(payload), n, repeats),
        "env-sensor body decode (decode_data)": timed(lambda: env.decode_data(body), n, repeats),
        "DeviceTelemetry event": timed(telemetry_event, n, repeats),
        "telemetry JSON, data encoded once for dashboards and storage": timed(
            lambda: telemetry_text(record, dumps(data)), n, repeats
        ),
        "metrics (count + 1/64 sampled histogram observe)": timed(metrics_step, n, repeats),
        "writer join, per message (256 per frame)": timed(lambda: "\n".join(items), n, repeats)
        / 256,
    }
    return out


def levers(n: int, repeats: int) -> dict[str, dict[str, float]]:
    """The same work done another way: what a fix could gain (benchmark-only code).

    Levers A (struct fast path), C (data encoded once) and D (sampled metrics)
    have landed and are in the stages above; B was measured and not taken:
    the frame's payload stays a construct parse (docs/benchmarks.md says why).
    """
    frame = frames_for(1, 1)[0]
    out: dict[str, dict[str, float]] = {}
    decoder = FrameDecoder(frame_timeout=1.0)
    out["frame decode: payload via construct parse -> slice after the CRC check"] = {
        "now_us": timed(lambda: decoder.feed(frame, 1.0), n, repeats),
        "lever_us": timed(lambda: _slice_decode(frame), n, repeats),
    }
    return out


_CRC = __import__("crcmod.predefined").predefined.mkPredefinedCrcFun("modbus")


def _slice_decode(frame: bytes) -> bytes | None:
    # The decoder's work for one whole frame minus the construct parse.
    if frame[:2] != b"\xaa\xaa":
        return None
    end = 3 + frame[2]
    if _CRC(frame[2:end]) != int.from_bytes(frame[end : end + 2], "little"):
        return None
    return frame[3:end]


def profile_top(prof: cProfile.Profile, count: int, limit: int) -> list[dict[str, Any]]:
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "calls_per_msg": nc / count,
                "own_us_per_msg": tt / count * 1e6,
                "cumulative_us_per_msg": ct / count * 1e6,
            }
        )
    rows.sort(key=lambda r: r["own_us_per_msg"], reverse=True)
    return rows[:limit]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hotpath-") as tmp:
        work = Path(tmp)
        runs = [await pipeline(args.messages, args.devices, work) for _ in range(args.repeats)]
        prof = cProfile.Profile()
        await pipeline(max(2000, args.messages // 5), args.devices, work, profile=prof)
    return {"pipeline_runs": runs, "profile": prof}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--messages", type=int)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--repeats", type=int)
    p.add_argument("--loop", choices=harness.LOOPS, default="uvloop")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    args.messages = args.messages or (10_000 if args.quick else 50_000)
    args.repeats = args.repeats or (3 if args.quick else 5)
    n = 2_000 if args.quick else 20_000

    got = harness.run(main_async(args), args.loop)
    runs = got["pipeline_runs"]
    prof = got["profile"]
    summary = {
        key: statistics.median(r[key] for r in runs)
        for key in ("loop_thread_us_per_msg", "process_us_per_msg", "wall_us_per_msg")
    }
    summary["single_thread_ceiling_msgs_per_s"] = 1e6 / summary["loop_thread_us_per_msg"]
    print(
        f"pipeline ({args.messages} msgs, {args.devices} devices, 1 dashboard, median of "
        f"{args.repeats}): loop thread {summary['loop_thread_us_per_msg']:.1f} us/msg "
        f"(ceiling {summary['single_thread_ceiling_msgs_per_s']:,.0f} msgs/s on one core), "
        f"process {summary['process_us_per_msg']:.1f} us/msg"
    )
    st = stages(n, args.repeats)
    print("\nstages alone, us per message:")
    for name, us in st.items():
        print(f"  {us:7.2f}  {name}")
    print(f"  {sum(st.values()):7.2f}  sum of the stages above")
    top = profile_top(prof, max(2000, args.messages // 5), 20)
    print("\ncProfile of the pipeline, top functions by own time (us per message):")
    for row in top:
        print(
            f"  {row['own_us_per_msg']:6.2f} own {row['cumulative_us_per_msg']:7.2f} cum "
            f"{row['calls_per_msg']:5.1f} calls  {row['function']}"
        )
    lv = levers(n, args.repeats)
    print("\nlevers (now -> another way), us per message:")
    for name, v in lv.items():
        print(
            f"  {v['now_us']:6.2f} -> {v['lever_us']:6.2f}  "
            f"({v['now_us'] / v['lever_us']:.1f}x)  {name}"
        )
    out = harness.write_result(
        "hotpath",
        {
            "settings": {
                "messages": args.messages,
                "devices": args.devices,
                "repeats": args.repeats,
                "loop": args.loop,
                "stage_calls": n,
            },
            "pipeline": summary,
            "pipeline_runs": runs,
            "stages_us": st,
            "profile_top": top,
            "levers": lv,
        },
        args.output,
    )
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
