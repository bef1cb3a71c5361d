"""Evaluate a run's latest checkpoint: return, cost and violation rate over N episodes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from saferl.actors.env_host import EnvHost
from saferl.cluster import rundir
from saferl.cluster.coordinator import host_options
from saferl.cluster.session import connect
from saferl.config import ConfigError
from saferl.learners.base import EnvSpec


def numpy_policy_from_checkpoint(cfg, ckpt: dict, spec: dict) -> dict:
    """Rebuild the learner in this process from its checkpoint and export the policy weights."""
    import torch

    cls = cfg.algo_spec.load()
    learner = cls(cfg.learner_params(), EnvSpec.of(spec), cfg.limit, torch.device("cpu"), cfg.seed)
    learner.load_state_dict(ckpt["learner"])
    return learner.numpy_policy()


def evaluate(run_dir: Path, episodes: int, deterministic: bool = True, num_hosts: int = 1) -> dict:
    cfg = rundir.load_run_config(run_dir)
    ckpt = rundir.load_checkpoint(run_dir, cfg)
    if ckpt is None:
        raise ConfigError(f"run error: {run_dir} has no checkpoint to evaluate")
    started = connect(cfg)
    try:
        host_cls = ray.remote(EnvHost).options(**host_options(cfg))
        envs = min(episodes, cfg.resources.envs_per_host)
        hosts = [host_cls.remote(cfg.task, envs, cfg.seed + 10_000, i) for i in range(num_hosts)]
        policy = numpy_policy_from_checkpoint(cfg, ckpt, ray.get(hosts[0].spec.remote()))
        split = [episodes // num_hosts + (i < episodes % num_hosts) for i in range(num_hosts)]
        eps = [e for part in ray.get([h.evaluate.remote(policy, k, deterministic)
                                      for h, k in zip(hosts, split) if k]) for e in part]
        for h in hosts:
            ray.kill(h)
    finally:
        if started:
            ray.shutdown()
    ret, cost = np.array([e["return"] for e in eps]), np.array([e["cost"] for e in eps])
    return {"run_dir": str(run_dir), "iteration": ckpt["schedule"]["iteration"], "episodes": len(eps),
            "return_mean": float(ret.mean()), "return_std": float(ret.std()),
            "cost_mean": float(cost.mean()), "cost_std": float(cost.std()), "cost_limit": cfg.limit,
            "violation_rate": float(np.mean(cost > cfg.limit)), "returns": ret.tolist(), "costs": cost.tolist()}
