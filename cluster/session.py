"""Starting or joining Ray, and the top-level train / resume entry points."""
from __future__ import annotations

import os
from pathlib import Path

import ray

from saferl.cluster import rundir
from saferl.config import ConfigError, RunConfig


def required_cpus(cfg: RunConfig) -> float:
    r = cfg.resources
    world_model = r.num_cpus_per_host if cfg.algo_spec.world_model else 0
    return r.num_env_hosts * r.num_cpus_per_host + world_model + 1  # + the learner


def connect(cfg: RunConfig | None = None, address: str | None = None) -> bool:
    """Join the cluster at ``address`` / $RAY_ADDRESS (a submitted job), or start an embedded
    local one sized for ``cfg`` (logical CPUs may exceed the cores: Ray time-shares them).
    Returns True when this call started Ray (and so should stop it)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="warning")
        return True
    need = required_cpus(cfg) if cfg is not None else 1
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), logging_level="warning")
    return True


def train(cfg: RunConfig, run_dir: Path | None = None, console=None, stop_after: int | None = None,
          on_log=None) -> Path:
    """Run (or, with ``run_dir``, resume) a training job; returns the run directory.
    ``on_log(row)`` sees every logged metrics row after the run's sinks (``saferl sweep``
    reports them to Ray Tune)."""
    from saferl.cluster.coordinator import Coordinator  # imports torch; keep `saferl list` fast

    resume = None
    pretrain = cfg.algo_spec.load_pretrain()
    if run_dir is None:
        run_dir = rundir.new_run_dir(cfg)
    else:
        resume = rundir.load_checkpoint(run_dir, cfg)
        if resume is None and pretrain is None:  # with a pretrain stage, resuming may be inside it
            raise ConfigError(f"run error: {run_dir} has no checkpoint to resume from")
    started = connect(cfg)
    try:
        if pretrain is not None:
            cfg = pretrain(cfg, run_dir, console)
        coord = Coordinator(cfg, run_dir, console=console, resume=resume)
        if on_log is not None:
            log = coord.logger.log

            def log_and_report(step: int, row: dict) -> None:
                log(step, row)
                on_log(row)

            coord.logger.log = log_and_report
        try:
            coord.run(stop_after=stop_after)
        finally:
            coord.close()
    finally:
        if started:
            ray.shutdown()
    return Path(run_dir)
