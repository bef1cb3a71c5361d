"""A short run of every on-policy algorithm on CGPO's FunctionEnv (reward = cost, 100-step
episodes, a random policy's episode cost ≈ 19) on the local Ray cluster: the unconstrained ones
raise the return; the constrained ones, given a limit of 4, bring the cost down."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from saferl.cluster.session import train
from saferl.config import load_config


# RCPO's multiplier is its slowest timescale (lr 0.01 in the shipped config): it needs λ > 1
# before the penalised reward (1 − λ) r turns against the cost, which takes longer than this run.
FASTER = {"rcpo": ["algo_params.lagrange.lr=0.05"]}


def curve(algo: str, run_root: str, limit: float) -> pd.Series:
    cfg = load_config(f"{algo}/FunctionEnv-v0", ["total_env_steps=16000", f"cost_limit={limit}",
                                                 f"run_root={run_root}", *FASTER.get(algo, [])])
    return pd.read_csv(train(cfg) / "metrics.csv")["episode/cost"].dropna()


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_unconstrained_algorithms_raise_the_return(ray_session, run_root, algo):
    cost = curve(algo, run_root, 1e6)  # reward = cost here
    assert cost.iloc[-2:].mean() > cost.iloc[:2].mean() + 2.0, cost.tolist()


@pytest.mark.parametrize("algo", ["cppo_pid", "rcpo", "cup", "cpo", "pcpo"])
def test_constrained_algorithms_bring_the_cost_down(ray_session, run_root, algo):
    cost = curve(algo, run_root, 4.0)
    assert cost.iloc[-2:].mean() < cost.iloc[:2].mean() - 3.0, cost.tolist()


# -- a shipped *_lag config over many iterations (the learner and the dual phase, no Ray) --------

def lag_run(limit: float, iterations: int, overrides: tuple[str, ...] = ()) -> list[dict]:
    """``configs/ppo_lag/FunctionEnv-v0.yaml`` (OmniSafe's Adam multiplier, 50-episode window) at
    ``cost_limit`` = limit: rollouts of its envs, an update, then the dual phase on the ended
    episodes, as the coordinator runs them. Per iteration: mean episode return and cost, λ."""
    import torch

    from saferl.actors.env_host import EnvHost
    from saferl.learners.base import EnvSpec

    cfg = load_config("ppo_lag/FunctionEnv-v0", [f"cost_limit={limit}", *overrides])
    host = EnvHost(cfg.task, cfg.resources.envs_per_host, cfg.seed)
    learner = cfg.algo_spec.load()(cfg.learner_params(), EnvSpec.of(host.spec()), cfg.limit, torch.device("cpu"),
                                   cfg.seed)
    out = []
    for _ in range(iterations):
        batch, summary = host.rollout(learner.numpy_policy(), cfg.steps_per_iteration // cfg.resources.envs_per_host)
        learner.update([batch])
        eps = summary["episodes"]
        lam = learner.phase("dual", {"episode_costs": [e["cost"] for e in eps]})["lagrange_multiplier"]
        out.append({"return": float(np.mean([e["return"] for e in eps])),
                    "cost": float(np.mean([e["cost"] for e in eps])), "lam": lam})
    return out


@pytest.mark.slow
def test_ppo_lag_raises_the_return_then_brings_the_cost_to_its_limit():
    """FunctionEnv's reward is its cost, so with a limit of 40 above a random policy's ≈ 19 the
    return can only rise until the constraint binds: PPO-Lag raises it past 40, λ (OmniSafe's Adam
    rule) grows while the 50-episode cost is above the limit, and over 90 iterations the cost is
    brought back and held around the limit instead of rising further."""
    run = lag_run(40.0, 90)
    ret, cost, lam = (np.array([r[k] for r in run]) for k in ("return", "cost", "lam"))
    assert ret[:3].mean() < 30 and ret.max() > 55, ret.round(1).tolist()  # the return improved
    assert lam[:3].max() < 0.01 and lam.max() > 0.3  # λ ≈ 0 below the limit, grown above it
    peak = int(cost.argmax())
    assert peak < 60 and abs(cost[-30:].mean() - 40.0) < 12.0, cost.round(1).tolist()  # back near the limit
    assert abs(cost[-30:].mean() - 40.0) < cost[peak] - 40.0  # closer to it than at the peak
    assert np.abs(np.diff(lam)).max() <= 2 * 0.035  # Adam: dual steps of about lr (not (J_C − b) · lr)


def test_ppo_lag_multiplier_moves_with_the_constraint_in_a_short_run():
    """The fast companion: 5 short iterations of the same config. With the limit below a random
    policy's cost (≈ 19) λ rises by about Adam's lr (0.035) every iteration; far above it λ goes to
    0 and stays there (clamped), and the return (= cost) rises."""
    short = ("steps_per_iteration=800", "resources.envs_per_host=8", "algo_params.epochs=3")
    above = lag_run(5.0, 5, short)
    lam = np.array([0.001] + [r["lam"] for r in above])
    assert np.all(np.diff(lam) > 0.02) and np.all(np.diff(lam) <= 2 * 0.035), lam
    free = lag_run(1e6, 5, short)
    assert all(r["lam"] == 0.0 for r in free)
