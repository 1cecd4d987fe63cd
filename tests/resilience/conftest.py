"""Fixtures of the resilience suite: gateways in child processes, always stopped afterwards.

Each test is bounded (the suite's own timeouts, and pytest-timeout's 60 s) and
marked ``resilience``; the suite runs in CI with the rest (``make test``) and
alone with ``pytest -m resilience``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.resilience.support import close_open
from tests.support.gateway import OPERATOR, VIEWER, GatewayProcess

GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
async def gateways(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Make gateway processes (not started) with the suite's tokens and an empty config
    unless given; every one is killed at the end of the test."""
    made: list[GatewayProcess] = []

    def factory(config: dict[str, Any] | None = None, **kwargs: Any) -> GatewayProcess:
        workdir = tmp_path / f"gw{len(made)}"
        kwargs.setdefault("token", OPERATOR)
        kwargs.setdefault("viewer_token", VIEWER)
        gw = GatewayProcess(workdir, config or {}, **kwargs)
        made.append(gw)
        return gw

    yield factory
    for gw in made:
        await gw.kill()


@pytest.fixture(autouse=True)
async def close_leftovers() -> AsyncIterator[None]:
    """Close the clients a test left open (it failed half way), quietly."""
    yield
    await close_open()
