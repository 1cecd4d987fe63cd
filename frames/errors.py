"""Errors of the frame and message layers.

Each error says whose fault it is: `LocalProtocolError` means our own caller
asked for something the contract forbids (a bug to fix on this side);
`RemoteProtocolError` means the peer sent something the contract forbids (answer
it with the carried ERROR code, do not crash).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """ERROR message codes (docs/protocol.md §3)."""

    NOT_REGISTERED = 1
    BAD_HELLO = 2
    AUTH_FAILED = 3  # fatal: the gateway closes the link after sending it
    REPLACED = 4  # fatal
    UNKNOWN_TYPE = 5
    MALFORMED = 6
    RATE_LIMITED = 7

    @property
    def fatal(self) -> bool:
        """True when the gateway closes the link after sending this code."""
        return self in (ErrorCode.AUTH_FAILED, ErrorCode.REPLACED)


class FrameGatewayError(Exception):
    """Base class of every error this project raises on purpose."""


class LocalProtocolError(FrameGatewayError, ValueError):
    """Our caller asked for something the contract forbids (e.g. a 300-byte payload)."""


class RemoteProtocolError(FrameGatewayError, ValueError):
    """A peer sent bytes the contract forbids.

    `code` is the ERROR code the gateway answers with; `field` names the part
    of the message that was wrong, so logs point at the culprit.
    """

    def __init__(self, message: str, *, code: ErrorCode, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class CommandError(LocalProtocolError):
    """A JSON command does not fit its protocol (unknown name, missing or bad argument).

    `field` names the offending key path, e.g. ``args.channel``.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
