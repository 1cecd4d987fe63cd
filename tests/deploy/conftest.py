"""Fixtures of the deployment tests: one nginx and one gateway per module, as deployed.

The gateway runs as the systemd unit would run it: deploy/gateway.toml (on
loopback, with the test's offset mark), its operator token from the
environment (the unit's EnvironmentFile), no ``auth.allowed_origins``. nginx
runs deploy/nginx/iot-gateway.conf rendered for the test (tests/deploy/support.py)
with a certificate from a trustme CA.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from playwright.sync_api import Browser, Playwright, sync_playwright

from tests.deploy.support import SERVER_NAME, Nginx, free_port, gateway_config, render_nginx
from tests.support import chromium
from tests.support.gateway import OPERATOR, GatewayProcess

# The test's server name is this machine's loopback, as DNS would say in production.
RESOLVE_SERVER_NAME = f"--host-resolver-rules=MAP {SERVER_NAME} 127.0.0.1"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def deployed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """deploy/gateway.toml with the demo's devices, the token from the environment."""
    workdir = tmp_path_factory.mktemp("gateway")
    gw = GatewayProcess(
        workdir,
        gateway_config(workdir / "backups" / "offset-mark"),
        env={"IOT_GATEWAY_TOKEN": OPERATOR},
        # debug: the origin check logs the headers the gateway received.
        args=["--demo", "4", "--log-level", "debug"],
    )
    (workdir / "backups").mkdir(mode=0o700)
    gw.token = OPERATOR
    gw.start_sync()
    yield gw
    if gw.running:
        exit = gw.stop_sync()
        assert exit.code == 0, exit


@pytest.fixture(scope="module")
def nginx(
    tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA, deployed_gateway: GatewayProcess
) -> Iterator[Nginx]:
    prefix = tmp_path_factory.mktemp("nginx")
    cert = ca.issue_cert(SERVER_NAME)
    cert_path, key_path = prefix / "fullchain.pem", prefix / "privkey.pem"
    cert_path.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    http_port, https_port = free_port(), free_port()
    site = render_nginx(
        http_port=http_port,
        https_port=https_port,
        upstream_port=deployed_gateway.http_port,
        cert=cert_path,
        key=key_path,
        logs=prefix / "logs",
    )
    server = Nginx(Path(prefix), site, http_port, https_port)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    why = chromium.missing()
    if why is not None:
        pytest.fail(why)
    browser = chromium.launch(playwright, [RESOLVE_SERVER_NAME])
    yield browser
    browser.close()
