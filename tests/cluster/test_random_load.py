"""Randomized load over 3 nodes: every ``all`` subscriber sees the same sequence."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import aiohttp

from tests.cluster.conftest import NodeFactory
from tests.resilience.support import connect_dashboard, connect_device, data_frame

DEVICES = 9
MESSAGES = 300


async def _read(dash: Any, out: list[tuple[int, str, int]], want: int) -> None:
    while len(out) < want:
        msg = await dash.recv(timeout=30)
        if msg.get("op") == "telemetry":
            out.append((msg["offset"], msg["device"], msg["seq"]))


async def test_every_all_subscriber_sees_the_same_sequence(nodes: NodeFactory) -> None:
    rng = random.Random(14)
    gws = [nodes("A"), nodes("B"), nodes("C")]
    await asyncio.gather(*(gw.start() for gw in gws))
    async with aiohttp.ClientSession() as session:
        dashes = [await connect_dashboard(gw, session) for gw in gws]
        devices = [await connect_device(gws[i % 3], f"rnd-{i}") for i in range(DEVICES)]
        seqs = [0] * DEVICES
        seen: list[list[tuple[int, str, int]]] = [[] for _ in dashes]
        readers = [
            asyncio.ensure_future(_read(d, out, MESSAGES))
            for d, out in zip(dashes, seen, strict=True)
        ]
        for _ in range(MESSAGES):
            i = rng.randrange(DEVICES)
            seqs[i] = (seqs[i] + 1) & 0xFF
            devices[i].send_raw(data_frame(seqs[i], rng.uniform(-10, 40)))
            if rng.random() < 0.1:
                await asyncio.sleep(rng.uniform(0, 0.02))  # bursts and pauses, not a fixed wait
        try:
            await asyncio.wait_for(asyncio.gather(*readers), 60)
        finally:
            for r in readers:
                r.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await r
        assert len(seen[0]) == MESSAGES
        assert seen[0] == seen[1] == seen[2]
        offsets = [o for o, _, _ in seen[0]]
        assert offsets == sorted(set(offsets))
        for d in devices:
            await d.aclose()
