"""Short-horizon analytic gradients: TD(λ) targets against eq 67 written out, windows that
tile an episode, and SHAC-Lag on FunctionEnv through the coordinator."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from saferl.actors.gradient_worker import GradientWorker
from saferl.cluster.session import train
from saferl.config import load_config
from saferl.learners.analytic import TimeValue, td_lambda_targets
from saferl.learners.networks import GaussianPolicy

POLICY = dict(obs_dim=1, act_dim=1, hidden=[8], init_log_std=-1.0, squash=True, normalise_obs=True)


def test_td_lambda_targets_match_eq_67():
    torch.manual_seed(0)
    h, n, d, T, lam, t0 = 6, 3, 2, 10, 0.8, 4
    critic = TimeValue(d, [16], T)
    obs, rew = torch.randn(h + 1, n, d), torch.randn(h, n)
    got = td_lambda_targets(critic, obs, rew, t0, T, lam)
    with torch.no_grad():
        V = lambda j: critic(obs[j], t0 + j) * (t0 + j < T)  # noqa: E731  V(s, T) = 0
        for j in range(h):
            G = lambda k: rew[j:j + k].sum(0) + V(j + k)  # noqa: E731  G_{t:t+n} (eq 66)
            expect = (1 - lam) * sum(lam ** (k - 1) * G(k) for k in range(1, h - j)) + lam ** (h - j - 1) * G(h - j)
            torch.testing.assert_close(got[j], expect)


def test_windows_tile_an_episode():
    """Deterministic actions: ten windows of h = 10 report the episode one h = T call does."""
    torch.manual_seed(0)
    pol = GaussianPolicy(**POLICY)
    weights = {"policy": pol.state_dict()}
    whole = GradientWorker("FunctionEnv-v0", 0, 4, 4, 1, {"policy": POLICY}, "cpu")
    _, full = whole.compute(weights, 0, 100, stochastic=False)
    tiled = GradientWorker("FunctionEnv-v0", 0, 4, 4, 1, {"policy": POLICY}, "cpu")
    parts = [tiled.compute(weights, i, 10, stochastic=False) for i in range(10)]
    assert all(not s["episodes"] for _, s in parts[:-1])
    np.testing.assert_allclose([e["cost"] for e in parts[-1][1]["episodes"]],
                               [e["cost"] for e in full["episodes"]], rtol=1e-5)
    # the J_C estimate of a window = realised prefix + window (+ tail): the last one is exact
    assert parts[-1][0]["j_c"] == pytest.approx(np.mean([e["cost"] for e in full["episodes"]]), rel=1e-5)


def test_shac_lag_reaches_the_constraint(ray_session, run_root):
    cfg = load_config("shac_lag/FunctionEnv-v0", ["total_env_steps=76800", "schedule.log_every=10",
                                                   f"run_root={run_root}"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    assert m["episode/cost"].iloc[0] > 8.0
    assert (m["episode/cost"].iloc[-3:] <= 8.0).all(), m["episode/cost"].tolist()
    assert m["lagrange_multiplier"].iloc[0] > 0 and m["critic_loss"].iloc[-1] < m["critic_loss"].iloc[0]
