"""MQTT northbound (docs/mqtt.md): what the bridge costs the gateway, and what each client costs.

Two measurements, each against its baseline in the same run:

1. **Gateway CPU per message** at a fixed rate (``--devices`` x ``--rate``
   frames/s from ``benchmarks.loadgen``): the gateway without MQTT, with MQTT
   at the default settings (state conflated, ``min_interval = 1``), and with
   MQTT publishing every message (``min_interval = 0``), each to our own
   Mosquitto on a free loopback port. CPU is the gateway process's
   (``/proc/PID/stat``) over a window in the middle of the load, divided by the
   frames it took in that window (``iot_frames_in_total``).
2. **Client cost per QoS 0 publish**, in this process: aiomqtt's awaited
   ``publish`` against paho-mqtt's own client driven by our loop
   (``benchmarks.mqtt.paho_publisher``), the same payload (a telemetry state,
   about 150 bytes) to the same broker; CPU time (``time.process_time``) over
   the publishes.

    PYTHONPATH=. .venv/bin/python -m benchmarks.mqtt_northbound --repeat 3

Medians over ``--repeat`` runs; the machine is shared, so the other
processes' CPU during each window is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt

from benchmarks import harness
from benchmarks.mqtt import paho_publisher
from tests.support.metrics import parse_metrics

PAYLOAD = (
    '{"device":"dev-00001","protocol":"env-sensor","offset":123456,"ts":1764340000000,'
    '"seq":42,"data":{"temperature_c":21.5,"humidity_pct":40.25,"battery_pct":88}}'
)
MODES: dict[str, dict[str, Any] | None] = {
    "off": None,
    "mqtt (min_interval 1 s)": {"min_interval": 1.0},
    "mqtt (min_interval 0)": {"min_interval": 0.0, "queue_size": 100_000},
}


async def _counters(server: harness.Server) -> tuple[float, float, float]:
    """Frames in, MQTT publishes, telemetry the hub dropped for a lagging reader (the bridge)."""
    assert server.http is not None
    host, port = server.http
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    body = (await reader.read()).split(b"\r\n\r\n", 1)[1].decode()
    writer.close()
    flat = parse_metrics(body).flat()
    return (
        flat.get("iot_frames_in_total", 0.0),
        flat.get("iot_mqtt_published_total", 0.0),
        flat.get("iot_telemetry_dropped_total", 0.0),
    )


async def _gateway_run(
    workdir: Path, mode: str, mqtt: dict[str, Any] | None, args: argparse.Namespace
) -> dict[str, Any]:
    extra: list[harness.Child] = []
    sections: dict[str, Any] = {}
    if mqtt is not None:
        broker = await harness.start_mosquitto(workdir)
        extra.append(broker)
        url = f"mqtt://127.0.0.1:{harness.mosquitto_port(broker)}"
        sections["mqtt"] = {"url": url, **mqtt}
    config = harness.bench_gateway_config(**sections)
    server = await harness.start_gateway(workdir, loop=args.loop, config=config)
    try:
        start_at = time.time() + 3.0 + args.devices / 500
        load = await harness.spawn(
            "loadgen",
            harness.module(
                "loadgen",
                "--gateway",
                f"{server.devices[0]}:{server.devices[1]}",
                "--devices",
                args.devices,
                "--rate",
                args.rate,
                "--start-at",
                start_at,
                "--duration",
                args.warmup + args.measure + 1,
                "--loop",
                args.loop,
            ),
            workdir,
        )
        await load.event("ready", 60)
        await asyncio.sleep(max(0.0, start_at + args.warmup - time.time()))
        pids = [server.process.pid]
        others0 = harness.all_cpu()
        before, (frames0, pub0, drop0) = harness.sample_all(pids), await _counters(server)
        await asyncio.sleep(args.measure)
        after, (frames1, pub1, drop1) = harness.sample_all(pids), await _counters(server)
        others1 = harness.all_cpu()
        cpu = harness.cpu_between(before, after)
        frames = frames1 - frames0
        ours = [*pids, load.pid, *(c.pid for c in extra)]
        await load.event("done", args.measure + 30)
        return {
            "mode": mode,
            "frames_per_s": round(frames / args.measure),
            "cpu_cores": round(cpu / args.measure, 3),
            "published_per_s": round((pub1 - pub0) / args.measure),
            "hub_dropped_per_s": round((drop1 - drop0) / args.measure),
            "cpu_us_per_frame": round(cpu / frames * 1e6, 2) if frames else None,
            "other_cores": round(harness.others_cpu(others0, others1, ours) / args.measure, 2),
        }
    finally:
        await server.stop()
        for child in extra:
            await child.stop()


async def _publish_cost(port: int, n: int) -> dict[str, float]:
    """CPU microseconds per QoS 0 publish, aiomqtt (awaited) and paho on our loop."""
    out: dict[str, float] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-aiomqtt") as client:
        for i in range(200):  # warm up
            await client.publish(f"bench/{i % 100}", PAYLOAD, qos=0)
        t0 = time.process_time()
        for i in range(n):
            await client.publish(f"bench/{i % 100}", PAYLOAD, qos=0)
        out["aiomqtt"] = (time.process_time() - t0) / n * 1e6
    paho_client, detach = await paho_publisher("127.0.0.1", port, "bench-paho")
    try:
        for i in range(200):
            paho_client.publish(f"bench/{i % 100}", PAYLOAD, qos=0)
        await asyncio.sleep(0.2)
        t0 = time.process_time()
        for i in range(n):
            paho_client.publish(f"bench/{i % 100}", PAYLOAD, qos=0)
            if i % 100 == 99:
                await asyncio.sleep(0)  # let the loop write, as the bridge would
        for _ in range(10_000):  # until paho's queue is written (bounded: a benchmark)
            if not paho_client.want_write():
                break
            await asyncio.sleep(0)  # the loop writes meanwhile
        out["paho"] = (time.process_time() - t0) / n * 1e6
    finally:
        paho_client.disconnect()
        detach()
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        root = Path(tmp)
        broker = await harness.start_mosquitto(root)
        clients: list[dict[str, float]] = []
        try:
            for _ in range(args.repeat):
                clients.append(await _publish_cost(harness.mosquitto_port(broker), args.publishes))
        finally:
            await broker.stop()
        runs: list[dict[str, Any]] = []
        for r in range(args.repeat):
            for mode, mqtt in MODES.items():
                workdir = root / f"{r}-{len(runs)}"
                workdir.mkdir()
                result = await _gateway_run(workdir, mode, mqtt, args)
                print(json.dumps(result), flush=True)
                runs.append(result)
    return {"clients": clients, "gateway": runs}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report(result: dict[str, Any]) -> str:
    lines = ["client cost per QoS 0 publish (CPU us, medians): "]
    for name in ("aiomqtt", "paho"):
        runs = [c[name] for c in result["clients"]]
        lines[-1] += f"{name} {_median(runs):.1f} ({', '.join(f'{v:.1f}' for v in runs)}); "
    lines.append(
        "| mode | frames/s | MQTT publishes/s | dropped for the bridge/s | gateway cores "
        "| CPU us per frame | vs off (same run) |"
    )
    lines.append("|---|--:|--:|--:|--:|--:|--:|")
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for run in result["gateway"]:
        by_mode.setdefault(run["mode"], []).append(run)
    offs = [r["cpu_us_per_frame"] for r in by_mode["off"]]
    for mode, runs in by_mode.items():
        ratios = [r["cpu_us_per_frame"] / off for r, off in zip(runs, offs, strict=False) if off]
        lines.append(
            f"| {mode} | {_median([r['frames_per_s'] for r in runs]):,.0f} "
            f"| {_median([r.get('published_per_s', 0) for r in runs]):,.0f} "
            f"| {_median([r.get('hub_dropped_per_s', 0) for r in runs]):,.0f} "
            f"| {_median([r['cpu_cores'] for r in runs]):.2f} "
            f"| {_median([r['cpu_us_per_frame'] for r in runs]):.1f} "
            f"| x{_median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) |"
        )
    others = [r["other_cores"] for r in result["gateway"]]
    lines.append(f"other processes: {min(others):.2f}-{max(others):.2f} cores during the windows")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10.0, help="frames/s per device")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--measure", type=float, default=6.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--publishes", type=int, default=20_000)
    p.add_argument("--loop", choices=harness.LOOPS, default="uvloop")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = harness.run(main_async(args), args.loop)
    harness.write_result("mqtt_northbound", {"args": vars(args), **result})
    print(report(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
