"""The batched inference server (``resources.inference: server``): its torch forward is numpy's,
a rollout it drives is the rollout the hosts drive themselves, and a run trains through it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from saferl.actors import inference, np_policy
from saferl.actors.env_host import EnvHost
from saferl.cluster.session import train
from saferl.config import ConfigError, load_config
from saferl.learners.networks import (
    CholeskyTanhGaussianPolicy,
    DeterministicTanhPolicy,
    GaussianPolicy,
    TanhGaussianPolicy,
)


def policies() -> dict:
    torch.manual_seed(0)
    gauss = GaussianPolicy(5, 2, [16, 16])
    gauss.norm.update(torch.randn(100, 5) * 3 + 1)  # a real normaliser, clipped at ±10
    return {"gaussian": gauss, "sac": TanhGaussianPolicy(5, 2, [16, 16]),
            "cvpo": CholeskyTanhGaussianPolicy(5, 2, [16, 16]), "td3": DeterministicTanhPolicy(5, 2, [16, 16])}


@pytest.mark.parametrize("kind", ["gaussian", "sac", "cvpo", "td3"])
def test_server_forward_and_actions_match_numpy(kind):
    state = policies()[kind].export_numpy()
    server = inference.InferenceServer(-np.ones(2), np.ones(2), device="cpu")
    server.set_policy(state, seed=0)
    obs = np.random.default_rng(1).normal(0, 20, (7, 5)).astype(np.float32)  # some beyond the clip
    np.testing.assert_allclose(server.forward(state, obs), np_policy.mean_action(state, obs), rtol=1e-5, atol=1e-5)
    # two hosts' observations in one batch; the sampling is np_policy's with the same stream
    a, b = server.act(obs[:3], obs[3:])
    ref = np_policy.act(state, obs, np.random.default_rng(0))
    got = [np.concatenate(x) for x in zip(a, b)]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_config_refuses_gpus_without_a_server_and_servers_without_rollouts():
    with pytest.raises(ConfigError, match=r"resources.inference_gpus"):
        load_config("ppo_lag/FunctionEnv-v0", ["resources.inference_gpus=0.5"])
    with pytest.raises(ConfigError, match=r"resources.inference"):
        load_config("bptt_lag/FunctionEnv-v0", ["resources.inference=server"])


def test_served_rollout_is_the_hosts_own_rollout(ray_session):
    """With σ ≈ 0 the sampled actions are the means, so the server-driven fragments (two hosts
    batched together) must step the envs exactly as the hosts' own inference does."""
    pol = GaussianPolicy(2, 1, [8])  # FunctionEnv-v0: obs (x, t), one action
    with torch.no_grad():
        pol.log_std.fill_(-30.0)
    state = pol.export_numpy()
    Host = ray.remote(EnvHost)
    own = [Host.remote("FunctionEnv-v0", 3, 7, i) for i in range(2)]
    served = [Host.remote("FunctionEnv-v0", 3, 7, i) for i in range(2)]
    server = ray.remote(inference.InferenceServer).remote(-np.ones(1), np.ones(1), "cpu")
    for _ in range(2):  # two fragments: the second starts where the first left the envs
        want = ray.get([h.rollout.remote(state, 150) for h in own])
        got = ray.get([ref for ref, _ in inference.rollout(served, server, state, 150, seed=3)])
        for (w, _), g in zip(want, got):
            for key in ("obs", "act", "reward", "cost", "terminated", "truncated", "last_obs", "final_idx"):
                np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-5, err_msg=key)
        assert len(got[0]["final_idx"]) >= 3  # T = 100: resets inside every fragment


def test_training_through_the_server(ray_session, run_root):
    cfg = load_config("ppo_lag/FunctionEnv-v0", [
        "total_env_steps=4800", "steps_per_iteration=1600", "resources.num_env_hosts=2",
        "resources.envs_per_host=4", "resources.inference=server", f"run_root={run_root}"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    assert m["env_steps"].iloc[-1] == 4800
    assert (m["time/server_inference_s"] > 0).all() and (m["time/host_inference_s"] == 0).all()
    assert np.isfinite(m["episode/return"]).all()
