"""docs/deployment.md's nginx recipe, run as written in front of a real gateway (issue 17).

One nginx and one gateway for the module (conftest.py). The page is opened in
Debian's Chromium over https through nginx, with no ``auth.allowed_origins``:
its WebSocket passes the Origin check on the same-origin rule alone, thanks to
the forwarded headers of a trusted proxy (docs/api.md §1). The token stays out
of both nginx logs whatever a client does: page loads, old ``?token=`` links,
scripts, the port-80 redirect and a gateway restart (the error log's upstream
failures).
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator

import pytest
import trustme
from playwright.sync_api import Browser, Page, expect

from tests.deploy.support import SERVER_NAME, Nginx
from tests.support.gateway import OPERATOR, GatewayProcess
from tests.support.wait import wait_until_sync

TIMEOUT_MS = 20_000
expect.set_options(timeout=TIMEOUT_MS)


def origin(nginx: Nginx) -> str:
    return f"https://{SERVER_NAME}:{nginx.https_port}"


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    # The test CA is trusted by this context only (its certificate errors ignored).
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"errors in the page: {errors}"


def raw_request(
    address: tuple[str, int],
    lines: list[str],
    *,
    tls: trustme.CA | None = None,
) -> str:
    """Send one HTTP/1.1 request (header lines, no body) and return the answer's head."""
    sock: socket.socket = socket.create_connection(address, timeout=10)
    if tls is not None:
        context = ssl.create_default_context()
        tls.configure_trust(context)
        sock = context.wrap_socket(sock, server_hostname=SERVER_NAME)
    with sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return head.decode(errors="replace").split("\r\n\r\n", 1)[0]


def upgrade(path: str, host: str, *extra: str) -> list[str]:
    return [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        *extra,
    ]


def status(head: str) -> int:
    return int(head.split(" ", 2)[1])


def test_the_page_works_through_nginx_without_allowed_origins(
    page: Page, nginx: Nginx, deployed_gateway: GatewayProcess
) -> None:
    assert "allowed_origins" not in (deployed_gateway.config or {}).get("auth", {})
    page.goto(f"{origin(nginx)}/#token={OPERATOR}")
    card = page.locator('[data-testid="device-card"][data-device="demo-1"]')
    expect(card.get_by_test_id("device-online")).to_have_text("Online")
    offset = card.get_attribute("data-offset")
    assert offset
    expect(card).not_to_have_attribute("data-offset", offset)  # live values over wss
    # What the gateway received from nginx (its origin check's debug line).
    seen = re.compile(
        rf"origin check: Origin={re.escape(origin(nginx))} Host={SERVER_NAME} "
        rf"X-Forwarded-Proto=https X-Forwarded-Host={SERVER_NAME}:{nginx.https_port} "
        r"X-Forwarded-For=127\.0\.0\.1 peer=127\.0\.0\.1 -> https://"
    )
    wait_until_sync(lambda: bool(seen.search(deployed_gateway.stderr())), "the origin check line")


def test_an_old_query_link_is_sent_to_the_fragment_and_works(page: Page, nginx: Nginx) -> None:
    page.goto(f"{origin(nginx)}/?token={OPERATOR}")
    card = page.locator('[data-testid="device-card"][data-device="demo-2"]')
    expect(card.get_by_test_id("device-online")).to_have_text("Online")
    assert OPERATOR not in page.url


def test_forwarded_headers_are_believed_from_the_trusted_proxy_only(
    nginx: Nginx, deployed_gateway: GatewayProcess, ca: trustme.CA
) -> None:
    host = f"{SERVER_NAME}:{nginx.https_port}"
    through = raw_request(
        ("127.0.0.1", nginx.https_port),
        upgrade("/ws", host, f"Authorization: Bearer {OPERATOR}", f"Origin: {origin(nginx)}"),
        tls=ca,
    )
    assert status(through) == 101, through
    # A client that talks to the gateway directly cannot claim to be https.
    direct = raw_request(
        deployed_gateway.http_address,
        upgrade(
            "/ws",
            host,
            f"Authorization: Bearer {OPERATOR}",
            f"Origin: {origin(nginx)}",
            "X-Forwarded-Proto: https",
            f"X-Forwarded-Host: {host}",
        ),
    )
    # The gateway's own address is 127.0.0.1, which deploy/gateway.toml trusts:
    # from there the headers are believed, as they must be for nginx.
    assert status(direct) == 101, direct
    other = raw_request(
        ("127.0.0.1", nginx.https_port),
        upgrade(
            "/ws",
            host,
            f"Authorization: Bearer {OPERATOR}",
            "Origin: https://evil.example",
        ),
        tls=ca,
    )
    assert status(other) == 403, other


def test_no_token_in_either_nginx_log(
    page: Page, nginx: Nginx, deployed_gateway: GatewayProcess, ca: trustme.CA
) -> None:
    host = f"{SERVER_NAME}:{nginx.https_port}"
    https = ("127.0.0.1", nginx.https_port)
    page.goto(f"{origin(nginx)}/#token={OPERATOR}")
    expect(page.locator('[data-testid="device-card"]').first).to_be_visible()
    # A script with the token in its URL is refused at nginx, never proxied.
    for path in (f"/ws?token={OPERATOR}", f"/api/devices?limit=1&token={OPERATOR}"):
        head = raw_request(https, [f"GET {path} HTTP/1.1", f"Host: {host}"], tls=ca)
        assert status(head) == 400, head
    # The port-80 redirect: the query is not repeated in its Location.
    head = raw_request(
        ("127.0.0.1", nginx.http_port),
        [f"GET /?token={OPERATOR} HTTP/1.1", f"Host: {SERVER_NAME}"],
    )
    assert status(head) == 301, head
    assert f"Location: https://{SERVER_NAME}/\r\n" in head + "\r\n"
    # The gateway restarts: nginx's error log gets the failed upstream requests.
    exit = deployed_gateway.stop_sync()
    assert exit.code == 0, exit
    try:
        for path in ("/ws", f"/ws?token={OPERATOR}", "/", f"/?token={OPERATOR}"):
            lines = upgrade(path, host, f"Authorization: Bearer {OPERATOR}")
            raw_request(https, lines, tls=ca)
        head = raw_request(
            https,
            ["GET /api/devices HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {OPERATOR}"],
            tls=ca,
        )
        assert status(head) == 502, head
    finally:
        deployed_gateway.start_sync()
    wait_until_sync(
        lambda: "connect() failed" in nginx.error_log(), "the upstream failure in the error log"
    )
    page.reload()
    expect(page.locator('[data-testid="device-card"]').first).to_be_visible()
    access, errors = nginx.access_log(), nginx.error_log()
    assert "GET /ws HTTP/1.1" in access
    assert "GET / HTTP/1.1" in access
    assert OPERATOR not in access, access
    assert OPERATOR not in errors, errors
