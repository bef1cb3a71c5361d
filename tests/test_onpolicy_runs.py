"""A short run of every on-policy algorithm on CGPO's FunctionEnv (reward = cost, 100-step
episodes, a random policy's episode cost ≈ 19) on the local Ray cluster: the unconstrained ones
raise the return; the constrained ones, given a limit of 4, bring the cost down."""
from __future__ import annotations

import pandas as pd
import pytest

from saferl.cluster.session import train
from saferl.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


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
