"""Log lines that a peer can cause, bounded: a few of each kind per window, the rest counted.

A device (or something posing as one) decides how often the gateway logs
"wrong token", "device online", "replaces the older one"... A reconnect loop
would otherwise write a line per connection, for as long as it likes: a disk
filled from the network. ``LogLimiter`` lets ``max_lines`` lines of each kind
through per ``window`` seconds; the others are counted (``suppressed``, on
``/metrics``) and summed up in one line when that kind next logs after its
window. The kinds are a fixed handful of names, so the limiter's own state is
bounded too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Window:
    since: float
    lines: int = 0
    suppressed: int = 0


class LogLimiter:
    """Logs through ``logger``, at most ``max_lines`` lines of each kind per ``window`` s."""

    def __init__(
        self,
        logger: logging.Logger,
        max_lines: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_lines < 1:
            raise ValueError(f"max_lines must be >= 1, not {max_lines}")
        if not window > 0:
            raise ValueError(f"window must be > 0, not {window}")
        self.logger = logger
        self.max_lines = max_lines
        self.window = window
        self.suppressed = 0  # lines not logged, in total (a counter for /metrics)
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, kind: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` has had its lines this window; True if logged."""
        logger = self.logger
        if not logger.isEnabledFor(level):
            return False
        now = self._clock()
        w = self._windows.get(kind)
        if w is None or now - w.since >= self.window:
            if w is not None and w.suppressed:
                logger.log(
                    level,
                    "%d more %s log lines were left out in the %g s before (devices.max_log_lines)",
                    w.suppressed,
                    kind,
                    now - w.since,
                )
            w = self._windows[kind] = _Window(now)
        if w.lines >= self.max_lines:
            w.suppressed += 1
            self.suppressed += 1
            return False
        w.lines += 1
        logger.log(level, msg, *args)
        return True

    def info(self, kind: str, msg: str, *args: object) -> bool:
        """``log`` at INFO."""
        return self.log(kind, logging.INFO, msg, *args)

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        """``log`` at WARNING."""
        return self.log(kind, logging.WARNING, msg, *args)
