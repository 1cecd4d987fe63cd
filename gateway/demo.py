"""``serve --demo N``: simulated devices inside the gateway's own process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


async def start_demo(
    rt: Any, count: int, device_host: str, device_port: int
) -> Callable[[], Awaitable[None]]:
    """Start ``count`` simulated devices; returns a coroutine function that stops them."""
    raise NotImplementedError("the demo arrives with the simulators")
