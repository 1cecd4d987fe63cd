"""Dashboard and API tokens with roles, and the Origin allow-list (docs/api.md §1).

Tokens are compared in constant time. Kept apart from the web layer so the
rules are tested without a server.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

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
        """The role a presented token grants, or None. Every entry is compared, in
        constant time, so timing tells nothing about which token came close."""
        if not presented:
            return None
        found: Role | None = None
        given = presented.encode()
        for token, role in self.tokens.items():
            if hmac.compare_digest(token.encode(), given):
                found = role
        return found


def generate_token() -> str:
    """A fresh random operator token (printed with the dashboard URL at start)."""
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
    """Requests without Origin, same-origin ones, and listed Origins are allowed."""
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    if not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return parts.netloc.lower() == host.lower() and parts.scheme == scheme
