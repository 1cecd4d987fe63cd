"""N gateway nodes acting as one through Redis (docs/cluster.md).

``RedisEngine`` fills the hub's ``Engine`` seam (gateway/hub/engine.py) with a
Redis server shared by every node; ``ClusterConfig`` is the ``[cluster]``
section of the configuration. Nothing here knows about HTTP.
"""

from .config import ClusterConfig
from .engine import RedisEngine

__all__ = ["ClusterConfig", "RedisEngine"]
