"""Dashboard and API tokens with roles, and the Origin allow-list (docs/api.md §1).

Tokens are compared in constant time. Kept apart from the web layer so the
rules are tested without a server.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from frames.ratelimit import TokenBucket

from .hub import Role


@dataclass(frozen=True, slots=True)
class TokenTable:
    """Which token grants which role."""

    tokens: Mapping[str, Role] = field(default_factory=dict)

    @classmethod
    def make(cls, operator: str | None, viewer: str | None) -> TokenTable:
        """Operator and viewer tokens (either may be absent)."""
        table: dict[str, Role] = {}
        if viewer:
            table[viewer] = Role.VIEWER
        if operator:
            table[operator] = Role.OPERATOR
        return cls(table)

    def role_of(self, presented: str | None) -> Role | None:
        """The role a presented token grants, or None."""
        grant = self.grant(presented)
        return None if grant is None else grant[0]

    def grant(self, presented: str | None) -> tuple[Role, str] | None:
        """The role a presented token grants and the configured token it matched, or None.

        Every entry is compared, in constant time, so timing tells nothing
        about which token came close. The matched token names its holder for
        per-token limits (the HTTP command rate).
        """
        if not presented:
            return None
        found: tuple[Role, str] | None = None
        given = presented.encode()
        for token, role in self.tokens.items():
            if hmac.compare_digest(token.encode(), given):
                found = (role, token)
        return found


class CommandRates:
    """One command-rate bucket per configured token, for commands over HTTP (docs/api.md §4).

    ``rate`` commands a second with bursts of a second's worth, as each
    WebSocket dashboard has; all of a token's HTTP callers share its bucket,
    so opening more connections buys no more commands. Buckets exist only for
    tokens that authenticated, so there are at most as many as configured tokens.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, token: str, now: float) -> bool:
        """Spend one command of ``token``'s allowance at ``now``; False: over the rate."""
        bucket = self._buckets.get(token)
        if bucket is None:
            bucket = self._buckets[token] = TokenBucket(self.rate, max(1.0, self.rate), now)
        return bucket.take(now)

    def retry_after(self) -> int:
        """Whole seconds after which a refused caller may try again (``Retry-After``)."""
        return max(1, math.ceil(1.0 / self.rate))


def generate_token() -> str:
    """A fresh random operator token (printed in the dashboard address's fragment at start).

    URL-safe base64, so it goes into a URL fragment as it is.
    """
    return secrets.token_urlsafe(24)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def origin_allowed(
    origin: str | None, host: str | None, scheme: str, allowed: Iterable[str]
) -> bool:
    """Requests without Origin, same-origin ones, and listed Origins are allowed.

    ``host`` and ``scheme`` are the request's own, or those a trusted proxy
    forwarded (see ``forwarded_origin``). A default port is the same as none:
    ``https://gw.example.com`` matches ``gw.example.com:443``.
    """
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    if not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    if parts.scheme != scheme:
        return False
    return _without_default_port(parts.netloc, scheme) == _without_default_port(host, scheme)


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def _without_default_port(netloc: str, scheme: str) -> str:
    netloc = netloc.lower()
    suffix = _DEFAULT_PORTS.get(scheme, "")
    return netloc[: -len(suffix)] if suffix and netloc.endswith(suffix) else netloc


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """``http.trusted_proxies`` as networks: addresses or CIDRs (``ValueError`` names a bad one)."""
    out: list[Network] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an IP address or a network such as 10.0.0.0/8"
            ) from None
    return out


def is_trusted(peer: str | None, trusted: Iterable[Network]) -> bool:
    """Whether the connection's peer address is one of the trusted proxies."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:  # a Unix socket peer, say: never a trusted proxy
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in trusted)


def _last(value: str | None) -> str | None:
    """The last entry of a comma-separated header: the one the nearest proxy set."""
    if value is None:
        return None
    item = value.rsplit(",", 1)[-1].strip()
    return item or None


def forwarded_origin(
    host: str | None,
    scheme: str,
    peer: str | None,
    headers: Mapping[str, str],
    trusted: Iterable[Network],
) -> tuple[str | None, str]:
    """The host and scheme the same-origin rule compares with (docs/api.md §1).

    The request's own, unless its peer is a trusted proxy (``http.trusted_proxies``):
    then ``X-Forwarded-Host`` and ``X-Forwarded-Proto``, where present, are what
    the browser used. Nobody else's forwarded headers are believed: a client
    talking to the gateway directly could otherwise claim any origin.
    """
    if not is_trusted(peer, trusted):
        return host, scheme
    proto = _last(headers.get("X-Forwarded-Proto"))
    if proto is not None and proto.lower() in ("http", "https"):
        scheme = proto.lower()
    forwarded_host = _last(headers.get("X-Forwarded-Host"))
    return (forwarded_host or host), scheme
