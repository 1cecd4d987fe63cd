"""Failed links per source address: who gets held at the door (docs/devices.md).

The pre-HELLO budget bounds what one connection costs, but not how often a
client may come back for another: an attacker that reconnects at once after
each close makes the gateway accept, decode a budget's worth and answer it,
thousands of times a second. So each source address has a token bucket of
*failed* links: a link that ends without ever going online (over the budget,
no HELLO in time, a wrong token, a refused HELLO, closed before saying
anything) takes a token, and so does an empty session (online, then closed
soon without one frame after its HELLO: ``devices.tcp``). An address with no
token left is *held*: its new connections are accepted but never read, and
closed when the address has a token again, so a client that reconnects in a
loop waits at the door instead of spinning the gateway. Sessions that send
anything cost nothing, so a real device sharing the address is slowed only
while that address keeps failing.

Sans-IO like the session core: ``now`` is passed in. The table is bounded
(``max_addresses``; the oldest entry goes first), and IPv6 addresses are
counted per /64, the block one host usually has.
"""

from __future__ import annotations

import ipaddress

from .throttle import FrameRate

# Addresses remembered at most; one entry is a few hundred bytes.
MAX_ADDRESSES = 65_536


def address_key(host: str) -> str:
    """The bucket an address counts in: itself for IPv4, its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class FailedLinks:
    """``max_failed`` failed links per ``window`` seconds per address, then hold.

    ``max_failed`` 0 turns the rule off (``held_until`` is always 0).
    """

    def __init__(
        self, max_failed: int, window: float, *, max_addresses: int = MAX_ADDRESSES
    ) -> None:
        if max_failed < 0:
            raise ValueError(f"max_failed_links must be >= 0, not {max_failed}")
        if not window > 0:
            raise ValueError(f"failed_links_window must be > 0, not {window}")
        self.max_failed = max_failed
        self.window = window
        self.max_addresses = max_addresses
        self._buckets: dict[str, FrameRate] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def failed(self, host: str, now: float) -> None:
        """A link from ``host`` ended without going online."""
        if not self.max_failed:
            return
        key = address_key(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_addresses:
                # Oldest first (dicts keep insertion order): bounded, whatever the spread.
                del self._buckets[next(iter(self._buckets))]
            bucket = FrameRate(self.max_failed / self.window, self.max_failed, now)
            self._buckets[key] = bucket
        else:
            bucket.refill(now)
        # May go below zero: an address that keeps failing while held waits longer.
        bucket.tokens = max(bucket.tokens - 1.0, -float(self.max_failed))

    def held_until(self, host: str, now: float) -> float:
        """0 when ``host`` may connect now, else the time its next connection may be read."""
        if not self._buckets:
            return 0.0
        key = address_key(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = bucket.refill(now)
        if tokens >= 1.0:
            if tokens >= bucket.burst:
                del self._buckets[key]  # recovered in full: forget it
            return 0.0
        return bucket.ready_at(1.0)
