"""Fixtures for hub tests: a whole gateway app on loopback with a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.auth import TokenTable
from gateway.config import build_config
from tests.gateway.support import OPEN_DEVICES, OPERATOR, VIEWER

__all__ = ["OPERATOR", "VIEWER"]

AppFactory = Callable[..., Any]


@pytest.fixture
def make_app(tmp_path: Path, aiohttp_client: Any) -> AppFactory:
    async def factory(data_dir: Path | None = None, **table: Any) -> TestClient[Any, Any]:
        table.setdefault("data_dir", str(data_dir or tmp_path / "data"))
        table.setdefault("device_port", 0)
        config = build_config(table, environ={})
        app = create_app(config, TokenTable.make(OPERATOR, VIEWER))
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return factory


@pytest.fixture(autouse=True)
async def close_devices() -> AsyncIterator[None]:
    yield
    while OPEN_DEVICES:
        await OPEN_DEVICES.pop().aclose()
