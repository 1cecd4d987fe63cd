"""Measured claim: what TLS on the device port costs, beside plain TCP in the same run.

Run ``.venv/bin/python -m benchmarks.tls`` (``--quick``: 1,000 devices and a
short window; ``--devices 10000`` for the target itself). For each event loop
of the gateway (uvloop, then asyncio's own) and each mode (plain TCP, then
TLS with a server certificate, then TLS with a client certificate per device
and ``device_ca``), one gateway is started and a client process (on uvloop)

1. connects D devices, each doing its handshake and HELLO -> WELCOME, 200 at a
   time: D / the time taken is the handshakes (and HELLOs) per second, client
   and server sharing the machine's cores;
2. leaves them idle: the gateway's RSS with them, less its RSS before, over D
   is the RSS per idle device, and base + 10,000 x that the projection for
   10,000 devices (the target: under 1 GiB);
3. sends DATA at ``--rate`` frames/s in total, spread over the devices, for
   ``--measure`` s: the gateway's CPU seconds over the frames it took is the
   CPU per message.

Certificates are made with trustme in a temporary directory. The other
processes' CPU over the run is printed (a shared machine is noisy: compare
the ratios within one run). Figures go to the terminal and to
``benchmarks/results/tls.json``.

``python -m benchmarks.tls client`` is the client process (JSON lines on
stdin and stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness
from frames import Data
from simulators.handshake import DeviceHandshake, MessageReader, encode

TARGET_RSS = 1 << 30  # 10,000 idle TLS devices under 1 GiB
MODES = ("plain", "tls", "tls+client-cert")
CONNECT_CONCURRENCY = 200
BODY = struct.pack(">hHB", 2137, 4550, 97)  # one env-sensor reading


# ---- the client process ----------------------------------------------------------------------


class _Device(asyncio.Protocol):
    def __init__(self, client_id: str, welcomed: asyncio.Future[None]) -> None:
        self.handshake = DeviceHandshake(client_id, "env-sensor")
        self.reader = MessageReader(strict=False)
        self.welcomed = welcomed
        self.transport: asyncio.Transport | None = None
        self.seq = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(encode(self.handshake.hello()))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        for message in self.reader.feed(data):
            reply = self.handshake.receive(message)  # a PONG for a PING
            if reply is not None and self.transport is not None:
                self.transport.write(encode(reply))
        if self.handshake.welcomed and not self.welcomed.done():
            self.welcomed.set_result(None)
        elif self.handshake.refused and not self.welcomed.done():
            self.welcomed.set_exception(RuntimeError(f"refused: {self.handshake.error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(f"lost before WELCOME: {exc}"))

    def send(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.seq = (self.seq + 1) & 0xFFFF
            self.transport.write(encode(Data(self.seq, BODY)))


async def _client(plan: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    host, port, count = plan["host"], plan["port"], plan["devices"]
    contexts: dict[str, ssl.SSLContext] = {}

    def context(client_id: str) -> ssl.SSLContext | None:
        if not plan.get("ca"):
            return None
        certs = plan.get("certs")
        key = client_id if certs else ""
        ctx = contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=plan["ca"])
            if certs:
                ctx.load_cert_chain(f"{certs}/{client_id}.pem")
            contexts[key] = ctx
        return ctx

    devices: list[_Device] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(n: int) -> None:
        client_id = f"tb-{n}"
        async with gate:
            welcomed: asyncio.Future[None] = loop.create_future()
            device = _Device(client_id, welcomed)
            await loop.create_connection(lambda: device, host, port, ssl=context(client_id))
            await asyncio.wait_for(welcomed, 60)
            devices.append(device)

    started = time.perf_counter()
    await asyncio.gather(*(connect(n) for n in range(1, count + 1)))
    print(json.dumps({"event": "connected", "seconds": time.perf_counter() - started}), flush=True)
    go = await harness.read_go()
    rate, seconds = go["rate"], go["seconds"]
    sent = 0
    tick = 0.01
    start = time.perf_counter()
    i = 0
    while (now := time.perf_counter()) - start < seconds:
        due = int((now - start) * rate)
        while sent < due:
            devices[i].send()
            i = (i + 1) % len(devices)
            sent += 1
        await asyncio.sleep(tick)
    elapsed = time.perf_counter() - start
    print(json.dumps({"event": "sent", "frames": sent, "seconds": elapsed}), flush=True)
    await harness.read_go()  # until the orchestrator has read the gateway's figures


# ---- the orchestrator ------------------------------------------------------------------------


def _pki(root: Path, devices: int) -> dict[str, Path]:
    import trustme  # a test dependency: the benchmark makes its own certificates

    ca = trustme.CA()
    device_ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    files = {
        "ca": root / "ca.pem",
        "cert": root / "gateway.pem",
        "key": root / "gateway.key",
        "device_ca": root / "device-ca.pem",
        "certs": root / "devices",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    device_ca.cert_pem.write_to_path(str(files["device_ca"]))
    files["certs"].mkdir()
    for n in range(1, devices + 1):
        leaf = device_ca.issue_cert(f"tb-{n}.devices.invalid", common_name=f"tb-{n}")
        leaf.private_key_and_cert_chain_pem.write_to_path(str(files["certs"] / f"tb-{n}.pem"))
    return files


async def _metric(server: harness.Server, name: str, ca: Path | None) -> float:
    import urllib.request

    assert server.http is not None
    scheme = "https" if ca else "http"
    url = f"{scheme}://{server.http[0]}:{server.http[1]}/metrics"
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None

    def read() -> float:
        with urllib.request.urlopen(url, timeout=10, context=ctx) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0

    return await asyncio.to_thread(read)


async def _one(
    args: argparse.Namespace, loop: str, mode: str, pki: dict[str, Path], workdir: Path
) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    tls = mode != "plain"
    if tls:
        sections["tls"] = {"cert": str(pki["cert"]), "key": str(pki["key"])}
        if mode == "tls+client-cert":
            sections["tls"]["device_ca"] = str(pki["device_ca"])
    config = harness.bench_gateway_config(**sections)
    name = f"gateway-{loop}-{mode.replace('+', '-')}"
    server = await harness.start_gateway(workdir / name, loop=loop, config=config, name=name)
    client: harness.Child | None = None
    try:
        await asyncio.sleep(1.0)
        base = harness.sample(server.process.pid)
        others_before = harness.all_cpu()
        client = await harness.spawn(
            f"client-{loop}-{mode.replace('+', '-')}",
            harness.module("tls", "client"),
            workdir,
            stdin=True,
        )
        host, port = server.devices
        plan = {"host": host, "port": port, "devices": args.devices}
        if tls:
            plan["ca"] = str(pki["ca"])
        if mode == "tls+client-cert":
            plan["certs"] = str(pki["certs"])
        await client.send(plan)
        connected = await client.event("connected", 300)
        await asyncio.sleep(2.0)  # let the allocator settle
        idle = harness.sample(server.process.pid)
        ca = pki["ca"] if tls else None
        frames_before = await _metric(server, "iot_frames_in_total", ca)
        cpu_before = harness.sample(server.process.pid)
        await client.send({"rate": args.rate, "seconds": args.measure})
        sent = await client.event("sent", args.measure + 60)
        await asyncio.sleep(0.5)  # the last frames in
        cpu_after = harness.sample(server.process.pid)
        frames = await _metric(server, "iot_frames_in_total", ca) - frames_before
        others = harness.others_cpu(
            others_before, harness.all_cpu(), [server.process.pid, client.pid]
        )
        await client.send({"done": True})
        window = cpu_after.at - base.at
        per_device = (idle.rss - base.rss) / args.devices
        return {
            "loop": loop,
            "mode": mode,
            "devices": args.devices,
            "connect_s": connected["seconds"],
            "handshakes_per_s": args.devices / connected["seconds"],
            "rss_base": base.rss,
            "rss_idle": idle.rss,
            "rss_per_device": per_device,
            "rss_10k_projected": base.rss + per_device * 10_000,
            "frames_sent": sent["frames"],
            "frames_in": frames,
            "rate_achieved": sent["frames"] / sent["seconds"],
            "cpu_s": cpu_after.cpu - cpu_before.cpu,
            "cpu_us_per_message": (cpu_after.cpu - cpu_before.cpu) / max(1.0, frames) * 1e6,
            "other_cores": others / max(1e-9, window),
        }
    finally:
        if client is not None:
            await client.stop()
        await server.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    limit = harness.fd_limit()
    if args.devices + 200 > limit:
        raise SystemExit(f"ulimit -n is {limit}; {args.devices} devices need about that many")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        root = Path(args.workdir or tmp)
        pki_dir = root / "pki"
        pki_dir.mkdir(parents=True, exist_ok=True)
        pki = _pki(pki_dir, args.devices if "tls+client-cert" in args.modes else 0)
        for _ in range(args.repeat):
            for loop in args.loops:
                for mode in args.modes:
                    run = await _one(args, loop, mode, pki, root)
                    runs.append(run)
                    print(_line(run), flush=True)
    summary = {}
    for loop in args.loops:
        for mode in args.modes:
            mine = [r for r in runs if r["loop"] == loop and r["mode"] == mode]
            summary[f"{loop}/{mode}"] = {
                key: statistics.median(r[key] for r in mine)
                for key in (
                    "handshakes_per_s",
                    "rss_per_device",
                    "rss_10k_projected",
                    "cpu_us_per_message",
                    "rate_achieved",
                    "other_cores",
                )
            }
    return {"settings": vars(args), "summary": summary, "runs": runs}


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['loop']:8} {r['mode']:16} {r['devices']} devices: "
        f"{r['handshakes_per_s']:,.0f} handshakes/s, "
        f"{r['rss_per_device'] / 1024:.1f} KiB RSS/idle device "
        f"(10,000: {harness.mib(r['rss_10k_projected'])}), "
        f"{r['cpu_us_per_message']:.1f} us CPU/message at {r['rate_achieved']:,.0f} frames/s; "
        f"others {r['other_cores']:.2f} cores"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:

        async def client() -> None:
            await _client(await harness.read_go())

        harness.run(client(), "uvloop")
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--devices", type=int)
    p.add_argument("--rate", type=float, default=10_000.0, help="frames/s in total")
    p.add_argument("--measure", type=float, help="seconds of DATA")
    p.add_argument("--loops", nargs="+", choices=harness.LOOPS, default=list(harness.LOOPS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeat", type=int, default=1, help="runs of each; medians are reported")
    p.add_argument("--workdir")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    args.devices = args.devices or (1_000 if args.quick else 2_000)
    args.measure = args.measure or (4.0 if args.quick else 10.0)
    started = time.monotonic()
    result = harness.run(main_async(args), "asyncio")
    result["seconds"] = time.monotonic() - started
    print()
    for key, s in result["summary"].items():
        print(
            f"median {key:26} {s['handshakes_per_s']:8,.0f} handshakes/s  "
            f"{s['rss_per_device'] / 1024:6.1f} KiB/device  "
            f"10,000: {harness.mib(s['rss_10k_projected']):>12}  "
            f"{s['cpu_us_per_message']:5.1f} us/message"
        )
    for loop in args.loops:
        plain = result["summary"].get(f"{loop}/plain")
        tls = result["summary"].get(f"{loop}/tls")
        if plain and tls:
            cpu = tls["cpu_us_per_message"] / plain["cpu_us_per_message"]
            rss = (tls["rss_per_device"] - plain["rss_per_device"]) / 1024
            print(f"{loop}: TLS/plain CPU per message x{cpu:.2f}, RSS per device +{rss:.1f} KiB")
    for key, s in result["summary"].items():
        if "/tls" in key:
            verdict = "met" if s["rss_10k_projected"] < TARGET_RSS else "MISSED"
            print(f"target: 10,000 idle TLS devices under 1 GiB on {key}: {verdict}")
    out = harness.write_result("tls", result, args.output)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
