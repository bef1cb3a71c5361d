"""CVPO (Liu et al., ICML 2022) against independent computations: the E-step dual against cvxpy's
exponential-cone formulation and its KKT conditions, the M-step's decoupled KL terms against
torch.distributions, its particle-statistics likelihood and the E-step's particle critic values
against the direct per-particle computations, the Cholesky actor's numpy export against torch,
the per-step threshold against the series it sums, M-step updates staying near the old policy,
the M-step KLs staying near ε_μ and ε_Σ over many updates, and exact resume.

``python -m tests.test_cvpo kl|time [--baseline FILE]`` measures the M-step KL trajectories
(synthetic critic) and the update time at Table 1's sizes, for this learners/cvpo.py and, with
``--baseline``, another copy of it (e.g. an older commit's), interleaved."""
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
from saferl.learners.cvpo import (
    CVPO,
    decoupled_kl,
    estep_dual,
    mstep_terms,
    particle_q,
    particle_stats,
    per_step_threshold,
    solve_estep,
)
from saferl.learners.networks import CholeskyTanhGaussianPolicy, polyak
from saferl.learners.offpolicy_base import Critic


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
    _eta, lam, _ = solve_estep(x_r, x_c, eps1, 0.1, (0.1, 0.1), (1e-6, 1e5))
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


def test_mstep_likelihood_from_particle_statistics_is_the_per_particle_sum(float64):
    """Σ_k q_k [log N(u_k; μ, Σ') + log N(u_k; μ', Σ)] and its gradient: the statistics form
    against torch.distributions on every particle; the KL terms against ``decoupled_kl``."""
    torch.manual_seed(0)
    b, k, n = 9, 6, 3
    mu_o = torch.randn(b, n)
    tril_o = torch.tril(torch.randn(b, n, n), -1) + torch.diag_embed(torch.rand(b, n) + 0.5)
    mu = torch.randn(b, n, requires_grad=True)
    tril_raw = (torch.tril(torch.randn(b, n, n), -1) + torch.diag_embed(torch.rand(b, n) + 0.5)).requires_grad_(True)
    u = torch.randn(b, k, n)
    q = torch.softmax(torch.randn(b, k), 1) * 0.99  # Σ_k q need not be exactly 1
    loglik, c_mu, c_sigma = mstep_terms(particle_stats(u, q, mu_o, tril_o), mu, tril_raw)
    mvn = torch.distributions.MultivariateNormal
    u_k = u.transpose(0, 1)
    direct = (q.T * (mvn(mu, scale_tril=tril_o).log_prob(u_k) + mvn(mu_o, scale_tril=tril_raw).log_prob(u_k))).sum(0)
    torch.testing.assert_close(loglik, direct, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(loglik.sum(), [mu, tril_raw])
    g2 = torch.autograd.grad(direct.sum(), [mu, tril_raw])
    for a, b_ in zip(g1, g2):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
    for mine, ref in zip((c_mu, c_sigma), decoupled_kl(mu_o, tril_o, mu, tril_raw)):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)


def test_particle_q_is_the_critic_on_repeated_states():
    torch.manual_seed(0)
    critic = Critic(5, 2, [16, 16], 2)
    obs, act = torch.randn(7, 5), torch.randn(7, 4, 2)
    ref = critic(obs.unsqueeze(1).expand(7, 4, 5).reshape(28, 5), act.reshape(28, 2)).reshape(2, 7, 4)
    torch.testing.assert_close(particle_q(critic, obs, act), ref, rtol=1e-6, atol=1e-6)


def synthetic_kl_run(module=None, updates=120, seed=0, obs_dim=8, act_dim=2, **params):
    """E- and M-steps of ``updates`` CVPO updates against fixed random critics (one hidden layer
    of 32) on minibatches from a fixed pool of states, the target policy following by polyak as
    in ``CVPO.step``; per update (C_μ, C_Σ, β_μ, β_Σ) as logged. ``module``: another copy of
    learners/cvpo.py (default this one)."""
    mod = module or __import__("saferl.learners.cvpo", fromlist=["CVPO"])
    p = mod.CVPO.Params(**params)
    learner = mod.CVPO(p, env_spec(obs_dim, act_dim), 5.0, torch.device("cpu"), seed)
    torch.manual_seed(seed + 1)
    learner.q_r_target, learner.q_c_target = Critic(obs_dim, act_dim, [32], 2), Critic(obs_dim, act_dim, [32], 1)
    pool = torch.randn(4096, obs_dim)
    rows = []
    for _ in range(updates):
        obs = pool[torch.randint(0, len(pool), (p.batch_size,))]
        weights, particles, _ = learner.estep(obs)
        out = learner.mstep(obs, particles, weights)
        polyak(learner.target_policy, learner.policy, p.tau)
        rows.append((out["cvpo/kl_mean"], out["cvpo/kl_cov"], learner.beta_mean, learner.beta_cov))
    return p, np.array(rows)


def test_mstep_kls_stay_near_their_bounds_over_many_updates():
    """120 updates (K = 32, M = 6 as in Table 1; small nets): after the multipliers settle, the
    logged per-update C_μ and C_Σ stay near ε_μ and ε_Σ, and β_μ settles below its cap."""
    p, r = synthetic_kl_run(hidden=[32, 32], batch_size=64)
    settled = r[60:]
    kl_mean, kl_cov = np.median(settled[:, 0]), np.median(settled[:, 1])
    assert 0.5 * p.kl_mean <= kl_mean <= 2 * p.kl_mean, kl_mean
    assert kl_cov <= 2 * p.kl_cov, kl_cov
    assert settled[:, 0].max() <= 5 * p.kl_mean and settled[:, 1].max() <= 5 * p.kl_cov
    assert 0 < settled[-1, 2] < p.beta_mean_max  # β_μ active, not pinned at its cap


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
    _a_det, u_det, _ = np_policy.act(state, obs.numpy(), np.random.default_rng(0), deterministic=True)
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


@pytest.mark.slow
def test_cvpo_on_ray_brings_the_cost_below_the_limit(ray_session, run_root):
    """On the point/hazard task the goal lies beyond the hazard: tracking it costs ≈ 24 per episode.
    With a limit of 2, CVPO learns to head for the goal and then, as the E-step's λ turns against
    Q_c, to stay out of the hazard. (K and M are shrunk from Table 1's 32 and 6 to keep this short.)"""
    from saferl.cluster.session import train

    cfg = load_config("cvpo/PointHazard-D1-v0", [f"run_root={run_root}", "total_env_steps=24000",
                                                 "algo_params.particles=16", "algo_params.mstep_iters=3",
                                                 "algo_params.kl_mean=0.01", "schedule.log_every=1"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    ep = m.dropna(subset=["episode/cost"])
    assert ep["episode/cost"].max() > 10  # it did learn to head for the goal through the hazard ...
    assert ep["episode/cost"].iloc[-4:].mean() <= cfg.limit, ep["episode/cost"].tolist()  # ... then out of it
    assert ep["episode/return"].iloc[-4:].mean() > ep["episode/return"].iloc[0] + 50
    assert m["cvpo/estep_converged"].dropna().mean() > 0.9
    eps1 = m["cvpo/eps1"].dropna()
    assert len(eps1) and (eps1 - 2.0 * (1 - 0.99 ** 120) / (120 * 0.01)).abs().max() < 1e-9


def _main(argv=None) -> None:
    """The measurements of docs/results/cvpo.md (module docstring)."""
    import argparse
    import importlib.util
    import sys
    import time

    ap = argparse.ArgumentParser(prog="python -m tests.test_cvpo")
    ap.add_argument("what", choices=["kl", "time"])
    ap.add_argument("--baseline", help="another copy of learners/cvpo.py, measured alongside")
    ap.add_argument("--updates", type=int, default=None, help="kl: 150; time: 30 timed updates per learner")
    ap.add_argument("--png", help="kl: write the trajectories' plot here")
    ap.add_argument("--csv", help="kl: write the trajectories here")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="kl: a CVPO parameter of this copy's learner (a Python literal), e.g. beta_mean_max=0.1")
    args = ap.parse_args(argv)
    import ast
    extra = {kv.split("=", 1)[0]: ast.literal_eval(kv.split("=", 1)[1]) for kv in args.param}
    torch.set_num_threads(1)
    mods = {"this": None}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("cvpo_baseline", args.baseline)
        mods["baseline"] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mods["baseline"]
        spec.loader.exec_module(mods["baseline"])
    if args.what == "kl":
        n = args.updates or 150
        runs = {name: synthetic_kl_run(m, n, **{"hidden": [64, 64], "batch_size": 128, **(extra if m is None else {})})
                for name, m in mods.items()}
        for name, (p, r) in runs.items():
            s = r[n // 2:]
            print(f"{name}: updates {n // 2}-{n}: median C_mu {np.median(s[:, 0]):.3g} (eps_mu {p.kl_mean:g}), max "
                  f"{s[:, 0].max():.3g}; median C_Sigma {np.median(s[:, 1]):.3g} (eps_Sigma {p.kl_cov:g}), max "
                  f"{s[:, 1].max():.3g}; final beta_mu {s[-1, 2]:.3g} (cap {p.beta_mean_max:g}), "
                  f"beta_Sigma {s[-1, 3]:.3g}")
        if args.csv:
            pd.DataFrame({f"{name}_{c}": r[:, i] for name, (_, r) in runs.items()
                          for i, c in enumerate(("kl_mean", "kl_cov", "beta_mean", "beta_cov"))}).to_csv(args.csv)
        if args.png:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
            for name, (p, r) in runs.items():
                for ax, i, eps in ((axes[0], 0, p.kl_mean), (axes[1], 1, p.kl_cov)):
                    ax.semilogy(r[:, i], label=name)
                    ax.axhline(eps, color="k", ls="--", lw=0.8)
            axes[0].set(title="C_μ per update (ε_μ dashed)", xlabel="update")
            axes[1].set(title="C_Σ per update (ε_Σ dashed)", xlabel="update")
            axes[0].legend()
            fig.tight_layout()
            fig.savefig(args.png, dpi=110)
    else:
        n, b, d, a = args.updates or 30, 300, 88, 2
        g = torch.Generator().manual_seed(0)
        batch = {"obs": torch.randn(b, d, generator=g), "act": torch.rand(b, a, generator=g) * 2 - 1,
                 "reward": torch.randn(b, generator=g), "cost": (torch.rand(b, generator=g) < 0.05).float(),
                 "next_obs": torch.randn(b, d, generator=g), "discount": torch.full((b,), 0.99)}
        learners = {}
        for name, m in mods.items():
            mod = m or __import__("saferl.learners.cvpo", fromlist=["CVPO"])
            learners[name] = mod.CVPO(mod.CVPO.Params(), env_spec(d, a), 25.0, torch.device("cpu"), 0)
            for _ in range(3):  # warm-up
                learners[name].step(batch)
        times = {name: ([], []) for name in learners}
        for _ in range(n):  # interleaved, so that both see the same machine load
            for name, learner in learners.items():
                t, c = time.perf_counter(), time.process_time()
                learner.step(batch)
                times[name][0].append(time.perf_counter() - t)
                times[name][1].append(time.process_time() - c)
        for name, (wall, cpu) in times.items():
            print(f"{name}: {n} updates (B {b}, K 32, M 6, [256, 256], obs {d}, act {a}, 1 thread): wall min "
                  f"{min(wall):.4f} s, median {np.median(wall):.4f} s; CPU time min {min(cpu):.4f} s, median "
                  f"{np.median(cpu):.4f} s")


if __name__ == "__main__":
    _main()
