"""Waiting for a condition, always with a deadline and a message that names what was awaited.

A test that waits on a clock (``sleep(2)``, then assert) is slow when the
machine is fast and flaky when it is busy; a wait with no deadline hangs
until pytest-timeout kills the whole run without saying what was missing.
So every wait is on a condition, bounded, and its failure says what it
waited for.

Prefer an event: pass ``changed`` (an ``asyncio.Event`` that whoever changes
the state sets), and the check runs again only when it fires. State with no
event of its own (a counter inside the gateway, another process's
``/metrics`` or HTTP API) is polled every ``every`` seconds, with a deadline
generous enough for a busy shared machine.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

DEFAULT_TIMEOUT = 15.0


class WaitTimeout(AssertionError):
    """The condition did not hold by the deadline (an AssertionError: pytest reports it as a
    failed expectation; benchmarks may catch it to say which child failed)."""


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    every: float = 0.05,
    changed: asyncio.Event | None = None,
) -> None:
    """Return once ``check()`` (a function or a coroutine function) is true.

    ``what`` finishes the sentence "timed out after N s waiting for ...".
    With ``changed``, the check runs when the event is set instead of every
    ``every`` seconds. Exceptions from ``check`` propagate at once.
    """
    try:
        async with asyncio.timeout(timeout) as scope:
            while True:
                if changed is not None:
                    changed.clear()  # before the check: a change during it is not lost
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                if changed is not None:
                    await changed.wait()
                else:
                    await asyncio.sleep(every)
    except TimeoutError:
        if scope.expired():
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}") from None
        raise  # the check's own timeout, not ours


def wait_until_sync(
    check: Callable[[], bool], what: str, *, timeout: float = DEFAULT_TIMEOUT, every: float = 0.1
) -> None:
    """``wait_until`` for code with no event loop (the sync Playwright tests): polls only."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
