"""The same-origin rule behind a reverse proxy: ``forwarded_origin`` and ``http.trusted_proxies``.

docs/api.md §1: X-Forwarded-Proto and X-Forwarded-Host are believed from the
configured proxies only; from anyone else the request's own Host and scheme
are what the Origin is compared with.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth import forwarded_origin, is_trusted, origin_allowed, parse_networks
from gateway.config import ConfigError, build_config

TRUSTED = parse_networks(["127.0.0.1", "::1", "10.1.0.0/16"])
PROXIED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.com"}


def allowed(peer: str, headers: dict[str, str], origin: str = "https://gw.example.com") -> bool:
    host, scheme = forwarded_origin("gw.example.com", "http", peer, headers, TRUSTED)
    return origin_allowed(origin, host, scheme, [])


def test_behind_a_trusted_proxy_the_https_origin_is_same_origin() -> None:
    assert allowed("127.0.0.1", PROXIED)
    assert allowed("::1", PROXIED)
    assert allowed("10.1.200.3", PROXIED)
    assert allowed("::ffff:127.0.0.1", PROXIED)  # a dual-stack listener's IPv4 peer


def test_nobody_else_is_believed() -> None:
    for peer in ("192.0.2.7", "10.2.0.1", "::2", None, "", "not-an-address"):
        assert not allowed(peer, PROXIED)  # type: ignore[arg-type]


def test_without_forwarded_headers_the_request_decides() -> None:
    assert not allowed("127.0.0.1", {})
    assert allowed("127.0.0.1", {}, origin="http://gw.example.com")


def test_the_nearest_proxys_value_counts_and_bad_protos_are_ignored() -> None:
    assert allowed(
        "127.0.0.1", {"X-Forwarded-Proto": "http, https", **{"X-Forwarded-Host": "gw.example.com"}}
    )
    host, scheme = forwarded_origin(
        "h", "http", "127.0.0.1", {"X-Forwarded-Proto": "gopher"}, TRUSTED
    )
    assert (host, scheme) == ("h", "http")


def test_default_ports_are_the_same_as_none() -> None:
    assert origin_allowed("https://gw.example.com", "gw.example.com:443", "https", [])
    assert origin_allowed("https://gw.example.com:443", "gw.example.com", "https", [])
    assert not origin_allowed("https://gw.example.com:8443", "gw.example.com", "https", [])


@given(
    peer=st.ip_addresses(),
    proto=st.sampled_from(["http", "https", "HTTPS", "", "x"]),
    forwarded_host=st.text(min_size=0, max_size=30),
)
def test_an_untrusted_peer_never_changes_the_comparison(
    peer: object, proto: str, forwarded_host: str
) -> None:
    headers = {"X-Forwarded-Proto": proto, "X-Forwarded-Host": forwarded_host}
    result = forwarded_origin("own.host", "http", str(peer), headers, TRUSTED)
    if is_trusted(str(peer), TRUSTED):
        assert result[1] in ("http", "https")
    else:
        assert result == ("own.host", "http")


@pytest.mark.parametrize("entry", ["localhost", "10.0.0.0/33", "1.2.3", ""])
def test_a_bad_trusted_proxy_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"http\.trusted_proxies: .* is not an IP address"):
        build_config({"http": {"trusted_proxies": [entry]}}, environ={})


def test_no_trusted_proxies_by_default() -> None:
    assert build_config({}, environ={}).http.trusted_proxies == []
