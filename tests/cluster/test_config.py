"""Bad cluster settings: one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import pytest
import trustme

from gateway.cli import EXIT_CONFIG
from gateway.cluster import ClusterConfig
from gateway.config import ConfigError, build_config
from tests.cluster.support import RedisServer, listed
from tests.resilience.support import connect_device
from tests.support.gateway import OPERATOR, GatewayProcess
from tests.support.wait import wait_until


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cluster", "redis://127.0.0.1:1/0", "--node-id", "n1"], "needs an operator token"),
        (
            ["--cluster", "http://127.0.0.1:1/0", "--node-id", "n1", "--token", OPERATOR],
            "must be redis://",
        ),
        (["--cluster", "redis://127.0.0.1:1/0", "--token", OPERATOR], "--node-id) is required"),
        (
            ["--cluster", "redis://127.0.0.1:1/x", "--node-id", "n1", "--token", OPERATOR],
            "must be a number",
        ),
        (
            ["--cluster", "redis://127.0.0.1:1/0", "--node-id", "a b", "--token", OPERATOR],
            "node_id must be",
        ),
        (["--node-id", "n1"], "needs cluster.url"),
    ],
)
async def test_bad_cluster_flags_exit_2_in_one_line(
    tmp_path: Path, args: list[str], words: str
) -> None:
    gw = GatewayProcess(tmp_path, None, args=args)
    gw.launch()
    exit = await gw.wait_exit(timeout=20)
    assert exit.code == EXIT_CONFIG, exit
    assert words in exit.stderr, exit.stderr
    assert "Traceback" not in exit.stderr


def test_password_from_the_environment_never_argv() -> None:
    config = build_config(
        {"auth": {"token": OPERATOR}, "cluster": {"url": "rediss://h:6380/1", "node_id": "n"}},
        environ={"IOT_GATEWAY_CLUSTER_PASSWORD": "s3cret"},
    )
    assert config.cluster.password == "s3cret"
    assert config.cluster.url == "rediss://h:6380/1"


def test_without_url_nothing_changes() -> None:
    assert ClusterConfig().check() is None
    config = build_config({})
    assert config.cluster.url is None
    with pytest.raises(ConfigError, match="node_lost_after"):
        build_config(
            {
                "auth": {"token": OPERATOR},
                "cluster": {"url": "redis://h/0", "node_id": "n", "node_lost_after": 0},
            }
        )


async def test_redis_password_from_the_environment(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", password="pw-14")
    redis.start()
    try:
        args = ["--cluster", redis.url, "--node-id", "n1", "--token", OPERATOR]
        good = GatewayProcess(
            tmp_path, None, args=args, env={"IOT_GATEWAY_CLUSTER_PASSWORD": "pw-14"}, name="good"
        )
        bad = GatewayProcess(tmp_path, None, args=args, name="bad")
        await good.start()
        await bad.start()  # starts degraded: local work goes on
        status, body = await asyncio.to_thread(good.request_sync, "GET", "/healthz")
        assert (status, body["cluster"]["state"]) == (200, "ok"), body
        status, body = await asyncio.to_thread(bad.request_sync, "GET", "/healthz")
        assert (status, body["status"]) == (503, "degraded"), body
        assert "cluster_unavailable" in body["cluster"]["error"], body
        assert "pw-14" not in good.log() + bad.log()  # never logged
        await good.stop()
        await bad.stop()
    finally:
        redis.stop()


async def test_a_password_in_the_cluster_url_is_refused(tmp_path: Path) -> None:
    # Every local user can read argv (ps): the password must come from elsewhere.
    args = ["--cluster", "redis://:pw-14@127.0.0.1:1/0", "--node-id", "n1", "--token", OPERATOR]
    gw = GatewayProcess(tmp_path, None, args=args)
    gw.launch()
    exit = await gw.wait_exit(timeout=20)
    assert exit.code == EXIT_CONFIG, exit
    assert "must not hold the password" in exit.stderr, exit.stderr
    assert "pw-14" not in exit.stderr


async def test_rediss_with_the_password_from_the_config_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = tmp_path / "tls"
    files.mkdir()
    cert.cert_chain_pems[0].write_to_path(files / "redis.crt")
    cert.private_key_pem.write_to_path(files / "redis.key")
    ca.cert_pem.write_to_path(files / "ca.crt")
    redis = RedisServer(
        tmp_path / "redis",
        password="pw-tls",
        tls=(files / "redis.crt", files / "redis.key", files / "ca.crt"),
    )
    redis.start()
    made: list[GatewayProcess] = []  # killed whatever happens (a failed assert included)
    try:
        assert redis.url.startswith("rediss://")
        table = {"cluster": {"password": "pw-tls"}}
        a, b = (
            GatewayProcess(
                tmp_path,
                table,
                args=["--cluster", redis.url, "--node-id", name],
                token=OPERATOR,
                name=name,
            )
            for name in ("A", "B")
        )
        made += [a, b]
        await asyncio.gather(a.start(), b.start())
        dev = await connect_device(a, "tls-1")
        await wait_until(partial(listed, b, "tls-1", node="A"), "tls-1 on A, seen from B")
        status, body = await asyncio.to_thread(b.request_sync, "GET", "/healthz")
        assert (status, body["cluster"]["state"]) == (200, "ok"), body

        async def both() -> bool:
            _, body = await asyncio.to_thread(b.request_sync, "GET", "/healthz")
            return bool(body["cluster"]["nodes"] == ["A", "B"])

        await wait_until(both, "B seeing nodes A and B")
        # Plain redis:// to the TLS port does not get in: degraded, not silently insecure.
        plain = GatewayProcess(
            tmp_path,
            table,
            args=["--cluster", f"redis://127.0.0.1:{redis.port}/0", "--node-id", "P"],
            token=OPERATOR,
            name="plain",
        )
        made.append(plain)
        await plain.start()
        status, body = await asyncio.to_thread(plain.request_sync, "GET", "/healthz")
        assert (status, body["status"]) == (503, "degraded"), body
        assert "pw-tls" not in a.log() + b.log() + plain.log()
        await dev.aclose()
    finally:
        for gw in made:
            await gw.kill()
        redis.stop()
