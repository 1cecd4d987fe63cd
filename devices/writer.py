"""The write side every link shares: write unless closing, and wait for room.

An asyncio Protocol learns that its transport's buffer is full through
``pause_writing``/``resume_writing``; ``drain()`` turns that into something a
session can await (backpressure for commands). TCP and serial links both use
it, so the rule lives in one place.
"""

from __future__ import annotations

import asyncio
from typing import Any


class LinkWriter:
    """Writes to a transport (any object with asyncio's Transport write methods)."""

    def __init__(self) -> None:
        self.transport: Any = None  # set when the link opens, None when it closes
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []

    def write(self, data: bytes) -> None:
        """Write, unless the link is closed or closing (then the bytes are dropped)."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    async def drain(self) -> None:
        """Until the transport's buffer is below its high-water mark again."""
        if not self._paused:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def write_buffer_size(self) -> int:
        """Bytes waiting in the transport."""
        if self.transport is None:
            return 0
        size: int = self.transport.get_write_buffer_size()
        return size

    def close(self) -> None:
        """Close the transport (its protocol's connection_lost follows)."""
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        """The transport's buffer is full (from ``pause_writing``)."""
        self._paused = True

    def resume(self, exc: Exception | None = None) -> None:
        """Room again, or the link is gone (then waiters get ``exc``, if given)."""
        self._paused = False
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.done():
                continue
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(ConnectionError(str(exc)))
