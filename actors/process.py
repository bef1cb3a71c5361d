"""What every actor answers about its own process: its id (a restarted actor has a new one), its
Ray node (placement checks) and its peak resident memory (``saferl bench memory``)."""
from __future__ import annotations

import os
import resource
import sys


class ActorProcess:
    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def max_rss(self) -> int:
        """Peak resident memory of this process, bytes."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def safeguard_failures() -> int:
    """Safeguard solves that failed and fell back in this process so far (``envs.safeguards``;
    0 where no safeguard was loaded: the module needs torch, which the Safety-Gymnasium
    interpreter lacks, so it is looked up, never imported, here)."""
    mod = sys.modules.get("saferl.envs.safeguards")
    return int(sum(mod.SOLVER_FAILURES.values())) if mod is not None else 0
