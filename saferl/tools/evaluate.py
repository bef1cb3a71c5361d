"""Evaluate a run's latest checkpoint: return, cost and violation rate over N episodes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import ray

from saferl.actors.env_host import EnvHost
from saferl.cluster import rundir
from saferl.cluster.placement import host_options
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


def evaluate(run_dir: Path, episodes: int, deterministic: bool = True, num_hosts: int = 1,
             attack_rate: float = 0.0) -> dict:
    """Return, cost and violation rate over ``episodes`` episodes; with ``attack_rate`` α each
    action is replaced, with probability α, by a uniformly random one (``EnvHost.evaluate``)."""
    return evaluate_attack_rates(run_dir, episodes, [attack_rate], deterministic, num_hosts)[0]


def evaluate_attack_rates(run_dir: Path, episodes: int, attack_rates: list[float], deterministic: bool = True,
                          num_hosts: int = 1) -> list[dict]:
    """``evaluate`` at each attack rate, with one set of env hosts (Ray is started here only if
    it is not up). Before every rate the hosts are re-seeded as if new, so each rate sees the same
    initial states and a rate's numbers do not depend on the others."""
    cfg = rundir.load_run_config(run_dir)
    ckpt = rundir.load_checkpoint(run_dir, cfg)
    if ckpt is None:
        raise ConfigError(f"run error: {run_dir} has no checkpoint to evaluate")
    for rate in attack_rates:
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"usage error: attack rate {rate:g} is not in [0, 1]")
    seed = cfg.seed + 10_000
    started = connect(cfg)
    try:
        host_cls = ray.remote(EnvHost).options(**host_options(cfg))
        envs = min(episodes, cfg.resources.envs_per_host)
        hosts = [host_cls.remote(cfg.task, envs, seed, i) for i in range(num_hosts)]
        try:
            spec = ray.get(hosts[0].spec.remote())
            if any(attack_rates) and not (np.isfinite(spec["act_low"]).all() and np.isfinite(spec["act_high"]).all()):
                raise ConfigError(f"run error: {cfg.task} has an unbounded action box: no uniform random actions")
            policy = numpy_policy_from_checkpoint(cfg, ckpt, spec)
            split = [episodes // num_hosts + (i < episodes % num_hosts) for i in range(num_hosts)]
            results = []
            for n, rate in enumerate(attack_rates):
                if n:
                    ray.get([h.reset.remote(seed) for h in hosts])
                eps = [e for part in ray.get([h.evaluate.remote(policy, k, deterministic, rate)
                                              for h, k in zip(hosts, split) if k]) for e in part]
                results.append(_summary(run_dir, cfg, ckpt, eps))
        finally:
            for h in hosts:
                ray.kill(h)
    finally:
        if started:
            ray.shutdown()
    return results


def _summary(run_dir: Path, cfg, ckpt: dict, eps: list[dict]) -> dict:
    ret, cost = np.array([e["return"] for e in eps]), np.array([e["cost"] for e in eps])
    return {"run_dir": str(run_dir), "iteration": ckpt["schedule"]["iteration"], "episodes": len(eps),
            "return_mean": float(ret.mean()), "return_std": float(ret.std()),
            "cost_mean": float(cost.mean()), "cost_std": float(cost.std()), "cost_limit": cfg.limit,
            "violation_rate": float(np.mean(cost > cfg.limit)), "returns": ret.tolist(), "costs": cost.tolist()}


def render_videos(run_dir: Path, episodes: int = 1, fmt: str = "gif", deterministic: bool = True,
                  max_frames: int | None = None, fps: int = 20) -> list[Path]:
    """Render ``episodes`` evaluation episodes of the latest checkpoint to
    ``RUN_DIR/videos/eval_ep{k}.{gif|mp4}``; returns the paths. The frames come from one env host
    made with ``render_mode="rgb_array"`` (for Safety-Gymnasium tasks: in its interpreter), are
    captioned and encoded here (``saferl.envs.render``): T + 1 frames per episode, at most
    ``max_frames``."""
    from saferl.envs import render

    run_dir = Path(run_dir)
    cfg = rundir.load_run_config(run_dir)
    if fmt not in ("gif", "mp4"):
        raise ConfigError(f"usage error: video format {fmt!r} is not gif or mp4")
    if fmt == "mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ConfigError("usage error: --format mp4 needs imageio-ffmpeg (deploy/setup.sh installs it); "
                          "--format gif needs only Pillow")
    if episodes < 1 or (max_frames is not None and max_frames < 1):
        raise ConfigError("usage error: --episodes and --max-frames must be at least 1")
    ckpt = rundir.load_checkpoint(run_dir, cfg)
    if ckpt is None:
        raise ConfigError(f"run error: {run_dir} has no checkpoint to render")
    started = connect(cfg)
    try:
        host = ray.remote(EnvHost).options(**host_options(cfg)).remote(
            cfg.task, 1, cfg.seed + 10_000, 0, render_mode="rgb_array")
        try:
            policy = numpy_policy_from_checkpoint(cfg, ckpt, ray.get(host.spec.remote()))
            out, paths = run_dir / "videos", []
            out.mkdir(exist_ok=True)
            for k in range(episodes):
                ep = ray.get(host.episode_frames.remote(policy, deterministic, max_frames))
                frames = render.caption_frames(ep["frames"], ep["reward"], ep["cost"])
                paths.append(render.encode(out / f"eval_ep{k}.{fmt}", frames, fps))
        finally:
            ray.kill(host)
    finally:
        if started:
            ray.shutdown()
    return paths


EVAL_FILE = "eval.json"  # `saferl eval RUN_DIR --save`; `saferl report` shows it


def save_result(run_dir: Path, result: dict, deterministic: bool) -> Path:
    """Write an ``evaluate`` result (per-episode returns and costs included) to RUN_DIR/eval.json."""
    import json
    import os
    import time

    path = Path(run_dir) / EVAL_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**result, "deterministic": deterministic,
                               "written": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    os.replace(tmp, path)
    return path
