"""Instructions per telemetry frame, counted by callgrind: a ruler that noise does not bend.

Seconds on this shared 2-core VM move by 2x over an hour; instruction counts
for the same code and inputs repeat to within about 0.5 % (the SQLite writer
thread's batching moves them a little). So a change to the hot path is
judged here, and its seconds in ``benchmarks.hotpath`` and ``benchmarks.e2e``.

    .venv/bin/python -m benchmarks.instructions                 # this checkout
    .venv/bin/python -m benchmarks.instructions --tree /tmp/wt-dc04a44 --tree .

For each tree (a checkout; run with ``PYTHONPATH`` set to it, so that each
runs its own code) and each stage, it runs ``--stage STAGE --frames N`` of
this file under ``valgrind --tool=callgrind`` with N = 1,000 and 6,000 and
prints the difference over 5,000: what one more frame costs, set-up excluded.

Stages: ``device`` (``DeviceSession.data_received`` through the manager to a
sink that drops the events) and ``pipeline`` (session, hub, SQLite storage
with its writer thread, one dashboard drained as the WebSocket writer does).
The frames are env-sensor readings, 100 devices round robin; in range, or
with ``--readings out-of-range`` out of every range, as the end-to-end
benchmark's stamped readings are (each message then carries ``out_of_range``).

Threads are counted apart (``--separate-threads``). The event loop's thread
is a steady ruler in both stages (the same count run after run). The other
threads (in ``pipeline``, the SQLite writer) are not: their batches, and when
SQLite checkpoints its WAL, depend on how valgrind schedules the threads (two
harnesses of the same code gave counts 10 % apart), so read them as a rough
figure, never as a ratio of a few %.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGES = ("device", "pipeline")
SMALL, LARGE = 1_000, 6_000
READINGS = {
    "in-range": bytes([8, 90, 17, 112, 97]),  # 21.70 degC, 45.28 %, 97 %
    # What the end-to-end benchmark's stamped send times look like to the
    # gateway: out of the env-sensor ranges, so each message carries out_of_range.
    "out-of-range": bytes([0x7F, 0xFF, 0xFF, 0xFF, 0xFF]),  # 327.67 degC, 655.35 %, 255 %
}


class _NullLink:
    """A LinkPort that drops what the session writes (WELCOME)."""

    kind: Any = None
    peer = "bench"

    def write(self, data: bytes) -> None:
        pass

    def write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _Sink:
    def device_event(self, event: Any) -> None:
        pass


async def _run(stage: str, frames: int, workdir: Path, reading: bytes) -> None:
    # Imported here: the tree under test is on sys.path only in the child.
    from devices import DeviceManager, DeviceSession, SessionConfig, Transport
    from frames import Data, Hello, encode_frame

    _NullLink.kind = Transport.TCP
    config = SessionConfig(max_frames_per_second=1e9, rate_burst=1e9)
    hub: Any = None
    storage: Any = None
    if stage == "device":
        manager = DeviceManager(_Sink(), config)
    else:
        from gateway import hub as hub_module
        from gateway.hub import Hub, HubConfig, Role
        from gateway.metrics import Metrics
        from gateway.storage import SQLiteStorage

        storage = SQLiteStorage(workdir / "ir.sqlite3")
        engine = getattr(hub_module, "LocalEngine", None)  # older trees: the storage itself
        hub = Hub(engine(storage) if engine else storage, HubConfig(queue_size=1 << 20), Metrics())
        manager = DeviceManager(hub, config)
        hub.attach(manager)
        await storage.open()
        await hub.start()
    sessions = []
    for i in range(100):
        session = DeviceSession(manager, _NullLink())  # type: ignore[arg-type]
        session.start()
        session.data_received(encode_frame(Hello(0, f"ir-{i:03d}", "env-sensor").encode()))
        sessions.append(session)
    dash = None
    if hub is not None:
        dash = hub.connect_dashboard(Role.VIEWER, "ir")
        await hub.handle(dash, {"op": "subscribe", "all": True})
        dash.take(1 << 20)
    # 256 frames made once: building them must not count per frame.
    made = [encode_frame(Data(seq, reading).encode()) for seq in range(256)]
    for i in range(frames):
        sessions[i % 100].data_received(made[i & 0xFF])
        if dash is not None and i & 255 == 255:
            "\n".join(dash.take(256))
    if hub is not None:
        await storage.flush()
        await hub.stop()
        await storage.close()


def _child(stage: str, frames: int, readings: str) -> list[str]:
    # This file, not the tree's: an older tree has no such script, and this
    # one imports only the tree's packages.
    script = str(Path(__file__).resolve())
    return [
        sys.executable,
        script,
        "--child",
        "--stage",
        stage,
        "--frames",
        str(frames),
        "--readings",
        readings,
    ]


def _warm(tree: Path, stage: str, readings: str) -> None:
    """One run outside valgrind first: a tree's first imports write its bytecode
    caches, which would be counted in whichever run came first."""
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    subprocess.run(_child(stage, 10, readings), cwd=tree, env=env, check=True, capture_output=True)


def _count(tree: Path, stage: str, frames: int, readings: str) -> tuple[int, int]:
    """Instructions of one child run: the event loop's thread, and every other thread.

    Counted per thread (``--separate-threads``): the loop's thread repeats run
    after run; the SQLite writer's does not (see the module docstring).
    """
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        out = Path(tmp) / "cg"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",
                f"--callgrind-out-file={out}",
                *_child(stage, frames, readings),
            ],
            cwd=tree,
            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        totals: dict[int, int] = {}
        for f in Path(tmp).glob("cg-*"):
            found = re.search(r"^totals: (\d+)", f.read_text(errors="replace"), re.MULTILINE)
            if found is not None:
                totals[int(f.name.rsplit("-", 1)[1])] = int(found.group(1))
    if 1 not in totals:
        raise RuntimeError(f"no instruction count from callgrind: {done.stderr[-500:]}")
    return totals[1], sum(n for k, n in totals.items() if k != 1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tree", action="append", type=Path, help="a checkout (repeat; default .)")
    p.add_argument("--stage", choices=STAGES, action="append")
    p.add_argument("--readings", choices=sorted(READINGS), default="in-range")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, default=SMALL, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    stages = args.stage or list(STAGES)
    if args.child:
        with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
            asyncio.run(_run(stages[0], args.frames, Path(tmp), READINGS[args.readings]))
        return 0
    trees = [t.resolve() for t in (args.tree or [Path(".")])]
    for stage in stages:
        for tree in trees:
            _warm(tree, stage, args.readings)
            (loop_l, other_l), (loop_s, other_s) = (
                _count(tree, stage, LARGE, args.readings),
                _count(tree, stage, SMALL, args.readings),
            )
            loop = (loop_l - loop_s) / (LARGE - SMALL)
            other = (other_l - other_s) / (LARGE - SMALL)
            print(
                f"{stage:9s} {tree}: {loop + other:,.0f} instructions per frame "
                f"(event loop's thread {loop:,.0f}, other threads {other:,.0f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
