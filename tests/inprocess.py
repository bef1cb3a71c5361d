"""Short sampling runs without Ray: an env host and a learner in the test process, stepped as the
coordinator steps them (rollout, update, then the dual phase on the ended episodes; with
``schedule.dual_before_update`` the dual phase before the update). Convergence
tests of the algorithms use it so that they measure the algorithm, not actor start-up; the Ray
path itself is tested in test_training.py, test_faults.py and the study tests."""
from __future__ import annotations

import numpy as np

from saferl.config import load_config


def run_in_process(config: str, limit: float, iterations: int, overrides=()) -> list[dict]:
    """``configs/<config>.yaml`` at ``cost_limit`` = limit for ``iterations`` updates. The config's
    phases must be at most a dual phase once per iteration (as the FunctionEnv configs schedule
    it). Per iteration: the update's statistics, the mean episode ``return`` and ``cost`` and
    ``lam`` (λ after the dual phase; None without one)."""
    import torch

    from saferl.actors.env_host import EnvHost
    from saferl.learners.base import EnvSpec

    cfg = load_config(config, [f"cost_limit={limit}", *overrides])
    assert set(cfg.schedule.phases) <= {"dual"} and all(k == 1 for k in cfg.schedule.phases.values())
    host = EnvHost(cfg.task, cfg.resources.envs_per_host, cfg.seed)
    learner = cfg.algo_spec.load()(cfg.learner_params(), EnvSpec.of(host.spec()), cfg.limit, torch.device("cpu"),
                                   cfg.seed)
    rows = []
    for _ in range(iterations):
        batch, summary = host.rollout(learner.numpy_policy(), cfg.steps_per_iteration // cfg.resources.envs_per_host)
        eps, lam = summary["episodes"], None
        costs = [float(e["cost"]) for e in eps]  # the coordinator's signals for a dual phase
        signals = {"episode_cost": float(np.mean(costs)) if costs else None, "episode_costs": costs}
        dual, before = "dual" in cfg.schedule.phases, cfg.schedule.dual_before_update
        if dual and before:
            lam = learner.phase("dual", signals).get("lagrange_multiplier")
        stats = learner.update([batch])
        if dual and not before:
            lam = learner.phase("dual", signals).get("lagrange_multiplier")
        rows.append({**stats, "return": float(np.mean([e["return"] for e in eps])),
                     "cost": float(np.mean([e["cost"] for e in eps])), "lam": lam})
    return rows


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=float)
