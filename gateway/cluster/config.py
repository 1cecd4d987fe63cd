"""The ``[cluster]`` section: which Redis, which node, and the cluster's timings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One node's view of the cluster (docs/configuration.md ``[cluster]``).

    ``url`` None: a single node, nothing else changes.
    """

    url: str | None = None  # redis://HOST:PORT/DB or rediss://...
    node_id: str | None = None
    prefix: str = "iotgw"
    # AUTH; env IOT_GATEWAY_CLUSTER_PASSWORD, or the config file: never only argv.
    password: str | None = None
    # A node whose lease is this old is lost: its devices go offline (node_lost).
    node_lost_after: float = 10.0
    # Telemetry entries kept in Redis (the log is trimmed to about this many).
    stream_maxlen: int = 200_000
    # Telemetry held while Redis is unreachable, sequenced when it is back.
    spool: int = 100_000
    # Longest blocking read of the log (s); the socket timeout is longer.
    block: float = 1.0

    def check(self) -> str | None:
        """What is wrong with the section, in one line, or None."""
        if self.url is None:
            if self.node_id is not None:
                return "cluster.node_id needs cluster.url (--cluster)"
            return None
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss"):
            return f"cluster.url must be redis://HOST:PORT/DB or rediss://..., not {self.url!r}"
        if not parts.hostname:
            return f"cluster.url has no host: {self.url!r}"
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return f"cluster.url has a bad port: {self.url!r}"
        if parts.password:
            # argv and logs are readable by every local user (ps): the password goes elsewhere.
            return (
                "cluster.url must not hold the password: set cluster.password in the config "
                "file or IOT_GATEWAY_CLUSTER_PASSWORD"
            )
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            return f"cluster.url: the database must be a number, not {db!r}"
        if self.node_id is None:
            return "cluster.node_id (--node-id) is required with cluster.url"
        if not _NAME.match(self.node_id):
            return (
                f"cluster.node_id must be 1 to 64 characters of A-Za-z0-9._-, not {self.node_id!r}"
            )
        if self.node_id == "local":
            return "cluster.node_id must not be 'local' (the single node's name)"
        if not _NAME.match(self.prefix):
            return f"cluster.prefix must be 1 to 64 characters of A-Za-z0-9._-, not {self.prefix!r}"
        if not self.node_lost_after > 0:
            return f"cluster.node_lost_after must be > 0, not {self.node_lost_after}"
        if self.stream_maxlen < 1000:
            return f"cluster.stream_maxlen must be >= 1000, not {self.stream_maxlen}"
        if self.spool < 0:
            return f"cluster.spool must be >= 0, not {self.spool}"
        if not 0 < self.block <= 10:
            return f"cluster.block must be > 0 and <= 10, not {self.block}"
        return None
