"""CGPO-ZoBG (CGPO paper, Fig 10): the score-function estimator of eq 69 on a window with a critic
bootstrap is unbiased against the first-order window gradient, the gradient workers use it when
``algo_params.gradient_estimator: zobg`` (also on the non-differentiable FunctionEnvFloor), and
the option's bad values are one-line config errors naming the field."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saferl.actors.gradient_worker import GradientWorker
from saferl.envs.function_env import FunctionEnv
from saferl.learners.analytic import TimeValue, window_gradients
from saferl.learners.base import EnvSpec
from saferl.learners.cgpo import CGPO
from saferl.learners.networks import GaussianPolicy


def test_zobg_window_gradients_are_unbiased_against_fobg_with_the_bootstrap():
    """A window inside the episode (t0 = 20, h = 3) with critic bootstraps: E[g_ZoBG] = E[g_FoBG]
    and E[q_ZoBG] = E[q_FoBG] (both estimate ∇ of the expected window objective) within their
    Monte-Carlo error. The check has power: ZoBG whose return leaves out the bootstrap, and a
    gradient of zero, are rejected by far."""
    torch.manual_seed(0)
    env = FunctionEnv(init_range=3.0)
    policy = GaussianPolicy(1, 1, [4], init_log_std=-1.0, squash=True, normalise_obs=False).double()
    critics = tuple(TimeValue(1, [4], 100).double() for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    h, n, chunks = 3, 5000, 40
    diff, no_boot, fobg = [], [], []
    for _ in range(chunks):  # independent chunks: a standard error per component
        start = env.initial_state(n, gen).double()
        noise = torch.randn(h, n, 1, generator=gen, dtype=torch.float64)
        *_, g_fo, q_fo = window_gradients(env, policy, start, 20, h, 100, noise, critics, 1.0, "fobg")
        *_, l_r, _l_c, g_zo, q_zo = window_gradients(env, policy, start, 20, h, 100, noise, critics, 1.0, "zobg")
        *_, g_nb, q_nb = window_gradients(env, policy, start, 20, h, 100, noise, None, 1.0, "zobg")
        assert not l_r.requires_grad  # ZoBG's rollout keeps no graph
        diff.append(np.r_[g_zo - g_fo, q_zo - q_fo])
        no_boot.append(np.r_[g_nb - g_fo, q_nb - q_fo])
        fobg.append(np.r_[g_fo, q_fo])
    diff, no_boot, fobg = np.array(diff), np.array(no_boot), np.array(fobg)
    se = diff.std(0, ddof=1) / np.sqrt(chunks)
    z = diff.mean(0) / se
    assert np.all(np.abs(z) < 4.0), z
    se_nb = no_boot.std(0, ddof=1) / np.sqrt(chunks)
    assert np.max(np.abs(no_boot.mean(0) / se_nb)) > 8.0
    assert np.max(np.abs(fobg.mean(0)) / se) > 8.0


def test_zobg_needs_noise():
    env = FunctionEnv()
    policy = GaussianPolicy(1, 1, [4], squash=True, normalise_obs=False)
    with pytest.raises(ValueError, match="stochastic"):
        window_gradients(env, policy, env.initial_state(4, torch.Generator().manual_seed(0)), 0, 2, 100, None,
                         estimator="zobg")


SPEC = EnvSpec(obs_dim=1, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=100)


def test_cgpo_zobg_trains_on_the_non_differentiable_task_through_its_workers():
    """The estimator reaches the workers through the learner's arch; three CGPO-ZoBG iterations on
    FunctionEnvFloor (propose, same-window re-roll, update) give finite steps and a ratio test.
    The same window under FoBG gives another g (back-propagation drops the floor term)."""
    p = CGPO.Params(hidden=[8], critic_hidden=[8], horizon=10, critic_iterations=1, gradient_estimator="zobg")
    learner = CGPO(p, SPEC, 8.0, torch.device("cpu"), 0)
    assert learner.arch["gradient_estimator"] == "zobg"
    ws = [GradientWorker("FunctionEnvFloor-v0", i * 8, 8, 16, 0, learner.arch, "cpu") for i in range(2)]
    assert all(w.estimator == "zobg" for w in ws)
    for it in range(3):
        weights = learner.policy_state()
        results = [w.compute(weights, it, learner.horizon)[0] for w in ws]
        trial = learner.propose(results)
        out = learner.update(results, evaluations=[w.evaluate(trial) for w in ws])
        assert np.isfinite(out["step_norm"]) and out["step_norm"] > 0
        assert np.isfinite(out["cgpo/reduction_ratio"]) and out["health/skipped_updates"] == 0
    fobg = GradientWorker("FunctionEnvFloor-v0", 0, 8, 16, 0, {**learner.arch, "gradient_estimator": "fobg"}, "cpu")
    zobg = GradientWorker("FunctionEnvFloor-v0", 0, 8, 16, 0, learner.arch, "cpu")
    weights = learner.policy_state()
    r_fo, r_zo = fobg.compute(weights, 0, 10)[0], zobg.compute(weights, 0, 10)[0]
    assert r_fo["l_r"] == r_zo["l_r"]  # the same window
    assert not np.allclose(r_fo["g"], r_zo["g"])
