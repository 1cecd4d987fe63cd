"""What every link does with its transport: write unless closing, wait for room, close,
and stop reading when the session says so.

An asyncio Protocol learns that its transport's buffer is full through
``pause_writing``/``resume_writing``; ``drain()`` turns that into something a
session can await (backpressure for commands). It never raises: a link that
went away ends the wait like room would, and the session, closed by then,
says so. A link closed with bytes still unwritten is aborted, not closed: its
peer is not reading them, and asyncio would otherwise hold the connection
(and the bytes) open until it did, that is, forever. TCP and serial links
both use this, so the rules live in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        """Until the transport's buffer is below its high-water mark again, or the link
        is gone. Bound it with a timeout: a peer that does not read never makes room."""
        if not self._paused:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            # A wait given up (its timeout) leaves no waiter behind: a peer that never
            # reads must not grow this list, one abandoned command at a time.
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def write_buffer_size(self) -> int:
        """Bytes waiting in the transport."""
        if self.transport is None:
            return 0
        size: int = self.transport.get_write_buffer_size()
        return size

    def close(self) -> None:
        """Close the transport (its protocol's connection_lost follows).

        With bytes still unwritten the transport is aborted: its peer has not
        read what the OS already holds, so it would not read these either.
        """
        t = self.transport
        if t is None:
            return
        if t.get_write_buffer_size():
            t.abort()
        else:
            t.close()

    def pause_reading(self) -> None:
        """Stop reading from the transport (a device over its frame rate)."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def resume_reading(self) -> None:
        """Read from the transport again."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def pause(self) -> None:
        """The transport's buffer is full (from ``pause_writing``)."""
        self._paused = True

    def resume(self) -> None:
        """Room again, or the link is gone: every waiter goes on (none gets an exception)."""
        self._paused = False
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
