"""The trust-region family (TRPO, TRPO-Lag, CPO) against independent computations: the
Fisher-vector product against an explicit KL Hessian and the Gaussian Fisher matrix, CG against
a direct solve, the line search on constructed problems, CPO's step against cvxpy on the same
QCQP (every case, the infeasible recovery included), learner updates on real batches, and a
short TRPO-Lag run on the local Ray cluster."""
from __future__ import annotations

import copy
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

from saferl.actors.env_host import EnvHost
from saferl.batch import ended_episodes
from saferl.learners.base import EnvSpec
from saferl.learners.cpo import CPO, cpo_step
from saferl.learners.networks import GaussianPolicy, flat_params
from saferl.learners.onpolicy_base import advantages, assemble, lagrangian_advantage
from saferl.learners.trpo_lag import TRPOLag
from saferl.learners.trust_region import backtracking_line_search, conjugate_gradient, fisher_vector_product
from saferl.learners.trust_region_base import PolicyAtK, natural_gradient_step


def spd(n: int, rng: np.random.Generator, cond: float = 50.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


# -- Fisher-vector product ----------------------------------------------------------------------

class Wrapped(torch.nn.Module):
    """forward(obs) = (μ, log σ) of the policy, so torch.func can swap its parameters."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, obs):
        return self.policy.net(self.policy.normalised(obs)), self.policy.log_std


def functional_outputs(pol: GaussianPolicy, obs: torch.Tensor):
    """θ ↦ (μ, log σ) of ``pol`` on ``obs`` at flat parameters θ (the order of ``flat_params``)."""
    wrapped = Wrapped(pol)
    names = [f"policy.{n}" for n, _ in pol.named_parameters()]
    shapes = [p.shape for p in pol.parameters()]
    buffers = {f"policy.{n}": b for n, b in pol.named_buffers()}

    def unflat(theta):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    return lambda theta: torch.func.functional_call(wrapped, {**unflat(theta), **buffers}, (obs,))


def test_fvp_equals_explicit_fisher_matrix(float64):
    torch.manual_seed(0)
    pol = GaussianPolicy(3, 2, [4], init_log_std=-0.3)
    pol.norm.update(torch.randn(50, 3) * 2 + 1)  # non-trivial normaliser
    with torch.no_grad():
        pol.log_std.copy_(torch.tensor([-0.3, 0.4]))
    obs = torch.randn(16, 3)
    theta0 = flat_params(pol)
    outputs = functional_outputs(pol, obs)
    mu0, ls0 = (t.detach() for t in outputs(theta0))
    old = torch.distributions.Normal(mu0, ls0.exp())

    def kl(theta):
        mu, ls = outputs(theta)
        return torch.distributions.kl_divergence(old, torch.distributions.Normal(mu, ls.exp())).sum(-1).mean()

    hessian = torch.autograd.functional.hessian(kl, theta0)
    # the Gaussian Fisher matrix: E_s[J_μᵀ diag(σ⁻²) J_μ] + 2 on the log σ diagonal
    j_mu = torch.autograd.functional.jacobian(lambda th: outputs(th)[0], theta0)  # [S, A, P]
    fisher = torch.einsum("sap,a,saq->pq", j_mu, (-2 * ls0).exp(), j_mu) / obs.shape[0]
    offsets = np.cumsum([0] + [p.numel() for p in pol.parameters()])
    i = next(k for k, p in enumerate(pol.parameters()) if p is pol.log_std)
    ls = slice(offsets[i], offsets[i + 1])
    fisher[ls, ls] += 2 * torch.eye(pol.log_std.numel())
    torch.testing.assert_close(hessian, fisher, rtol=1e-8, atol=1e-10)

    damping = 0.1
    fvp = fisher_vector_product(pol, obs, damping)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(theta0.numel(), generator=gen)
        torch.testing.assert_close(fvp(v), hessian @ v + damping * v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(flat_params(pol), theta0)  # the product leaves θ alone
    # OmniSafe's measure, the KL averaged over the 2 action dimensions: half the joint KL's Hessian
    fvp_mean = fisher_vector_product(pol, obs, damping, "mean")
    torch.testing.assert_close(fvp_mean(v), hessian @ v / 2 + damping * v, rtol=1e-8, atol=1e-10)


def test_omnisafe_kl_measure_gives_omnisafes_trpo_step(float64):
    """``kl_action_dims: mean`` with tolerance 0 takes the step OmniSafe 0.5's TRPO takes, computed
    here independently: its Fisher is the Hessian of the KL averaged over action dimensions (explicit
    here, solved directly), the full step √(2δ / xᵀ(H + dI)x)·x, and its line search accepts the
    first of 1, 0.8, 0.8², … at which that averaged KL is ≤ δ and the surrogate did not fall. The
    accepted step's joint KL is then above δ: a trust region n times wider."""
    torch.manual_seed(3)
    pol = GaussianPolicy(3, 2, [4], init_log_std=0.0)
    obs, act, adv = torch.randn(64, 3), torch.randn(64, 2), torch.randn(64)
    theta0 = flat_params(pol).clone()
    outputs = functional_outputs(pol, obs)

    def dist(theta):
        mu, log_std = outputs(theta)
        return torch.distributions.Normal(mu, log_std.exp().expand_as(mu))

    old = dist(theta0)
    old = torch.distributions.Normal(old.loc.detach(), old.scale.detach())
    logp_old = old.log_prob(act).sum(-1)

    def kl_mean(theta):
        return torch.distributions.kl_divergence(old, dist(theta)).mean()

    def surrogate(theta):
        return (torch.exp(dist(theta).log_prob(act).sum(-1) - logp_old) * adv).mean()

    delta, damping = 0.01, 0.1
    g = torch.autograd.functional.jacobian(surrogate, theta0)
    h = torch.autograd.functional.hessian(kl_mean, theta0) + damping * torch.eye(theta0.numel())
    x = torch.linalg.solve(h, g)
    full = torch.sqrt(2 * delta / (x @ h @ x)) * x
    frac = next(0.8 ** i for i in range(15) if kl_mean(theta0 + 0.8 ** i * full) <= delta
                and surrogate(theta0 + 0.8 ** i * full) >= surrogate(theta0))

    p = TRPOLag.Params(target_kl=delta, cg_damping=damping, kl_tolerance=0.0, kl_action_dims="mean",
                       cg_iters=theta0.numel())
    out = natural_gradient_step(PolicyAtK(pol, obs, act, damping, 1, "mean"), adv, p)
    torch.testing.assert_close(flat_params(pol), theta0 + frac * full, rtol=1e-6, atol=1e-9)
    assert out["step_fraction"] == pytest.approx(frac) and out["kl"] <= delta
    joint = torch.distributions.kl_divergence(old, dist(flat_params(pol))).sum(-1).mean().item()
    assert joint == pytest.approx(2 * out["kl"]) and joint > delta


# -- conjugate gradient ---------------------------------------------------------------------------

def test_cg_matches_direct_solve(float64):
    rng = np.random.default_rng(0)
    for n in (5, 20):
        a = torch.tensor(spd(n, rng))
        b = torch.tensor(rng.normal(size=n))
        res = conjugate_gradient(lambda v: a @ v, b, iters=2 * n, tol=1e-12)  # noqa: B023  (called within the iteration)
        assert res.converged and not res.failed and res.iterations <= 2 * n
        torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
        assert res.residual == pytest.approx(0.0, abs=1e-10)
        truncated = conjugate_gradient(lambda v: a @ v, b, iters=2)  # TRPO-style truncation  # noqa: B023  (called within the iteration)
        assert truncated.iterations == 2 and not truncated.converged and not truncated.failed
        assert truncated.residual == pytest.approx(torch.linalg.norm(b - a @ truncated.x).item(), rel=1e-8)


def test_cg_flags_non_positive_curvature(float64):
    res = conjugate_gradient(lambda v: torch.tensor([[1.0, 0.0], [0.0, -1.0]]) @ v, torch.tensor([0.0, 1.0]))
    assert res.failed and not res.converged
    res = conjugate_gradient(lambda v: v * float("nan"), torch.ones(3))
    assert res.failed


# -- line search ----------------------------------------------------------------------------------

def run_search(loss, kl, cost=lambda f: 0.0, **kw):
    tried = []

    def evaluate(frac):
        tried.append(frac)
        return loss(frac), kl(frac), cost(frac)

    return backtracking_line_search(evaluate, 0.0, 0.01, **kw), tried


def test_line_search_returns_the_expected_fraction():
    # KL-limited: KL = 0.05 f² ≤ 0.01·1.5 first at f = 0.8³ (0.8² = 0.64 gives 0.0205)
    res, tried = run_search(lambda f: -f, lambda f: 0.05 * f * f)
    assert res.accepted and res.fraction == pytest.approx(0.8 ** 3) and res.tries == 4
    np.testing.assert_allclose(tried, 0.8 ** np.arange(4))
    # improvement-limited: loss f(f − 0.45) < 0 first at f = 0.8⁴ = 0.4096
    res, _ = run_search(lambda f: f * (f - 0.45), lambda f: 0.0)
    assert res.accepted and res.fraction == pytest.approx(0.8 ** 4) and res.tries == 5
    # ... unless improvement is not required (CPO's recovery): the full step
    res, _ = run_search(lambda f: f * (f - 0.45), lambda f: 0.0, require_improvement=False)
    assert res.fraction == 1.0 and res.tries == 1
    # cost-limited: cost rise f ≤ 0.3 first at f = 0.8⁶
    res, _ = run_search(lambda f: -f, lambda f: 0.0, lambda f: f, cost_before=0.0, max_cost_increase=0.3)
    assert res.accepted and res.fraction == pytest.approx(0.8 ** 6) and res.tries == 7
    # tolerance 0 and another coefficient: 0.05 f² ≤ 0.01 first at f = 0.5² (0.5 gives 0.0125)
    res, _ = run_search(lambda f: -f, lambda f: 0.05 * f * f, kl_tolerance=0.0, backtrack_coef=0.5)
    assert res.fraction == pytest.approx(0.25) and res.tries == 3
    # never acceptable (non-finite loss): failure, fraction 0, every candidate tried
    res, tried = run_search(lambda f: float("nan"), lambda f: 0.0, max_tries=6)
    assert not res.accepted and res.fraction == 0.0 and res.tries == 6 and len(tried) == 6


# -- CPO's step against cvxpy -------------------------------------------------------------------

def cvx_solve(h, g, b, c, delta):
    x = cp.Variable(len(g))
    cons = [0.5 * cp.quad_form(x, cp.psd_wrap(h)) <= delta]
    if b is not None:
        cons.append(b @ x + c <= 0)
    prob = cp.Problem(cp.Maximize(g @ x), cons)
    with warnings.catch_warnings():  # tight tolerances may end "optimal_inaccurate": the test
        warnings.simplefilter("ignore")  # checks the point itself (feasibility, objective, KKT)
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return prob.status.replace("optimal_inaccurate", "optimal"), x.value


def ours(h, g, b, c, delta):
    ht = torch.tensor(h)
    x_g = torch.linalg.solve(ht, torch.tensor(g))
    q = float(g @ x_g.numpy())
    if b is None:
        return cpo_step(x_g, None, q, 0.0, 0.0, c, delta)
    x_b = torch.linalg.solve(ht, torch.tensor(b))
    return cpo_step(x_g, x_b, q, float(g @ x_b.numpy()), float(b @ x_b.numpy()), c, delta)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sign", [1.0, -1.0])  # both signs of r = gᵀH⁻¹b
def test_cpo_step_solves_the_qcqp_like_cvxpy(float64, seed, sign):
    rng = np.random.default_rng(seed)
    n, delta = 6, 0.05
    h = spd(n, rng, cond=20.0)
    g, b = rng.normal(size=n), sign * rng.normal(size=n)
    s = b @ np.linalg.solve(h, b)
    edge = np.sqrt(2 * delta * s)  # |c| at which the constraint plane touches the trust region
    for c, case in [(-2.0 * edge, 3), (-0.3 * edge, 2), (0.0, 1), (0.3 * edge, 1), (0.9 * edge, 1)]:
        sol = ours(h, g, b, c, delta)
        status, x = cvx_solve(h, g, b, c, delta)
        assert status == "optimal" and sol.case == case, (c, sol.case)
        # the same unique optimum: ours feasible, at least as good, and at cvxpy's point (the
        # interior-point solution is accurate to ~1e-5 on the curved trust-region boundary) ...
        step = sol.step.numpy()
        assert 0.5 * step @ h @ step <= delta * (1 + 1e-9) and b @ step + c <= 1e-9
        assert g @ step >= g @ x - 1e-8
        np.testing.assert_allclose(step, x, atol=1e-4 * np.linalg.norm(x))
        # ... and exactly a KKT point: g − νb = λHx, λ, ν ≥ 0, complementary slackness
        assert sol.lam > 0 and sol.nu >= 0
        np.testing.assert_allclose(g - sol.nu * b, sol.lam * h @ step, atol=1e-9 * np.linalg.norm(g))
        assert abs(sol.nu * (b @ step + c)) <= 1e-9 and abs(sol.lam * (0.5 * step @ h @ step - delta)) <= 1e-9
    # infeasible: no point of the trust region satisfies the constraint
    c = 2.0 * edge
    status, _ = cvx_solve(h, g, b, c, delta)
    assert status == "infeasible"
    sol = ours(h, g, b, c, delta)
    assert sol.case == 0
    _, recovery = cvx_solve(h, -b, None, 0.0, delta)  # the step that most decreases bᵀx
    np.testing.assert_allclose(sol.step.numpy(), recovery, atol=1e-4 * np.linalg.norm(recovery))
    # no cost gradient and feasible: the TRPO step, the trust-region problem alone
    sol = ours(h, g, None, -1.0, delta)
    _, x = cvx_solve(h, g, None, 0.0, delta)
    assert sol.case == 4
    np.testing.assert_allclose(sol.step.numpy(), x, atol=1e-4 * np.linalg.norm(x))


# -- learners on real batches -------------------------------------------------------------------

def rollouts(n_batches=1, steps=60, envs=8, seed=0, reset_before=None, obs_norm_per_step=False):
    host = EnvHost("FunctionEnv-v0", envs, seed)
    torch.manual_seed(seed)
    pol = GaussianPolicy(1, 1, [16], init_log_std=0.0).export_numpy()
    pol["obs_norm_per_step"] = obs_norm_per_step
    batches, summaries = [], []
    for i in range(n_batches):
        if i == reset_before:
            host.reset(seed + 1)
        batch, summary = host.rollout(pol, steps)
        batches.append(batch)
        summaries.append(summary)
    return batches, summaries, EnvSpec.of(host.spec())


def surrogate_and_kl(old: GaussianPolicy, new: GaussianPolicy, obs, act, adv):
    with torch.no_grad():
        d_old, d_new = old.dist(obs), new.dist(obs)
        ratio = torch.exp(d_new.log_prob(act).sum(-1) - d_old.log_prob(act).sum(-1))
        kl = torch.distributions.kl_divergence(d_old, d_new).sum(-1).mean().item()
    return -(ratio * adv).mean().item(), kl


def policy_before_norm_update(learner, old_policy):
    """The updated policy with the observation statistics it had during the update (the learner
    refreshes them for the next rollout afterwards)."""
    new = copy.deepcopy(learner.policy)
    new.norm.load_state_dict(old_policy.norm.state_dict())
    return new


def test_trpo_lag_update_decreases_the_surrogate_within_the_trust_region():
    (batch,), _, env = rollouts()
    batches = [batch]
    p = TRPOLag.Params(hidden=[16, 16])
    learner = TRPOLag(p, env, cost_limit=8.0, device=torch.device("cpu"), seed=0)
    learner.policy.norm.update(torch.as_tensor(batch["obs"]))  # as after a first iteration
    learner.multiplier.value = 0.5  # the cost term is in the advantage
    old = copy.deepcopy(learner.policy)
    data = assemble(batches, torch.device("cpu"))
    adv_r, _ = advantages(learner.v_r, old.normalised, data, "reward", p.gamma, p.lam)
    adv_c, _ = advantages(learner.v_c, old.normalised, data, "cost", p.cost_gamma, p.cost_lam)
    adv = lagrangian_advantage(adv_r, adv_c, 0.5).reshape(-1)
    obs, act = data["obs"].reshape(-1, 1), data["act"].reshape(-1, 1)

    out = learner.update(batches)
    new = policy_before_norm_update(learner, old)
    loss_before, kl0 = surrogate_and_kl(old, old, obs, act, adv)
    loss_after, kl = surrogate_and_kl(old, new, obs, act, adv)
    assert kl0 == 0.0 and out["step_accepted"] == 1.0
    assert loss_after < loss_before - 1e-4, (loss_before, loss_after)
    assert 0 < kl <= p.target_kl * (1 + p.kl_tolerance)
    assert out["loss_pi"] == pytest.approx(loss_after, rel=1e-4) and out["kl"] == pytest.approx(kl, rel=1e-4)
    # λ moves on the coordinator's dual phase only
    # (OmniSafe's Adam rule: its first step moves λ by lr in the sign of J_C − b)
    assert learner.phase("dual", {"episode_cost": 20.0}) == {"lagrange_multiplier": pytest.approx(0.5 + p.lagrange.lr)}
    # no episode ended: J_C is still the mean of the 50-episode window, so λ takes its next step
    assert (learner.phase("dual", {"episode_cost": None})
            == {"lagrange_multiplier": pytest.approx(0.5 + 2 * p.lagrange.lr)})


def assert_resumes_identically(cls, p) -> None:
    """A learner restored from a state dict continues exactly as the original (other init seed)."""
    batches, _, env = rollouts(n_batches=3, steps=60)
    dev = torch.device("cpu")
    a = cls(p, env, 8.0, dev, seed=1)
    a.update([batches[0]])
    sd = copy.deepcopy(a.state_dict())
    out_a = [a.update([b]) for b in batches[1:]]
    b = cls(p, env, 8.0, dev, seed=2)
    b.load_state_dict(sd)
    out_b = [b.update([x]) for x in batches[1:]]
    for k, v in a.state_dict()["policy"].items():
        torch.testing.assert_close(v, b.state_dict()["policy"][k], rtol=0, atol=0)
    assert out_a == out_b


@pytest.mark.parametrize("cls,extra", [(TRPOLag, {}), (CPO, {}),
                                       (CPO, {"constraint_scale": "episode", "cost_window": 3})])
def test_state_dict_resumes_identically(cls, extra):
    assert_resumes_identically(cls, cls.Params(hidden=[8, 8], critic_epochs=2, **extra))


def test_cpo_update_respects_the_cost_surrogate_and_kl():
    batches, _, env = rollouts(n_batches=2, steps=60)
    dev = torch.device("cpu")
    # infeasible (limit far below the episode costs): the cost surrogate must not rise
    strict = CPO(CPO.Params(hidden=[16, 16]), env, cost_limit=0.0, device=dev, seed=0)
    strict.update([batches[0]])
    out = strict.update([batches[1]])
    assert out["cpo/c"] > 0 and out["cpo/case"] in (0, 1)
    assert out["loss_cost"] <= out["loss_cost_before"] and out["kl"] <= 0.015
    # a limit that cannot bind: CPO is TRPO on the reward surrogate
    loose = CPO(CPO.Params(hidden=[16, 16]), env, cost_limit=1e6, device=dev, seed=0)
    out = loose.update([batches[0]])
    assert out["cpo/c"] < 0 and out["cpo/case"] == 3 and out["step_accepted"] == 1.0
    assert out["loss_pi"] < out["loss_pi_before"] and 0 < out["kl"] <= 0.015


@pytest.mark.parametrize("obs_norm_per_step", [False, True])
def test_ended_episodes_are_counted_whole_across_batches(obs_norm_per_step):
    # rollouts of 70 steps, episodes of 100: every episode ends in a later batch than it began. The
    # batch's final_cost / final_length (what CPO's and APPO's J_C read) equal the sums over the
    # episode's steps in every batch it spans, counted here from the per-step costs, also when the
    # host normalises observations at every step (the batch's obs then differ from one batch's
    # last_obs to the next) and when the host is reset between batches (evaluation, resume).
    for reset_before in (None, 2):
        batches, summaries, _ = rollouts(n_batches=4, steps=70, envs=4, reset_before=reset_before,
                                         obs_norm_per_step=obs_norm_per_step)
        run_c, run_l, n_ended = np.zeros(4), np.zeros(4, int), []
        for i, (batch, summary) in enumerate(zip(batches, summaries)):
            if i == reset_before:
                run_c[:], run_l[:] = 0.0, 0
            expected = []
            for t in range(70):
                run_c += batch["cost"][t]
                run_l += 1
                for e in np.flatnonzero(batch["terminated"][t] | batch["truncated"][t]):
                    expected.append((t, e, run_c[e], run_l[e]))
                    run_c[e], run_l[e] = 0.0, 0
            costs, lengths = ended_episodes([batch])
            assert [tuple(x) for x in batch["final_idx"]] == [(t, e) for t, e, _, _ in expected]
            np.testing.assert_allclose(costs, [c for *_, c, _ in expected], rtol=1e-5)
            assert lengths == [n for *_, n in expected]
            assert costs == [ep["cost"] for ep in summary["episodes"]]  # the metrics' episodes
            n_ended.append(len(expected))
        assert n_ended == ([0, 4, 4, 0] if reset_before is None else [0, 4, 0, 4])


def test_cpo_constraint_value_on_either_scale_and_window():
    """Per step: c = (J_C − d)/L from the batch's own episodes. OmniSafe's: c = J_C − d, J_C the mean
    of the last n ended episodes (its Metrics/EpCost window), carried across batches; before any
    episode has ended, J_C is estimated from the per-step costs."""
    batches, summaries, env = rollouts(n_batches=4, steps=70, envs=4)
    dev, d = torch.device("cpu"), 8.0
    per_step = CPO(CPO.Params(hidden=[8]), env, d, dev, seed=0)
    windowed = CPO(CPO.Params(hidden=[8], constraint_scale="episode", cost_window=6), env, d, dev, seed=0)
    ended = []
    for batch, summary in zip(batches, summaries):
        eps = [(e["cost"], e["length"]) for e in summary["episodes"]]
        ended = (ended + eps)[-6:]
        c, j_c, length = per_step.constraint_value([batch])
        c_w, j_w, length_w = windowed.constraint_value([batch])
        if not ended:  # first batch: episodes of 100 steps, rollouts of 70
            assert j_c == j_w == pytest.approx(batch["cost"].mean() * 100) and length == length_w == 100
            assert c_w == pytest.approx(j_w - d) and c == pytest.approx((j_c - d) / 100)
            continue
        if eps:
            assert j_c == pytest.approx(np.mean([e[0] for e in eps]), rel=1e-5)
            assert c == pytest.approx((j_c - d) / np.mean([e[1] for e in eps]), rel=1e-5)
        assert j_w == pytest.approx(np.mean([e[0] for e in ended]), rel=1e-5)
        assert length_w == pytest.approx(np.mean([e[1] for e in ended]))
        assert c_w == pytest.approx(j_w - d, rel=1e-5)
    assert len(ended) == 6 and len(windowed.recent) == 6  # 8 episodes ended, the window keeps 6


def test_no_episode_ended_estimate_skips_invalid_steps_for_cpo_and_appo():
    """Before any episode ends, J_C = mean per-step cost × max_episode_steps over the *valid* steps:
    the zeroed steps of an episode the hosts skipped for bad data do not pull it down (CPO once
    averaged them in), and CPO and APPO give the same estimate."""
    from saferl.learners.appo import APPO

    (batch,), _, env = rollouts(n_batches=1, steps=70, envs=4)
    batch = {**batch, "cost": np.full_like(batch["cost"], 0.5), "valid": np.ones_like(batch["cost"], bool)}
    batch["valid"][:, 0], batch["cost"][:, 0] = False, 0.0  # env 0 skipped: its costs zeroed
    assert len(batch["final_cost"]) == 0
    dev = torch.device("cpu")
    _, j_cpo, length = CPO(CPO.Params(hidden=[8]), env, 8.0, dev, seed=0).constraint_value([batch])
    j_appo = APPO(APPO.Params(hidden=[8]), env, cost_limit=8.0, device=dev, seed=0).batch_cost([batch])
    assert length == env.max_episode_steps
    assert j_cpo == j_appo == pytest.approx(0.5 * env.max_episode_steps)


# -- end to end on Ray --------------------------------------------------------------------------

def test_trpo_lag_improves_return():
    """16,000 env steps of the shipped config (learner and env host in this process)."""
    from tests.inprocess import column, run_in_process

    rows = run_in_process("trpo_lag/FunctionEnv-v0", 1e6, 8)
    ret = column(rows, "return")
    assert (column(rows, "lam") == 0).all()
    assert (column(rows, "kl") <= 0.015).all() and (column(rows, "step_accepted") == 1).mean() >= 0.5
    assert ret[-2:].mean() > ret[:2].mean() + 2.0, ret.round(2).tolist()


def test_registered_with_their_phases():
    from saferl.registry import get_algo

    assert get_algo("trpo_lag").phases == ("dual",) and get_algo("trpo").phases == ()
    assert get_algo("cpo").phases == ()  # the constraint is handled inside CPO's step
    assert {get_algo(a).kind for a in ("trpo", "trpo_lag", "cpo")} == {"sampling"}
    assert get_algo("cpo").load() is CPO and get_algo("trpo_lag").load() is TRPOLag


def test_omnisafe_trust_region_holds_over_many_updates():
    """TRPO-Lag with OmniSafe's trust region on a 2-D action task, 25 updates on fresh rollouts:
    every step is accepted inside δ in OmniSafe's averaged KL, and the joint KL of the steps,
    measured here on each batch, is above δ (the paper's measure keeps it below)."""
    host = EnvHost("PointHazard-D1-v0", 8, 0)
    env = EnvSpec.of(host.spec())
    p = TRPOLag.Params(hidden=[32, 32], kl_action_dims="mean", kl_tolerance=0.0, critic_epochs=2)
    learner = TRPOLag(p, env, cost_limit=5.0, device=torch.device("cpu"), seed=0)
    kl, joint = [], []
    for _ in range(25):
        batch, _ = host.rollout(learner.policy.export_numpy(), 120)
        old = copy.deepcopy(learner.policy)
        out = learner.update([batch])
        assert out["step_accepted"] == 1.0
        obs = torch.as_tensor(batch["obs"]).reshape(-1, env.obs_dim)
        with torch.no_grad():
            d_old, d_new = old.dist(obs), policy_before_norm_update(learner, old).dist(obs)
        kl.append(out["kl"])
        joint.append(torch.distributions.kl_divergence(d_old, d_new).sum(-1).mean().item())
    assert max(kl) <= p.target_kl and np.median(kl) > 0.5 * p.target_kl, kl
    np.testing.assert_allclose(joint, 2 * np.array(kl), rtol=1e-4)
    assert np.median(joint) > p.target_kl
