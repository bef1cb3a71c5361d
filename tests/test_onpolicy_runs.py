"""A short run of every on-policy algorithm on CGPO's FunctionEnv (reward = cost, 100-step
episodes, a random policy's episode cost ≈ 19): the unconstrained ones raise the return; the
constrained ones, given a limit of 4, bring the cost down. The runs step the learner and an env
host in this process, as the coordinator does (rollout, update, then the dual phase on the ended
episodes), so they test the algorithms, not Ray's start-up; the Ray path is tested elsewhere."""
from __future__ import annotations

import numpy as np
import pytest

from tests.inprocess import column, run_in_process

# RCPO's multiplier is its slowest timescale (lr 0.01 in the shipped config): it needs λ > 1
# before the penalised reward (1 − λ) r turns against the cost, which takes longer than this run.
FASTER = {"rcpo": ["algo_params.lagrange.lr=0.05"]}


def curve(algo: str, limit: float) -> np.ndarray:
    """The episode cost per iteration over 16,000 env steps (8 iterations of the shipped 2,000)."""
    return column(run_in_process(f"{algo}/FunctionEnv-v0", limit, 8, FASTER.get(algo, [])), "cost")


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_unconstrained_algorithms_raise_the_return(algo):
    cost = curve(algo, 1e6)  # reward = cost here
    assert cost[-2:].mean() > cost[:2].mean() + 2.0, cost.round(2).tolist()


@pytest.mark.parametrize("algo", ["cppo_pid", "rcpo", "cup", "cpo", "pcpo"])
def test_constrained_algorithms_bring_the_cost_down(algo):
    cost = curve(algo, 4.0)
    assert cost[-2:].mean() < cost[:2].mean() - 3.0, cost.round(2).tolist()


# -- a shipped *_lag config over many iterations (the learner and the dual phase, no Ray) --------

def lag_run(limit: float, iterations: int, overrides: tuple[str, ...] = ()) -> list[dict]:
    """``configs/ppo_lag/FunctionEnv-v0.yaml`` (OmniSafe's Adam multiplier, 50-episode window)."""
    return run_in_process("ppo_lag/FunctionEnv-v0", limit, iterations, overrides)


@pytest.mark.slow
def test_ppo_lag_raises_the_return_then_brings_the_cost_to_its_limit():
    """FunctionEnv's reward is its cost, so with a limit of 40 above a random policy's ≈ 19 the
    return can only rise until the constraint binds: PPO-Lag raises it past 40, λ (OmniSafe's Adam
    rule) grows while the 50-episode cost is above the limit and brings the cost back under it.
    λ lags the cost (the window, Adam's momentum), so the cost then oscillates around the limit
    (a period of about 50 iterations here) rather than settling; over the last 60 of 90
    iterations its mean is near the limit, nearer than the peak."""
    run = lag_run(40.0, 90)
    ret, cost, lam = (np.array([r[k] for r in run]) for k in ("return", "cost", "lam"))
    assert ret[:3].mean() < 30 and ret.max() > 55, ret.round(1).tolist()  # the return improved
    assert lam[:3].max() < 0.01 and lam.max() > 0.3  # λ ≈ 0 below the limit, grown above it
    above = int(np.argmax(cost > 60.0))  # first well above the limit
    assert cost[above] > 60.0 and (cost[above:above + 30] < 40.0).any(), cost.round(1).tolist()  # brought back
    late = cost[-60:].mean()
    assert abs(late - 40.0) < 12.0 and abs(late - 40.0) < cost.max() - 40.0, cost.round(1).tolist()
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
