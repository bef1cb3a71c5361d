"""What every actor answers about its own process: its id (a restarted actor has a new one), its
Ray node (placement checks) and its peak resident memory (``saferl bench memory``)."""
from __future__ import annotations

import os
import resource


class ActorProcess:
    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def max_rss(self) -> int:
        """Peak resident memory of this process, bytes."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
