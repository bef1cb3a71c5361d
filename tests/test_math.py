"""Core math against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saferl.actors import np_policy
from saferl.learners.base import EnvSpec
from saferl.learners.gae import gae
from saferl.learners.lagrange import Lagrange, LagrangeParams, PIDLagrange
from saferl.learners.networks import GaussianPolicy, RunningNorm


def naive_gae(r, v, v_next, end, gamma, lam):
    """Per env, per step: the truncated λ-return sum written out directly."""
    T, N = r.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, coef = 0.0, 1.0
            for k in range(t, T):
                total += coef * (r[k, n] + gamma * v_next[k, n] - v[k, n])
                if end[k, n]:
                    break
                coef *= gamma * lam
            adv[t, n] = total
    return adv


def test_gae_matches_direct_sum():
    rng = np.random.default_rng(0)
    T, N = 17, 5
    r, v, vn = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=(T, N))
    end = rng.random((T, N)) < 0.15
    adv, ret = gae(*(torch.tensor(x) for x in (r, v, vn, end)), gamma=0.97, lam=0.9)
    np.testing.assert_allclose(adv.numpy(), naive_gae(r, v, vn, end, 0.97, 0.9), rtol=1e-10)
    np.testing.assert_allclose(ret.numpy(), adv.numpy() + v)


def test_lagrange_rises_above_limit_and_falls_below():
    lag = Lagrange(LagrangeParams(init=1.0, lr=0.1))
    assert lag.update(cost=30.0, limit=25.0) == 1.5
    assert lag.update(cost=20.0, limit=25.0) == 1.0
    assert lag.update(cost=0.0, limit=25.0) == 0.0  # projected onto λ ≥ 0


def test_pid_lagrange_follows_stooke_algorithm_2():
    p = LagrangeParams(kind="pid", kp=0.5, ki=0.1, kd=0.2, d_delay_ema=0.0)
    pid = PIDLagrange(p)
    costs, limit = [30.0, 35.0, 20.0, 10.0], 25.0
    integral, prev, expected = 0.0, None, []
    for c in costs:  # Δ = J_C − d; I ← (I + Δ)+; ∂ = (J_C − J_prev)+; λ = (K_P Δ + K_I I + K_D ∂)+
        e = c - limit
        integral = max(0.0, integral + e)
        d = max(0.0, c - (c if prev is None else prev))
        expected.append(max(0.0, 0.5 * e + 0.1 * integral + 0.2 * d))
        prev = c
    np.testing.assert_allclose([pid.update(c, limit) for c in costs], expected)


def test_running_norm_matches_numpy_over_chunks():
    rng = np.random.default_rng(1)
    data = rng.normal(3.0, 2.0, size=(1000, 3))
    norm = RunningNorm(3)
    for chunk in np.array_split(data, 7):
        norm.update(torch.tensor(chunk))
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-3)
    np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-3)


def test_numpy_inference_matches_torch_policy():
    torch.manual_seed(0)
    for squash in (False, True):
        pol = GaussianPolicy(5, 2, [16, 16], squash=squash)
        pol.norm.update(torch.randn(100, 5) * 3 + 1)
        obs = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
        state = pol.export_numpy()
        action, u, logp = np_policy.act(state, obs, np.random.default_rng(0))
        with torch.no_grad():
            mu_t = pol.dist(torch.tensor(obs)).mean.numpy()
            logp_t = pol.log_prob(torch.tensor(obs), torch.tensor(u)).numpy()
            det = pol.rsample(torch.tensor(obs), None).numpy()
        np.testing.assert_allclose(np_policy.mean_action(state, obs), mu_t, atol=1e-5)
        np.testing.assert_allclose(logp, logp_t, atol=1e-4)
        np.testing.assert_allclose(np_policy.act(state, obs, None, deterministic=True)[0], det, atol=1e-5)
        np.testing.assert_allclose(action, np.tanh(u) if squash else u, atol=1e-6)


def test_obs_clip_reaches_the_policy_and_the_hosts():
    """``obs_clip`` (OmniSafe: 1e6) bounds the normalised observation in torch and in the hosts'
    numpy copy alike; an observation 50 σ out is clipped at 10 by default and kept at 1e6."""
    from saferl.learners.ppo_lag import PPOLag
    from saferl.learners.trpo_lag import TRPOLag

    spec = EnvSpec(obs_dim=3, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=10)
    far = np.array([[50.0, 0.0, 0.0]], np.float32)  # stats: mean 0, var ≈ 1 at initialisation
    for cls in (PPOLag, TRPOLag):
        for clip, expect in ((None, 10.0), (1e6, 50.0)):
            params = cls.Params() if clip is None else cls.Params(obs_clip=clip)
            pol = cls(params, spec, 0.0, torch.device("cpu"), seed=0).policy
            state = pol.export_numpy()
            assert state["obs_clip"] == (10.0 if clip is None else clip)
            z = pol.normalised(torch.tensor(far))[0, 0].item()
            assert z == pytest.approx(expect, rel=1e-4)
            assert np_policy.normalise(state, far)[0, 0] == pytest.approx(z, rel=1e-4)


def test_network_initialisations():
    """orthogonal: zero biases and a policy mean near 0 (last-layer gain 0.01); kaiming_uniform:
    PyTorch's nn.Linear default, as OmniSafe builds its networks, so the initial mean depends on
    the state at order 0.1. An unknown name is refused."""
    import pytest

    from saferl.learners.networks import mlp

    obs = torch.randn(512, 60)
    means = {}
    for init in ("orthogonal", "kaiming_uniform"):
        torch.manual_seed(0)
        pol = GaussianPolicy(60, 2, [64, 64], 0.0, normalise_obs=False, init=init)
        means[init] = pol.dist(obs).mean
        biases = [m.bias for m in pol.net if isinstance(m, torch.nn.Linear)]
        assert all((b == 0).all() for b in biases) == (init == "orthogonal")
    assert means["orthogonal"].abs().max() < 0.05
    assert means["kaiming_uniform"].std(0).min() > 0.05 and means["kaiming_uniform"].abs().mean() < 2
    torch.manual_seed(0)
    ref = torch.nn.Linear(60, 64)  # the same draws as PyTorch's own default for the first layer
    torch.manual_seed(0)
    assert torch.equal(mlp([60, 64, 2], init="kaiming_uniform")[0].weight, ref.weight)
    with pytest.raises(ValueError, match="init: 'xavier'"):
        mlp([2, 2], init="xavier")


def test_on_policy_init_is_a_validated_field():
    from saferl.config import ConfigError, load_config

    cfg = load_config("ppo_lag/FunctionEnv-v0", ["algo_params.init=kaiming_uniform"])
    assert cfg.learner_params().init == "kaiming_uniform"
    assert load_config("trpo_lag/FunctionEnv-v0").learner_params().init == "orthogonal"
    try:
        load_config("ppo_lag/FunctionEnv-v0", ["algo_params.init=xavier"])
    except ConfigError as err:
        assert str(err).startswith("config error: algo_params.init") and "\n" not in str(err)
    else:
        raise AssertionError("algo_params.init=xavier was accepted")
