"""A certificate's CN in the sans-IO session core: the HELLO rules of docs/tls.md, on a fake clock.

``LinkPolicy.certified_id`` is what the TLS device port sets from a verified
client certificate (devices/tcp.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import frames
from devices import CloseLink, CloseReason, LinkPolicy, SessionConfig
from frames import ErrorCode
from tests.devices.core_bench import Bench, closed


def _certified(cn: str, **config: Any) -> Bench:
    """A session on a port that is not loopback, for a device whose certificate says ``cn``."""
    session = SessionConfig(**config)
    policy = dataclasses.replace(LinkPolicy.tcp(session, allow_anonymous=False), certified_id=cn)
    return Bench(policy=policy, **config)


def test_the_cn_needs_no_token_even_where_tokens_are_configured() -> None:
    b = _certified("meter-7", token="shared", tokens={"meter-7": "own"})
    b.hello("meter-7", token="")
    assert b.totals.auth_failed == 0


def test_a_certified_device_is_no_anonymous_one_on_a_public_port() -> None:
    b = _certified("meter-7")  # no tokens at all, not loopback, allow_anonymous off
    b.hello("meter-7")
    assert b.totals.refused_anonymous == 0


def test_a_hello_with_another_client_id_gets_auth_failed() -> None:
    b = _certified("meter-7", token="shared")
    # Even with the right token: the certificate, not the token, says who it is.
    events = b.feed(frames.Hello(1, "meter-8", "env-sensor", "shared"))
    assert closed(events) == CloseLink(CloseReason.AUTH_FAILED)
    [error] = b.out()
    assert isinstance(error, frames.Error)
    assert (error.code, error.reason) == (
        ErrorCode.AUTH_FAILED,
        "client_id differs from the certificate's CN",
    )
    assert b.totals.auth_failed == 1


def test_a_certificate_without_a_cn_admits_no_hello() -> None:
    b = _certified("")  # devices/tcp.py: no CN gives the empty id, which no HELLO has
    events = b.feed(frames.Hello(1, "anyone", "env-sensor", ""))
    assert closed(events) == CloseLink(CloseReason.AUTH_FAILED)
