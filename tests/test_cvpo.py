"""CVPO (seed 002) against independent computations: the E-step dual against cvxpy's
exponential-cone formulation and its KKT conditions, the M-step's decoupled KL terms against
torch.distributions, the Cholesky actor's numpy export against torch, the per-step threshold
against the series it sums, M-step updates staying near the old policy, and exact resume."""
from __future__ import annotations

import copy

import cvxpy as cp
import numpy as np
import pandas as pd
import pytest
import torch

from saferl.actors import np_policy
from saferl.config import load_config
from saferl.learners.base import EnvSpec
from saferl.learners.cvpo import CVPO, decoupled_kl, estep_dual, per_step_threshold, solve_estep
from saferl.learners.networks import CholeskyTanhGaussianPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


def particle_values(seed: int, b: int = 12, k: int = 16):
    rng = np.random.default_rng(seed)
    x_r = rng.normal(size=(b, k)) * 2 + rng.normal(size=(b, 1))
    x_c = np.abs(rng.normal(size=(b, k)) + 0.5 * x_r / 2)  # correlated with reward: λ matters
    return x_r, x_c


def cvx_estep(x_r, x_c, eps1, eps2):
    """min ηε2 + λε1 + (1/B) Σ_b t_b  s.t.  η log (1/K) Σ_k exp((x_r − λ x_c)_bk / η) ≤ t_b,
    written with exponential cones: z_bk ≥ η exp((x_bk − t_b)/η), Σ_k z_bk ≤ K η."""
    b, k = x_r.shape
    eta, lam, t, z = cp.Variable(pos=True), cp.Variable(nonneg=True), cp.Variable(b), cp.Variable((b, k))
    x = x_r - lam * x_c
    cons = [cp.constraints.ExpCone(x - t[:, None] @ np.ones((1, k)), eta * np.ones((b, k)), z),
            cp.sum(z, axis=1) <= k * eta]
    prob = cp.Problem(cp.Minimize(eta * eps2 + lam * eps1 + cp.sum(t) / b), cons)
    prob.solve(solver=cp.CLARABEL)
    return prob.status, eta.value, lam.value, prob.value


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scale", [0.9, 2.0])  # ε1 below the old policy's E[Q_c] (binding), above (slack)
def test_estep_dual_matches_cvxpy_and_its_kkt_conditions(seed, scale):
    x_r, x_c = particle_values(seed)
    eps1, eps2 = scale * x_c.mean(), 0.1
    eta, lam, ok = solve_estep(x_r, x_c, eps1, eps2, (0.1, 0.1), (1e-6, 1e5))
    status, eta_c, lam_c, value_c = cvx_estep(x_r, x_c, eps1, eps2)
    g = estep_dual(x_r, x_c, eps1, eps2)
    assert ok and status == "optimal"
    assert g([eta, lam])[0] == pytest.approx(value_c, rel=1e-5, abs=1e-6)
    assert eta == pytest.approx(eta_c, rel=1e-3) and lam == pytest.approx(lam_c, rel=1e-3, abs=1e-4)
    # KKT of eq 7 for the particle q: E_b KL(q_b ‖ uniform) = ε2 (η > 0), E_q[Q_c] ≤ ε1 with
    # equality when λ > 0
    z = (x_r - lam * x_c) / eta
    w = np.exp(z - z.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    kl = (w * np.log(w * x_r.shape[1] + 1e-300)).sum(1).mean()
    qc = (w * x_c).sum(1).mean()
    assert kl == pytest.approx(eps2, rel=1e-3)
    if lam > 1e-4:
        assert qc == pytest.approx(eps1, rel=1e-3)
    else:
        assert qc <= eps1 + 1e-6
    # the analytic gradient against central differences
    v, h = np.array([0.7, 0.3]), 1e-6
    fd = [(g(v + h * e)[0] - g(v - h * e)[0]) / (2 * h) for e in np.eye(2)]
    np.testing.assert_allclose(g(v)[1], fd, rtol=1e-5)
    assert (lam > 0.01) == (scale < 1)  # binding needs a positive λ


def test_estep_without_a_feasible_q_drives_lambda_to_its_bound():
    x_r, x_c = particle_values(0)
    eps1 = 0.5 * x_c.min(1).mean()  # below what any reweighting of the particles reaches
    status, *_ = cvx_estep(x_r, x_c, eps1, 0.1)
    eta, lam, _ = solve_estep(x_r, x_c, eps1, 0.1, (0.1, 0.1), (1e-6, 1e5))
    assert status == "unbounded" and lam == 1e5  # Slater fails: the paper's Remark 3


def test_decoupled_kl_terms_are_the_two_gaussian_kls(float64):
    torch.manual_seed(0)
    n, b = 3, 7
    mu_o, mu = torch.randn(b, n), torch.randn(b, n)
    tril_o = torch.tril(torch.randn(b, n, n)) + 2 * torch.eye(n)
    tril = torch.tril(torch.randn(b, n, n)) + 2 * torch.eye(n)
    c_mu, c_sigma = decoupled_kl(mu_o, tril_o, mu, tril)
    mvn = torch.distributions.MultivariateNormal
    kl = torch.distributions.kl_divergence
    torch.testing.assert_close(c_mu, kl(mvn(mu_o, scale_tril=tril_o), mvn(mu, scale_tril=tril_o)))
    torch.testing.assert_close(c_sigma, kl(mvn(mu_o, scale_tril=tril_o), mvn(mu_o, scale_tril=tril)))
    # and together they bound nothing away: KL(π' ‖ π) = C_μ(Σ) + C_Σ when the mean term uses Σ
    full = kl(mvn(mu_o, scale_tril=tril_o), mvn(mu, scale_tril=tril))
    c_mu_sigma, _ = decoupled_kl(mu_o, tril, mu, tril)
    torch.testing.assert_close(full, c_mu_sigma + c_sigma)


def test_cholesky_actor_numpy_export_agrees_with_torch():
    torch.manual_seed(1)
    pol = CholeskyTanhGaussianPolicy(4, 3, [16, 16], init_std=0.3)
    obs = torch.randn(6, 4)
    state = pol.export_numpy()
    mu_np, tril_np = np_policy.mean_and_tril(state, obs.numpy())
    mu, tril = pol.mean_and_tril(obs)
    np.testing.assert_allclose(mu_np, mu.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(tril_np, tril.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.diagonal(tril_np, axis1=1, axis2=2), 0.3, atol=0.01)  # init_std
    a, u, logp = np_policy.act(state, obs.numpy(), np.random.default_rng(0))
    np.testing.assert_allclose(a, np.tanh(u), atol=1e-6)
    np.testing.assert_allclose(logp, pol.dist(obs).log_prob(torch.tensor(u)).detach().numpy(), atol=1e-4)
    a_det, u_det, _ = np_policy.act(state, obs.numpy(), np.random.default_rng(0), deterministic=True)
    np.testing.assert_allclose(u_det, mu_np, atol=1e-6)
    # sampled u has the covariance LLᵀ
    big = np.repeat(obs.numpy()[:1], 20000, 0)
    _, us, _ = np_policy.act(state, big, np.random.default_rng(1))
    np.testing.assert_allclose(np.cov(us.T), (tril_np[0] @ tril_np[0].T), atol=0.01)


def test_per_step_threshold_is_the_discounted_series():
    d, gamma, horizon = 25.0, 0.99, 1000
    per_step = d / horizon
    assert per_step_threshold(d, gamma, horizon) == pytest.approx(sum(per_step * gamma ** t for t in range(horizon)))
    assert per_step_threshold(d, 1.0, horizon) == d


def env_spec(obs_dim=3, act_dim=2):
    return EnvSpec(obs_dim=obs_dim, act_dim=act_dim, act_low=[-1.0] * act_dim, act_high=[1.0] * act_dim,
                   max_episode_steps=100)


def minibatch(seed=0, b=64, obs_dim=3, act_dim=2):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(b, obs_dim, generator=g), "act": torch.randn(b, act_dim, generator=g),
            "reward": torch.randn(b, generator=g), "cost": (torch.rand(b, generator=g) < 0.3).float(),
            "next_obs": torch.randn(b, obs_dim, generator=g), "discount": torch.full((b,), 0.99)}


def test_update_moves_the_policy_within_the_mstep_bounds():
    p = CVPO.Params(hidden=[32, 32], particles=16)
    learner = CVPO(p, env_spec(), cost_limit=5.0, device=torch.device("cpu"), seed=0)
    old = copy.deepcopy(learner.policy)
    out = learner.step(minibatch())
    obs = minibatch(seed=1)["obs"]
    kl = torch.distributions.kl_divergence(old.dist(obs), learner.policy.dist(obs)).mean().item()
    assert out["cvpo/estep_converged"] == 1.0 and out["cvpo/estep_kl"] == pytest.approx(p.kl_estep, rel=1e-2)
    assert 0 < kl < 10 * (p.kl_mean + p.kl_cov)  # a few Adam steps of lr 2e-3 with a 0.01 gradient clip
    # the target policy moved by polyak τ only
    for t, o, n in zip(learner.target_policy.parameters(), old.parameters(), learner.policy.parameters()):
        torch.testing.assert_close(t, o + p.tau * (n - o))


def test_state_dict_resumes_identically():
    p = CVPO.Params(hidden=[16, 16], particles=8)
    dev = torch.device("cpu")
    a = CVPO(p, env_spec(), 5.0, dev, seed=1)
    a.step(minibatch(0))
    sd = copy.deepcopy(a.state_dict())
    out_a = [a.step(minibatch(i)) for i in (1, 2)]
    b = CVPO(p, env_spec(), 5.0, dev, seed=2)
    b.load_state_dict(sd)
    assert [b.step(minibatch(i)) for i in (1, 2)] == out_a


def test_cvpo_on_ray_brings_the_cost_below_the_limit(ray_session, run_root):
    """On the point/hazard task the goal lies beyond the hazard: tracking it costs ≈ 24 per episode.
    With a limit of 2, CVPO learns to head for the goal and then, as the E-step's λ turns against
    Q_c, to stay out of the hazard. (K and M are shrunk from Table 1's 32 and 6 to keep this short.)"""
    from saferl.cluster.session import train

    cfg = load_config("cvpo/PointHazard-D1-v0", [f"run_root={run_root}", "total_env_steps=24000",
                                                 "algo_params.particles=16", "algo_params.mstep_iters=3",
                                                 "schedule.log_every=1"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    ep = m.dropna(subset=["episode/cost"])
    assert ep["episode/cost"].max() > 10  # it did learn to head for the goal through the hazard ...
    assert ep["episode/cost"].iloc[-4:].mean() <= cfg.limit, ep["episode/cost"].tolist()  # ... then out of it
    assert ep["episode/return"].iloc[-4:].mean() > ep["episode/return"].iloc[0] + 50
    assert m["cvpo/estep_converged"].dropna().mean() > 0.9
    eps1 = m["cvpo/eps1"].dropna()
    assert len(eps1) and (eps1 - 2.0 * (1 - 0.99 ** 120) / (120 * 0.01)).abs().max() < 1e-9
