"""The `Storage` protocol: the seam between the hub and a storage engine.

It has its own module so that the hub's contract reads apart from any engine:
`SQLiteStorage` and `MemoryStorage` both implement it, and another engine can
too (docs/api.md §3-4 is what the hub promises on top of it).
"""

from __future__ import annotations

import typing

from ..hub.store import Store
from .records import StorageStats


class Storage(Store, typing.Protocol):
    """A ``Store`` with a life cycle and counters: what the composition root wires."""

    stats: StorageStats

    async def open(self) -> None:
        """Open (creating if needed) the store; nothing else may be called before."""
        ...

    async def close(self) -> None:
        """Stop accepting writes, commit everything pending, release the store."""
        ...
