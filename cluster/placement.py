"""Where a run's actors go: env hosts spread over the nodes (in the Safety-Gymnasium or custom
task's runtime environment); the learner with its gradient workers and world model packed in one
placement group."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from saferl.config import ConfigError, RunConfig


def sg_python(cfg: RunConfig) -> str:
    """The Safety-Gymnasium interpreter: config, $SAFERL_SG_PYTHON, or the .venv-sg that
    deploy/setup.sh puts beside the main .venv."""
    path = cfg.resources.sg_python or os.environ.get("SAFERL_SG_PYTHON") or str(
        Path(sys.prefix).parent / ".venv-sg" / "bin" / "python")
    if not Path(path).is_file():
        raise ConfigError(f"config error: resources.sg_python: Safety-Gymnasium interpreter {path} "
                          "does not exist (run deploy/setup.sh, or set SAFERL_SG_PYTHON)")
    return path


def _in_placement_group() -> bool:
    """This process runs in a placement group that captures its actors (a sweep trial)."""
    return ray.is_initialized() and ray.util.get_current_placement_group() is not None


def host_options(cfg: RunConfig) -> dict:
    # SPREAD: env hosts are the CPU-heavy part, so they go to as many nodes as there are; inside
    # a placement group (a `saferl sweep` trial's) they stay in it: its bundles hold them.
    opts: dict[str, Any] = {"num_cpus": cfg.resources.num_cpus_per_host}
    if not _in_placement_group():
        opts["scheduling_strategy"] = "SPREAD"
    if cfg.task_spec.kind == "safety_gymnasium":
        opts["runtime_env"] = {"py_executable": sg_python(cfg)}
    elif cfg.task_spec.kind == "custom":  # its package (py_modules) and spec travel to every host
        from saferl.envs.custom import runtime_env

        opts["runtime_env"] = runtime_env(cfg.task)
    return opts


def colocate(options: list[dict]) -> tuple[list[dict], PlacementGroup | None]:
    """Actor options that place the actors given by ``options`` (each ``num_cpus`` /
    ``num_gpus``, fractions allowed) in one placement group, one bundle each: STRICT_PACK (one
    node) when some alive node's totals hold them all, else PACK (as few nodes as possible).
    Returns the options with a ``scheduling_strategy`` added, and the group (None for one actor)."""
    if len(options) < 2 or _in_placement_group():
        return options, None  # (inside a sweep trial's placement group: its bundles place them)
    bundles = [{k: v for k, v in (("CPU", o.get("num_cpus", 1)), ("GPU", o.get("num_gpus", 0))) if v}
               for o in options]
    need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
    fits = any(all(node["Resources"].get(k, 0) >= v for k, v in need.items() if v)
               for node in ray.nodes() if node["Alive"])
    group = placement_group(bundles, strategy="STRICT_PACK" if fits else "PACK")
    return [{**o, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)}
            for i, o in enumerate(options)], group


