"""The wait helpers: they return once the condition holds, and say what they waited for."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.wait import WaitTimeout, wait_until, wait_until_sync


async def test_polls_a_plain_or_async_check_until_it_holds() -> None:
    calls = 0

    def check() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    await wait_until(check, "the third call", every=0.001)
    assert calls == 3

    async def async_check() -> bool:
        await asyncio.sleep(0)
        return True

    await wait_until(async_check, "an async check")


async def test_with_an_event_it_checks_when_the_event_fires() -> None:
    changed = asyncio.Event()
    state = {"n": 0}
    checks = 0

    def check() -> bool:
        nonlocal checks
        checks += 1
        return state["n"] >= 2

    async def producer() -> None:
        for _ in range(2):
            await asyncio.sleep(0.01)
            state["n"] += 1
            changed.set()

    task = asyncio.create_task(producer())
    await wait_until(check, "two changes", changed=changed, every=3600)
    await task
    assert checks == 3  # once at first, then once per change


async def test_timeout_names_what_was_awaited() -> None:
    with pytest.raises(WaitTimeout, match=r"timed out after 0\.05 s waiting for the moon"):
        await wait_until(lambda: False, "the moon", timeout=0.05, every=0.01)


async def test_the_checks_own_timeout_is_not_reported_as_ours() -> None:
    async def check() -> bool:
        raise TimeoutError("the check's own")

    with pytest.raises(TimeoutError, match="the check's own"):
        await wait_until(check, "x", timeout=5)


def test_sync_wait() -> None:
    calls: list[int] = []

    def check() -> bool:
        calls.append(1)
        return len(calls) >= 2

    wait_until_sync(check, "two calls", every=0.001)
    assert len(calls) == 2
    with pytest.raises(WaitTimeout, match="waiting for never"):
        wait_until_sync(lambda: False, "never", timeout=0.02, every=0.005)
