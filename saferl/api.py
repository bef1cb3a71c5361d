"""The Python API: train, look at the metrics, load the policy, act and evaluate.

    import saferl
    run = saferl.train("ppo_lag/FunctionEnv-v0", total_env_steps=20_000, seed=1,
                       algo_params={"lr": 3e-4}, eval_episodes=10)
    run.run_dir          # runs/ppo_lag-FunctionEnv-v0-s1-<time>/
    run.metrics          # pandas DataFrame, one row per logged iteration (metrics.csv)
    run.evaluation       # {"return_mean", "cost_mean", "violation_rate", ...} of the final checkpoint
    policy = saferl.load(run.run_dir)
    action = policy.act(obs)                 # numpy in, numpy out (in the task's action box)
    policy.evaluate(episodes=20)             # the same numbers `saferl eval RUN_DIR` prints

``saferl train`` and ``saferl eval`` are thin layers over :func:`train_config` and
:func:`evaluate_run`. Everything heavy (torch, Ray, pandas) is imported inside the functions:
``import saferl`` stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saferl.config import ConfigError, RunConfig, _merge, load_config


def _nest(key: str, value: Any) -> dict:
    """``"algo_params.lr"`` or ``"algo_params__lr"`` -> ``{"algo_params": {"lr": value}}``."""
    parts = key.replace("__", ".").split(".")
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


def make_config(config: str | Path | dict | RunConfig, overrides: list[str] | None = None,
                **fields: Any) -> RunConfig:
    """A validated config from a short name (``ppo_lag/FunctionEnv-v0``), a YAML path, a dict or a
    ``RunConfig``, then ``overrides`` (``["seed=1", "algo_params.lr=1e-3"]``, as ``--set``), then
    ``fields`` (``seed=1``, ``algo_params={"lr": 1e-3}`` merged into the section,
    ``resources__num_env_hosts=2``). Errors are ``ConfigError`` with one line naming the field."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if isinstance(config, RunConfig) and overrides:
        cfg = load_config(cfg.model_dump(mode="json"), overrides)
    if not fields:
        return cfg
    data = cfg.model_dump(mode="json")
    for key, value in fields.items():
        data = _merge(data, _nest(key, value))
    return load_config(data)


@dataclass
class Run:
    """A run directory: its config, metrics and (if any) the final evaluation."""
    run_dir: Path
    evaluation: dict | None = None
    _config: RunConfig | None = field(default=None, repr=False)

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        """An existing run directory (its ``eval.json``, if ``saferl eval --save`` wrote one)."""
        import json

        from saferl.tools.evaluate import EVAL_FILE

        run_dir = Path(run_dir)
        path = run_dir / EVAL_FILE
        return cls(run_dir, json.loads(path.read_text()) if path.is_file() else None)

    @property
    def config(self) -> RunConfig:
        if self._config is None:
            from saferl.cluster import rundir

            self._config = rundir.load_run_config(self.run_dir)
        return self._config

    @property
    def metrics(self):
        """``metrics.csv`` as a pandas DataFrame (empty before the first logged iteration)."""
        import pandas as pd

        path = self.run_dir / "metrics.csv"
        return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()

    def policy(self) -> Policy:
        return load(self.run_dir)

    def evaluate(self, episodes: int = 10, deterministic: bool = True) -> dict:
        return self.policy().evaluate(episodes, deterministic)

    def __fspath__(self) -> str:
        return str(self.run_dir)


def train_config(cfg: RunConfig, run_dir: str | Path | None = None, console=None, stop_after: int | None = None,
                 eval_episodes: int = 0) -> Run:
    """Train (or, with ``run_dir``, resume) a validated config on the embedded local Ray cluster
    (or ``$RAY_ADDRESS``); with ``eval_episodes`` > 0 evaluate the final checkpoint as
    ``saferl eval`` does and save it to ``RUN_DIR/eval.json``."""
    import ray

    from saferl.cluster.session import connect
    from saferl.cluster.session import train as session_train

    started = connect(cfg)  # one Ray session for training and the evaluation after it
    try:
        out = session_train(cfg, run_dir=Path(run_dir) if run_dir is not None else None,
                            console=console, stop_after=stop_after)
        evaluation = None
        if eval_episodes > 0:
            from saferl.tools.evaluate import save_result

            evaluation = evaluate_run(out, eval_episodes)
            save_result(out, evaluation, True)
    finally:
        if started:
            ray.shutdown()
    return Run(Path(out), evaluation, cfg)


def train(config: str | Path | dict | RunConfig, total_env_steps: int | None = None, *,
          overrides: list[str] | None = None, eval_episodes: int = 10, stop_after: int | None = None,
          verbose: bool = False, **fields: Any) -> Run:
    """Train ``config`` (a short name such as ``"ppo_lag/SafetyPointGoal1-v0"``, a YAML path, a
    dict or a ``RunConfig``) with the given budget and field overrides (see :func:`make_config`);
    returns the :class:`Run` with its directory, metrics and final evaluation (``eval_episodes``
    deterministic episodes; 0 skips it). ``verbose`` prints the progress lines of ``saferl train``."""
    if total_env_steps is not None:
        fields["total_env_steps"] = total_env_steps
    cfg = make_config(config, overrides, **fields)
    console = None
    if verbose:
        from rich.console import Console

        console = Console(highlight=False, soft_wrap=True)
    return train_config(cfg, console=console, stop_after=stop_after, eval_episodes=eval_episodes)


def evaluate_run(run_dir: str | Path, episodes: int = 10, deterministic: bool = True) -> dict:
    """``saferl eval RUN_DIR``: return, cost and violation rate of the latest checkpoint over
    ``episodes`` episodes, on an env host of the run's task (in the Safety-Gymnasium interpreter
    for its tasks)."""
    from saferl.tools.evaluate import evaluate

    return evaluate(Path(run_dir), episodes, deterministic=deterministic)


class Policy:
    """A run's latest policy, acting in this process: ``act(obs)`` takes observations
    [obs_dim] or [n, obs_dim] and returns actions in the task's box ([act_dim] or [n, act_dim]),
    with the same numpy inference the env hosts run."""

    def __init__(self, run_dir: Path, cfg: RunConfig, state: dict, spec: dict, iteration: int):
        self.run_dir, self.config, self.state, self.iteration = run_dir, cfg, state, iteration
        self.obs_dim, self.act_dim = int(spec["obs_dim"]), int(spec["act_dim"])
        self.action_low = np.broadcast_to(np.asarray(spec["act_low"], np.float32), (self.act_dim,))
        self.action_high = np.broadcast_to(np.asarray(spec["act_high"], np.float32), (self.act_dim,))
        self._rng = np.random.default_rng(cfg.seed)

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        from saferl.actors import np_policy

        x = np.asarray(obs, np.float32)
        single = x.ndim == 1
        if x.shape[-1] != self.obs_dim or x.ndim not in (1, 2):
            raise ValueError(f"observation shape {x.shape}: expected [{self.obs_dim}] or [n, {self.obs_dim}]")
        a, _, _ = np_policy.act(self.state, x[None] if single else x, self._rng, deterministic)
        a = np_policy.to_box(self.state, a, self.action_low, self.action_high).astype(np.float32)
        return a[0] if single else a

    __call__ = act

    def evaluate(self, episodes: int = 10, deterministic: bool = True) -> dict:
        """Return, cost and violation rate over ``episodes`` episodes: the env host ``saferl eval``
        uses (same seed, same envs), here in this process; Safety-Gymnasium tasks, whose envs
        live in their own interpreter, go through ``saferl eval``'s Ray path."""
        if episodes < 1:
            raise ConfigError("usage error: episodes must be at least 1")
        if self.config.task_spec.kind == "safety_gymnasium":
            return evaluate_run(self.run_dir, episodes, deterministic)
        from saferl.actors.env_host import EnvHost
        from saferl.tools.evaluate import _summary

        cfg = self.config
        host = EnvHost(cfg.task, min(episodes, cfg.resources.envs_per_host), cfg.seed + 10_000, 0)
        try:
            eps = host.evaluate(self.state, episodes, deterministic)
        finally:
            host.close()
        return _summary(self.run_dir, cfg, {"schedule": {"iteration": self.iteration}}, eps)

    def __repr__(self) -> str:
        return (f"Policy({self.config.algo} on {self.config.task}, iteration {self.iteration}, "
                f"obs_dim={self.obs_dim}, act_dim={self.act_dim})")


def _env_spec(cfg: RunConfig) -> dict:
    """The task's spaces: built here, or on a Ray env host for Safety-Gymnasium tasks."""
    from saferl.actors.env_host import EnvHost

    if cfg.task_spec.kind != "safety_gymnasium":
        host = EnvHost(cfg.task, 1, cfg.seed, 0)
        try:
            return host.spec()
        finally:
            host.close()
    import ray

    from saferl.cluster.placement import host_options
    from saferl.cluster.session import connect

    started = connect(cfg)
    try:
        host = ray.remote(EnvHost).options(**host_options(cfg)).remote(cfg.task, 1, cfg.seed, 0)
        try:
            return ray.get(host.spec.remote())
        finally:
            ray.kill(host)
    finally:
        if started:
            ray.shutdown()


def load(run_dir: str | Path | Run) -> Policy:
    """The latest checkpoint's policy of a run directory (see :class:`Policy`)."""
    from saferl.cluster import rundir
    from saferl.tools.evaluate import numpy_policy_from_checkpoint

    run_dir = Path(run_dir.run_dir if isinstance(run_dir, Run) else run_dir)
    cfg = rundir.load_run_config(run_dir)
    ckpt = rundir.load_checkpoint(run_dir, cfg)
    if ckpt is None:
        raise ConfigError(f"run error: {run_dir} has no checkpoint to load")
    spec = _env_spec(cfg)
    return Policy(run_dir, cfg, numpy_policy_from_checkpoint(cfg, ckpt, spec), spec, ckpt["schedule"]["iteration"])
