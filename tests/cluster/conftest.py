"""Fixtures of the cluster suite: one redis-server per module, nodes per test.

Nodes lose a dead peer's lease after 2 s here (``cluster.node_lost_after``;
10 s by default), so the node-loss tests stay short.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.support import LinkProxy, RedisServer
from tests.resilience.support import close_open
from tests.support.gateway import OPERATOR, VIEWER, GatewayProcess

NODE_LOST_AFTER = 2.0
_prefixes = itertools.count(1)

NodeFactory = Callable[..., GatewayProcess]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private, empty redis-server for the module's tests."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nodes(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[NodeFactory]:
    """Make nodes (not started) of one cluster, under a key prefix of the test's own;
    every one is killed at the end of the test."""
    made: list[GatewayProcess] = []
    prefix = f"t{next(_prefixes)}"

    def factory(
        name: str, config: dict[str, Any] | None = None, url: str | None = None, **kwargs: Any
    ) -> GatewayProcess:
        table = {"cluster": {"node_lost_after": NODE_LOST_AFTER}, **(config or {})}
        kwargs.setdefault("token", OPERATOR)
        kwargs.setdefault("viewer_token", VIEWER)
        args = ["--cluster", url or redis_server.url, "--node-id", name]
        args += ["--cluster-prefix", prefix]
        gw = GatewayProcess(tmp_path, table, args=args, name=name, **kwargs)
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


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[LinkProxy]:
    """A TCP proxy in front of the module's Redis that a test cuts, stalls or deafens;
    a node given ``url=proxy.url`` reaches Redis only through it."""
    link = LinkProxy(redis_server.port)
    await link.start()
    yield link
    await link.aclose()
