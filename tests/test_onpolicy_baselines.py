"""The on-policy baselines built on the PPO-Lag and trust-region machinery (CPPO-PID, RCPO, FOCOPS,
CUP, PCPO), each core update against an independent computation on a tiny problem: RCPO's
advantage against a direct loop over the penalised reward, FOCOPS's and CUP's losses against the
closed-form optimal policies they target (and FOCOPS's gradient against finite differences of a
numpy re-implementation), PCPO's projection against its closed form and cvxpy, CPPO-PID's
multiplier against Algorithm 2 through the dual phase; then updates on real batches, resume, and a
short FOCOPS run on the local Ray cluster."""
from __future__ import annotations

import copy
import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

from saferl.actors.env_host import EnvHost
from saferl.learners.base import EnvSpec
from saferl.learners.cup import CUP, cup_projection_loss
from saferl.learners.focops import FOCOPS, focops_loss
from saferl.learners.lagrange import PIDLagrange
from saferl.learners.networks import GaussianPolicy, flat_params, set_flat_params
from saferl.learners.onpolicy_base import advantages, assemble, lagrangian_advantage
from saferl.learners.pcpo import PCPO, pcpo_step, project_to_halfspace
from saferl.learners.ppo_lag import CPPOPID, PPOLag
from saferl.learners.rcpo import RCPO, penalised_advantages
from saferl.learners.trpo_lag import TRPO, TRPOLag
from saferl.registry import get_algo

CPU = torch.device("cpu")


def env_spec(envs: int = 8, seed: int = 0) -> tuple[EnvHost, EnvSpec]:
    host = EnvHost("FunctionEnv-v0", envs, seed)
    return host, EnvSpec.of(host.spec())


def own_rollouts(learner, host: EnvHost, n: int, steps: int = 60) -> list[dict]:
    """Batches sampled by the learner's own policy, updating after each (as the coordinator does)."""
    out = []
    for _ in range(n):
        batch, _ = host.rollout(learner.numpy_policy(), steps)
        out.append(batch)
    return out


# -- registry and configs -------------------------------------------------------------------------

def test_registered_with_their_phases_and_configs():
    from saferl.config import load_config

    expected = {"cppo_pid": (CPPOPID, ("dual",)), "rcpo": (RCPO, ("dual",)), "focops": (FOCOPS, ("dual",)),
                "cup": (CUP, ("dual",)), "pcpo": (PCPO, ())}
    for name, (cls, phases) in expected.items():
        spec = get_algo(name)
        assert spec.kind == "sampling" and spec.phases == phases and spec.load() is cls
        for task in ("FunctionEnv-v0", "SafetyPointGoal1-v0"):
            cfg = load_config(f"{name}/{task}")
            assert isinstance(cfg.learner_params(), cls.Params)
    # CPPO-PID is PPO-Lag with the PID multiplier, also when a config leaves ``lagrange`` out
    assert issubclass(CPPOPID, PPOLag) and CPPOPID.Params().lagrange.kind == "pid"
    assert load_config("cppo_pid/SafetyPointGoal1-v0").learner_params().lagrange.kind == "pid"


# -- CPPO-PID -------------------------------------------------------------------------------------

def test_cppo_pid_multiplier_follows_a_step_in_cost_through_the_dual_phase():
    """The PID formula itself is tested in test_math (no smoothing); here: the learner's dual phase
    with the shipped gains and the EMA-smoothed derivative (Stooke et al. 2020, Algorithm 2)."""
    _, env = env_spec()
    learner = CPPOPID(CPPOPID.Params(hidden=[8]), env, cost_limit=8.0, device=CPU, seed=0)
    assert isinstance(learner.multiplier, PIDLagrange)
    p = learner.p.lagrange
    costs = [4.0, 4.0, 4.0, 20.0, 20.0, 20.0, 20.0, 2.0, 2.0]  # a step up at t = 3, down at t = 7
    got = [learner.phase("dual", {"episode_cost": c})["lagrange_multiplier"] for c in costs]
    assert learner.phase("dual", {"episode_cost": None}) == {}  # no episode ended: no step
    integral, smoothed, expected = 0.0, None, []
    for c in costs:  # Algorithm 2: Δ = J_C − d, I ← (I + Δ)₊, ∂ = (J_C − J̃_prev)₊, J̃ an EMA
        delta = c - 8.0
        integral = max(0.0, integral + delta)
        deriv = 0.0 if smoothed is None else max(0.0, c - smoothed)
        smoothed = c if smoothed is None else p.d_delay_ema * smoothed + (1 - p.d_delay_ema) * c
        expected.append(min(p.upper, max(0.0, p.kp * delta + p.ki * integral + p.kd * deriv)))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[:3] == [0.0, 0.0, 0.0]  # below the limit: no penalty, no integral build-up
    assert got[3] == pytest.approx(0.1 * 12 + 0.01 * 12 + 0.01 * 16)  # P + I + D kick at the step
    assert np.all(np.diff(got[3:7]) > 0)  # above the limit λ keeps rising (integral; slow EMA in ∂)
    assert got[7] < got[6]  # cost back below the limit: the proportional term pulls λ down


# -- RCPO -----------------------------------------------------------------------------------------

def synthetic_batch(T=13, N=4, obs_dim=2, seed=0) -> dict:
    """An assembled batch with terminations and truncations (next_obs the true next state)."""
    g = torch.Generator().manual_seed(seed)
    term = torch.rand(T, N, generator=g) < 0.1
    trunc = (torch.rand(T, N, generator=g) < 0.1) & ~term
    return {"obs": torch.randn(T, N, obs_dim, generator=g), "next_obs": torch.randn(T, N, obs_dim, generator=g),
            "reward": torch.randn(T, N, generator=g), "cost": torch.rand(T, N, generator=g),
            "terminated": term, "truncated": trunc, "end": term | trunc}


def direct_penalised_gae(v, v_next, r, c, term, end, lam_mult, gamma, gae_lam):
    """Per env and step: Σ_k (γλ)^(k−t) δ_k up to the episode's end, δ_k = r_k − λc_k + γV'_k − V_k."""
    T, N = r.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, coef = 0.0, 1.0
            for k in range(t, T):
                boot = 0.0 if term[k, n] else gamma * v_next[k, n]
                total += coef * (r[k, n] - lam_mult * c[k, n] + boot - v[k, n])
                if end[k, n]:
                    break
                coef *= gamma * gae_lam
            adv[t, n] = total
    return adv


def test_rcpo_advantage_is_one_gae_of_the_penalised_reward():
    env = EnvSpec(obs_dim=2, act_dim=1, act_low=[-1.0], act_high=[1.0], max_episode_steps=50)
    learner = RCPO(RCPO.Params(hidden=[8, 8], gamma=0.97, lam=0.9), env, 8.0, CPU, seed=0)
    learner.policy.norm.update(torch.randn(100, 2) * 3 + 1)
    learner.multiplier.value = 0.7
    batch = synthetic_batch()
    norm = learner.policy.normalised
    with torch.no_grad():
        v = learner.v_r(norm(batch["obs"])).squeeze(-1).numpy()
        v_next = learner.v_r(norm(batch["next_obs"])).squeeze(-1).numpy()
    expected = direct_penalised_gae(v, v_next, batch["reward"].numpy(), batch["cost"].numpy(),
                                    batch["terminated"].numpy(), batch["end"].numpy(), 0.7, 0.97, 0.9).reshape(-1)
    v = v.reshape(-1)  # advantages and targets come flat, row-major
    adv, ret = penalised_advantages(learner.v_r, norm, batch, 0.7, 0.97, 0.9)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret.numpy(), expected + v, rtol=1e-5, atol=1e-5)  # the penalised critic's target
    # the learner's hook: z(Â) for the surrogate, penalised targets for v_r, cost targets for v_c
    adv_pi, ret_r, ret_c = learner.policy_advantages(batch)
    z = (expected - expected.mean()) / expected.std(ddof=1)
    np.testing.assert_allclose(adv_pi.numpy(), z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ret_r.numpy(), expected + v, rtol=1e-5, atol=1e-5)
    _, cost_targets = advantages(learner.v_c, norm, batch, "cost", learner.p.cost_gamma, learner.p.cost_lam)
    torch.testing.assert_close(ret_c, cost_targets)
    # ... which is not PPO-Lag's combination of separately estimated advantages
    adv_r, _ = advantages(learner.v_r, norm, batch, "reward", 0.97, 0.9)
    adv_c, _ = advantages(learner.v_c, norm, batch, "cost", 0.97, 0.9)
    assert not torch.allclose(adv_pi, lagrangian_advantage(adv_r, adv_c, 0.7), atol=1e-2)


# -- FOCOPS ---------------------------------------------------------------------------------------

def quantile_samples(mu: float, sigma: float, n: int) -> torch.Tensor:
    """a_i = μ + σ Φ⁻¹((i + ½)/n): a deterministic sample of N(μ, σ²) (accurate expectations)."""
    return mu + sigma * torch.special.ndtri((torch.arange(n) + 0.5) / n)


def single_state_policy(mu: float, log_std: float) -> GaussianPolicy:
    """π(·|s) = N(bias, σ²) for the one observation s = 0."""
    pol = GaussianPolicy(1, 1, [], init_log_std=log_std, normalise_obs=False)
    with torch.no_grad():
        pol.net[0].weight.zero_()
        pol.net[0].bias.fill_(mu)
    return pol


def minimise(pol: GaussianPolicy, loss_fn) -> None:
    opt = torch.optim.LBFGS(pol.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


def test_focops_loss_minimiser_is_the_closed_form_optimal_policy(float64):
    """Over Gaussians, E_s[D_KL(π‖π_k)] − E[ρ Â]/λ = D_KL(π‖π*) + const with
    π* ∝ π_k exp(Â/λ); a concave quadratic Â makes π* Gaussian, so the loss's minimiser is π*."""
    mu_k, sd_k, lam, nu = 0.3, 0.8, 1.5, 0.6
    act = quantile_samples(mu_k, sd_k, 20001)[:, None]
    obs = torch.zeros_like(act)
    adv_r, adv_c = -(act[:, 0] - 1.0) ** 2, 0.5 * (act[:, 0] + 0.5) ** 2  # reward peak at 1, cost grows away from −½
    adv = adv_r - nu * adv_c
    old = torch.distributions.Normal(torch.full_like(act, mu_k), torch.full_like(act, sd_k))
    logp_old = old.log_prob(act).sum(-1)
    pol = single_state_policy(mu_k, math.log(sd_k))

    def loss():
        dist = pol.dist(obs)
        return focops_loss(dist, old, dist.log_prob(act).sum(-1), logp_old, adv, lam, eta=1e9)[0]

    minimise(pol, loss)
    # π* ∝ N(μ_k, σ_k²) · exp(−[(a − 1)² + ν/2 (a + ½)²]/λ): precision and mean in closed form
    prec = 1 / sd_k ** 2 + 2 * (1 + nu / 2) / lam
    mean = (mu_k / sd_k ** 2 + 2 * (1.0 + nu / 2 * -0.5) / lam) / prec
    got_mean, got_sd = pol.net[0].bias.item(), pol.log_std.exp().item()
    assert got_mean == pytest.approx(mean, rel=1e-4) and got_sd == pytest.approx(prec ** -0.5, rel=1e-4)


def test_focops_gradient_matches_finite_differences_with_the_per_state_indicator(float64):
    """Autograd of the FOCOPS loss against central differences of a numpy re-implementation
    (Gaussian KL(π_θ‖π_k) in closed form, ratio of densities); states with KL > η contribute nothing."""
    lam, eta = 1.5, 0.02
    rng = np.random.default_rng(0)
    obs = np.repeat([0.0, 1.0], 6)[:, None]  # state 0 stays close to π_k, state 1 moves past η
    w_k, b_k, ls_k = 0.3, 0.1, -0.2
    act = (w_k * obs + b_k + np.exp(ls_k) * rng.normal(size=obs.shape))
    adv = rng.normal(size=12)
    theta = np.array([ls_k + 0.05, w_k + 0.5, b_k])  # (log σ, weight, bias): the policy's parameter order

    def np_loss(th):
        sd, mu = np.exp(th[0]), th[1] * obs[:, 0] + th[2]
        mu_k, sd_k = w_k * obs[:, 0] + b_k, np.exp(ls_k)
        kl = np.log(sd_k / sd) + (sd ** 2 + (mu - mu_k) ** 2) / (2 * sd_k ** 2) - 0.5
        ratio = (sd_k / sd) * np.exp(-(act[:, 0] - mu) ** 2 / (2 * sd ** 2) + (act[:, 0] - mu_k) ** 2 / (2 * sd_k ** 2))
        keep = kl <= eta
        return np.mean((kl - ratio * adv / lam) * keep), keep

    pol = GaussianPolicy(1, 1, [], normalise_obs=False)
    assert [n for n, _ in pol.named_parameters()] == ["log_std", "net.0.weight", "net.0.bias"]
    set_flat_params(pol, torch.tensor(theta))
    old = torch.distributions.Normal(torch.tensor(w_k * obs + b_k), torch.full(obs.shape, math.exp(ls_k)))
    o, a = torch.tensor(obs), torch.tensor(act)
    dist = pol.dist(o)
    loss, _kl, keep = focops_loss(dist, old, dist.log_prob(a).sum(-1), old.log_prob(a).sum(-1),
                                 torch.tensor(adv), lam, eta)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in pol.parameters()]).numpy()
    expected_loss, expected_keep = np_loss(theta)
    assert expected_keep.tolist() == [True] * 6 + [False] * 6 and keep.tolist() == [1.0] * 6 + [0.0] * 6
    assert loss.item() == pytest.approx(expected_loss, rel=1e-10)
    h = 1e-6
    fd = np.array([(np_loss(theta + h * e)[0] - np_loss(theta - h * e)[0]) / (2 * h) for e in np.eye(3)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert grad[1] == 0.0  # the weight acts on state 1 only (obs 0 there), which the indicator drops


def test_focops_update_stops_at_the_kl_bound_and_nu_is_clipped():
    host, env = env_spec()
    learner = FOCOPS(FOCOPS.Params(hidden=[16, 16], minibatch_size=64), env, 8.0, CPU, seed=0)
    learner.multiplier.value = 1.0
    batch = own_rollouts(learner, host, 1)[0]
    old = copy.deepcopy(learner.policy)
    out = learner.update([batch])
    new = copy.deepcopy(learner.policy)
    new.norm.load_state_dict(old.norm.state_dict())  # the policy the update produced, before obs stats move
    obs = torch.as_tensor(batch["obs"]).reshape(-1, 1)
    with torch.no_grad():
        kl = torch.distributions.kl_divergence(new.dist(obs), old.dist(obs)).sum(-1).mean().item()
    assert out["final_kl"] == pytest.approx(kl, rel=1e-4) and kl > 0
    # the epochs ran to the end below δ, or stopped at the first epoch past it
    assert (out["epochs"] == learner.p.epochs and kl <= learner.p.target_kl) or kl > learner.p.target_kl
    assert 0 < out["kept_frac"] <= 1 and out["lagrange_multiplier"] == 1.0
    # ν ← clip(ν + α(J_C − b), 0, ν_max) on the dual phase
    assert learner.phase("dual", {"episode_cost": 10.0}) == {"lagrange_multiplier": pytest.approx(1.02)}
    assert learner.phase("dual", {"episode_cost": 1e4})["lagrange_multiplier"] == 2.0  # ν_max
    assert learner.phase("dual", {"episode_cost": -1e4})["lagrange_multiplier"] == 0.0


# -- CUP ------------------------------------------------------------------------------------------

def test_cup_projection_loss_minimiser_is_the_closed_form(float64):
    """E[D_KL(π‖π_½)] + w E_{π_k}[ρ Â_C] = D_KL(π‖π_½) + w E_π[Â_C] is minimised by
    π ∝ π_½ exp(−w Â_C); with Â_C = κ(a − m)² that is a Gaussian in closed form."""
    mu_k, sd_k, mu_h, sd_h, w, kappa, m = 0.0, 0.7, 0.4, 0.6, 0.8, 1.5, -0.3
    act = quantile_samples(mu_k, sd_k, 20001)[:, None]
    obs = torch.zeros_like(act)
    adv_c = kappa * (act[:, 0] - m) ** 2
    logp_old = torch.distributions.Normal(mu_k, sd_k).log_prob(act).sum(-1)
    half = torch.distributions.Normal(torch.full_like(act, mu_h), torch.full_like(act, sd_h))
    pol = single_state_policy(mu_h, math.log(sd_h))

    def loss():
        dist = pol.dist(obs)
        return cup_projection_loss(dist, half, dist.log_prob(act).sum(-1), logp_old, adv_c, w)

    minimise(pol, loss)
    prec = 1 / sd_h ** 2 + 2 * w * kappa
    mean = (mu_h / sd_h ** 2 + 2 * w * kappa * m) / prec
    assert pol.net[0].bias.item() == pytest.approx(mean, rel=1e-4)
    assert pol.log_std.exp().item() == pytest.approx(prec ** -0.5, rel=1e-4)


def cost_surrogate_and_kl(policy, half, obs, act, logp_old, adv_c):
    with torch.no_grad():
        dist = policy.dist(obs)
        surrogate = (torch.exp(dist.log_prob(act).sum(-1) - logp_old) * adv_c).mean().item()
        kl = torch.distributions.kl_divergence(half, dist).sum(-1).mean().item()
    return surrogate, kl


def test_cup_projection_decreases_the_cost_surrogate_within_the_kl_bound():
    host, env = env_spec()
    learner = CUP(CUP.Params(hidden=[16, 16], minibatch_size=64, target_kl=0.02), env, 8.0, CPU, seed=0)
    learner.update(own_rollouts(learner, host, 1))  # normaliser statistics and critics of a first update
    (batch,) = own_rollouts(learner, host, 1)
    data = assemble([batch], CPU)
    obs, act = data["obs"].reshape(-1, 1), data["act"].reshape(-1, 1)
    logp_old = learner.policy.log_prob(obs, act).detach()  # π_k; the projection starts from π_½ = π_k here
    _, _ret_r, _ret_c = learner.policy_advantages(data)
    adv_c = learner._adv_c
    assert adv_c.mean().abs() < 1e-5  # centred
    half = copy.deepcopy(learner.policy)
    half_dist = half.dist(obs)
    # ν = 0: the KL term alone is minimal at π_½, so the projection leaves it unchanged
    fresh = copy.deepcopy(learner)
    fresh.pi_opt = torch.optim.Adam(fresh.policy.parameters(), lr=learner.p.policy_lr)  # no momentum
    fresh.multiplier.value = 0.0
    fresh.project(obs, act, logp_old, adv_c)
    torch.testing.assert_close(flat_params(fresh.policy), flat_params(half), rtol=0, atol=0)
    # ν > 0: the cost surrogate E[ρ Â_C] falls; the KL to π_½ stays within what the early stop allows
    learner.multiplier.value = 2.0
    before, _ = cost_surrogate_and_kl(half, half_dist, obs, act, logp_old, adv_c)
    out = learner.project(obs, act, logp_old, adv_c)
    after, kl = cost_surrogate_and_kl(learner.policy, half_dist, obs, act, logp_old, adv_c)
    assert after < before - 1e-3, (before, after)
    assert out["cup/cost_surrogate_before"] == pytest.approx(before, abs=1e-6)
    assert out["cup/cost_surrogate_after"] == pytest.approx(after, abs=1e-6)
    assert out["cup/kl_projection"] == pytest.approx(kl, rel=1e-4)
    stopped = out["cup/projection_epochs"] < learner.p.projection_epochs
    assert 0 < kl <= (2 * learner.p.target_kl if stopped else learner.p.target_kl)
    # the whole update reports both steps
    full = learner.update([batch])
    assert {"cup/cost_surrogate_after", "cup/kl_projection", "clip_frac", "lagrange_multiplier"} <= set(full)


# -- PCPO -----------------------------------------------------------------------------------------

def spd(n: int, rng: np.random.Generator, cond: float = 20.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


def cvx(objective, constraints):
    prob = cp.Problem(objective, constraints)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert prob.status in ("optimal", "optimal_inaccurate")


@pytest.mark.parametrize("metric", ["kl", "l2"])
@pytest.mark.parametrize("seed", range(3))
def test_pcpo_step_matches_the_closed_form_and_cvxpy(float64, metric, seed):
    rng = np.random.default_rng(seed)
    n, delta = 6, 0.05
    h = spd(n, rng)
    g, a = rng.normal(size=n), rng.normal(size=n)
    L = h if metric == "kl" else np.eye(n)
    x_g = np.linalg.solve(h, g)
    q = g @ x_g
    half_cf = np.sqrt(2 * delta / q) * x_g
    for c in (-1.0, -0.5 * abs(a @ half_cf), 0.0, 0.3, 2.0):  # feasible (inactive / active), infeasible
        step, half, nu = pcpo_step(torch.tensor(x_g), q, torch.tensor(a), torch.tensor(np.linalg.solve(L, a)), c, delta)
        # the paper's closed form: θ_k + √(2δ/gᵀH⁻¹g) H⁻¹g − max(0, (√(2δ/gᵀH⁻¹g) aᵀH⁻¹g + c)/aᵀL⁻¹a) L⁻¹a
        l_inv_a = np.linalg.solve(L, a)
        coef = max(0.0, (np.sqrt(2 * delta / q) * a @ x_g + c) / (a @ l_inv_a))
        np.testing.assert_allclose(step.numpy(), half_cf - coef * l_inv_a, rtol=1e-10, atol=1e-12)
        assert nu == pytest.approx(coef, rel=1e-10, abs=1e-12)
        # the two QPs of the paper solved by cvxpy: the trust-region step, then the projection
        x = cp.Variable(n)
        cvx(cp.Maximize(g @ x), [0.5 * cp.quad_form(x, cp.psd_wrap(h)) <= delta])
        np.testing.assert_allclose(half.numpy(), x.value, atol=1e-4 * np.linalg.norm(x.value))
        y = cp.Variable(n)
        cvx(cp.Minimize(0.5 * cp.quad_form(y - half.numpy(), cp.psd_wrap(L))), [a @ y + c <= 0])
        np.testing.assert_allclose(step.numpy(), y.value, atol=1e-5 * max(1.0, np.linalg.norm(y.value)))
        assert a @ step.numpy() + c <= 1e-9  # on the linearised constraint set
        if coef > 0:
            assert a @ step.numpy() + c == pytest.approx(0.0, abs=1e-9)  # projected onto its boundary
        else:
            np.testing.assert_array_equal(step.numpy(), half.numpy())  # already inside: unchanged
    # the projection alone, on a point outside the half-space, with a diagonal metric
    y, nu = project_to_halfspace(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), 0.0)
    assert nu == 2.0 and y.tolist() == [0.0, 1.0]


def test_pcpo_with_a_limit_that_cannot_bind_is_trpo():
    host, env = env_spec()
    batches = [host.rollout(GaussianPolicy(1, 1, [16], init_log_std=0.0).export_numpy(), 60)[0] for _ in range(2)]
    trpo = TRPO(TRPO.Params(hidden=[16, 16]), env, cost_limit=1e6, device=CPU, seed=0)  # λ = 0
    ref = [trpo.update([b]) for b in batches]  # (each learner seeds the global RNG: one at a time)
    for metric in ("kl", "l2"):
        # with CPO's acceptance rule (a feasible step must improve the reward surrogate), as TRPO's search
        pcpo = PCPO(PCPO.Params(hidden=[16, 16], metric=metric, improvement_required=True), env,
                    cost_limit=1e6, device=CPU, seed=0)
        out = [pcpo.update([b]) for b in batches]
        assert all(o["pcpo/nu"] == 0.0 and o["step_accepted"] == 1.0 for o in out)
        assert [o["step_fraction"] for o in out] == [r["step_fraction"] for r in ref]
        torch.testing.assert_close(flat_params(pcpo.policy), flat_params(trpo.policy), rtol=0, atol=0)


def test_pcpo_infeasible_update_decreases_the_cost_surrogate():
    host, env = env_spec()
    batches = [host.rollout(GaussianPolicy(1, 1, [16], init_log_std=0.0).export_numpy(), 60)[0] for _ in range(2)]
    for metric, line_search in (("kl", True), ("l2", True), ("kl", False)):
        learner = PCPO(PCPO.Params(hidden=[16, 16], metric=metric, line_search=line_search), env,
                       cost_limit=0.0, device=CPU, seed=0)
        learner.update([batches[0]])
        out = learner.update([batches[1]])
        assert out["pcpo/c"] > 0 and out["pcpo/projected"] == 1.0, out
        assert out["loss_cost"] < out["loss_cost_before"]  # the linearised constraint pulls the cost down
        if line_search:
            assert out["kl"] <= learner.p.target_kl * (1 + learner.p.kl_tolerance)
        else:
            assert out["step_fraction"] == 1.0  # the paper's step, as it is


# -- resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [CPPOPID, RCPO, FOCOPS, CUP, PCPO, PPOLag, TRPOLag])
def test_state_dict_resumes_identically(cls):
    """Also PPO-Lag's and TRPO-Lag's Adam multiplier: its moments and cost window resume."""
    host, env = env_spec()
    batches = [host.rollout(GaussianPolicy(1, 1, [16], init_log_std=-0.5).export_numpy(), 40)[0] for _ in range(3)]
    kw = {"critic_epochs": 2} if cls in (PCPO, TRPOLag) else {"epochs": 2, "minibatch_size": 64}
    if cls is CUP:
        kw["projection_epochs"] = 2
    p = cls.Params(hidden=[8, 8], **kw)
    a = cls(p, env, 8.0, CPU, seed=1)
    a.update([batches[0]])
    if cls is not PCPO:
        a.phase("dual", {"episode_cost": 30.0})  # the multiplier's state (PID integral, EMA) resumes too
    sd = copy.deepcopy(a.state_dict())
    out_a = [a.update([b]) for b in batches[1:]]
    b = cls(p, env, 8.0, CPU, seed=2)
    b.load_state_dict(sd)
    out_b = [b.update([x]) for x in batches[1:]]
    for k, v in a.state_dict()["policy"].items():
        torch.testing.assert_close(v, b.state_dict()["policy"][k], rtol=0, atol=0)
    assert out_a == out_b
    if cls is not PCPO:
        for cost in (3.0, 50.0, 0.0):
            assert a.phase("dual", {"episode_cost": cost}) == b.phase("dual", {"episode_cost": cost})


# -- end to end on Ray ----------------------------------------------------------------------------

def test_focops_improves_return():
    """16,000 env steps of the shipped config (learner and env host in this process)."""
    from tests.inprocess import column, run_in_process

    rows = run_in_process("focops/FunctionEnv-v0", 1e6, 8)
    ret = column(rows, "return")
    assert (column(rows, "lam") == 0).all()  # far below the limit: ν stays at 0
    assert (column(rows, "final_kl") <= 0.1).all()
    assert ret[-2:].mean() > ret[:2].mean() + 2.0, ret.round(2).tolist()


# -- OmniSafe's PPO-Lag options: linear lr decay, critic L2 norm ----------------------------------

def test_policy_lr_decays_linearly_and_resumes():
    """``lr_decay_updates`` N: update k (from 0) steps with policy_lr (1 − k/N), OmniSafe's LinearLR
    from 1 to 0 over its epochs; the clock is checkpointed."""
    host, env = env_spec()
    batches = [host.rollout(GaussianPolicy(1, 1, [16], init_log_std=0.0).export_numpy(), 40)[0] for _ in range(5)]
    p = PPOLag.Params(hidden=[8], epochs=1, minibatch_size=160, lr_decay_updates=4, policy_lr=4e-4)
    a = PPOLag(p, env, 8.0, CPU, seed=0)
    lrs = [a.update([b])["policy_lr"] for b in batches[:2]]
    b = PPOLag(p, env, 8.0, CPU, seed=0)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    lrs += [b.update([x])["policy_lr"] for x in batches[2:]]
    assert lrs == pytest.approx([4e-4, 3e-4, 2e-4, 1e-4, 0.0])
    assert PPOLag(PPOLag.Params(hidden=[8], epochs=1), env, 8.0, CPU, seed=0).update([batches[0]])["policy_lr"] == 3e-4


def test_critic_norm_penalty_is_omnisafes_l2_term():
    """L_V + c Σ‖θ‖² over both critics' parameters (OmniSafe's use_critic_norm, c = 0.001)."""
    _host, env = env_spec()
    learner = PPOLag(PPOLag.Params(hidden=[8], critic_norm_coef=0.001), env, 8.0, CPU, seed=0)
    z, ret_r, ret_c = torch.randn(32, 1), torch.randn(32), torch.randn(32)
    with torch.no_grad():
        mse = ((learner.v_r(z).squeeze(-1) - ret_r) ** 2).mean() + ((learner.v_c(z).squeeze(-1) - ret_c) ** 2).mean()
        l2 = sum((w ** 2).sum() for w in [*learner.v_r.parameters(), *learner.v_c.parameters()])
    loss, stepped = learner.critic_update(z, ret_r, ret_c)
    assert stepped and loss == pytest.approx((mse + 0.001 * l2).item(), rel=1e-6)
