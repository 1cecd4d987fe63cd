"""What differs between a TCP link and a serial link, as data rather than branches.

The session rules of docs/protocol.md §4 are the same on every link except
for a few, which docs/devices.md spells out: a TCP device must say HELLO in
time, a TCP link is closed for garbage and for silence, while a serial line
is never closed for noise, goes back to waiting after silence, and may have a
fixed identity. A TCP device over its frame rate is slowed by not being read
(backpressure), a serial one has its extra frames dropped; a TCP link has a
small budget before its HELLO; a TCP port that is not loopback may refuse
devices without a token. ``LinkPolicy`` carries those differences (and the
link's framing) into the session core, which never asks which transport it is on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from frames import FrameOptions

from .config import SerialPortConfig, SessionConfig
from .events import Transport


@dataclass(frozen=True, slots=True)
class LinkPolicy:
    """The rules of one kind of link; build one with ``tcp`` or ``serial``."""

    transport: Transport
    frame_timeout: float  # seconds a partial frame may wait (docs/protocol.md §2)
    hello_deadline: bool  # a device must say HELLO within SessionConfig.hello_timeout
    garbage_closes: bool  # the garbage rule closes the link (else it only counts)
    silence_closes: bool  # silence closes the link (else the session waits for HELLO)
    fixed_identity: tuple[str, str] | None = None  # (client_id, protocol): no HELLO needed
    frame: FrameOptions = field(default_factory=FrameOptions)
    # Over the frame rate: stop reading (True) or drop frames with RATE_LIMITED (False).
    backpressure: bool = False
    # SessionConfig.hello_budget_bytes and _frames bound what comes before the HELLO.
    hello_budget: bool = False
    # A device with no token configured for it may say HELLO (docs/protocol.md §4).
    allow_anonymous: bool = True
    # The link's own heartbeat (a serial port's ``heartbeat``): see SessionConfig.heartbeat_for.
    heartbeat: int | None = None
    # The subject CN of the link's verified client certificate (docs/tls.md): the only
    # client_id its HELLO may give, and no device token is asked of it.
    certified_id: str | None = None

    @classmethod
    def tcp(
        cls,
        config: SessionConfig,
        frame: FrameOptions | None = None,
        *,
        allow_anonymous: bool = True,
    ) -> LinkPolicy:
        """A TCP connection: HELLO in time and within budget, closed for garbage and for
        silence, slowed by backpressure. ``allow_anonymous`` is the device port's rule."""
        return cls(
            transport=Transport.TCP,
            frame_timeout=config.frame_timeout,
            hello_deadline=True,
            garbage_closes=True,
            silence_closes=True,
            frame=frame or FrameOptions(),
            backpressure=True,
            hello_budget=True,
            allow_anonymous=allow_anonymous,
        )

    @classmethod
    def serial(cls, config: SessionConfig, port: SerialPortConfig | None = None) -> LinkPolicy:
        """A serial port: never closed for noise or silence, frames over the rate dropped,
        maybe a fixed identity."""
        fixed = None
        if port is not None and port.client_id is not None and port.protocol is not None:
            fixed = (port.client_id, port.protocol)
        timeout = port.frame_timeout if port is not None else None
        return cls(
            transport=Transport.SERIAL,
            frame_timeout=config.serial_frame_timeout if timeout is None else timeout,
            hello_deadline=False,
            garbage_closes=False,
            silence_closes=False,
            fixed_identity=fixed,
            frame=port.frame if port is not None else FrameOptions(),
            heartbeat=port.heartbeat if port is not None else None,
        )

    @classmethod
    def for_transport(cls, transport: Transport, config: SessionConfig) -> LinkPolicy:
        """The default policy of ``transport`` (for links that bring none of their own)."""
        return _BUILDERS[transport](config)


_BUILDERS: dict[Transport, Callable[[SessionConfig], LinkPolicy]] = {
    Transport.TCP: LinkPolicy.tcp,
    Transport.SERIAL: LinkPolicy.serial,
}
