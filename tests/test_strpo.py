"""sTRPO ("Safe, Trust Region Policy Optimization for Constrained RL") against independent
computations: the exclusion step against cvxpy on eq 8's QCQP, eq 7's importance-weighted φ
against the exact gradient of the Gaussian KL, the quantile critic's minimiser and CVaR against
closed forms, its target atoms by hand, the "both constraints or the fallback, never neither"
property of real updates, each case's guarantee over many updates on a toy bandit (forward:
eq 8's constraints and the penalised surrogate improved; reverse: KL bound, surrogate improved,
separation from π_unsafe kept; else θ_k) with the logged shares, and both stages end to end on
the local Ray cluster (stage 1 raises the cost, stage 2 brings it down; reuse by path).

``python -m tests.test_strpo [--module FILE]`` prints the toy bandit's forward / reverse / kept
shares per configuration (FILE: another copy of learners/strpo.py, e.g. an older commit's)."""
from __future__ import annotations

import copy
import math

import cvxpy as cp
import numpy as np
import pandas as pd
import pytest
import torch

from saferl.config import ConfigError, load_config
from saferl.learners.base import EnvSpec
from saferl.learners.networks import GaussianPolicy, flat_params
from saferl.learners.quantile import QuantileCritic, cvar, quantile_huber_loss, return_atoms
from saferl.learners.strpo import STRPO, UnsafeTRPO, exclusion_step, least_lambda2
from saferl.learners.trust_region import fisher_vector_product
from tests.test_trust_region import assert_resumes_identically, rollouts, spd

# -- eq 8-9: the exclusion step ---------------------------------------------------------------------

def qcqp(h, g, phi, delta1, delta2):
    x = cp.Variable(len(g))
    prob = cp.Problem(cp.Maximize(g @ x), [0.5 * cp.quad_form(x, cp.psd_wrap(h)) <= delta1, phi @ x >= delta2])
    prob.solve(solver=cp.CLARABEL)
    return prob.status, x.value


@pytest.mark.parametrize("seed", range(4))
def test_exclusion_step_with_adapted_lambda2_solves_eq8_like_cvxpy(float64, seed):
    rng = np.random.default_rng(seed)
    n, delta1 = 6, 0.01
    h = spd(n, rng, cond=20.0)
    g, phi = rng.normal(size=n), rng.normal(size=n)
    ht = torch.tensor(h)
    fvp = lambda v: ht @ v  # noqa: E731
    sup = math.sqrt(2 * delta1 * phi @ np.linalg.solve(h, phi))  # the most exclusion the region allows
    for delta2 in (0.3 * sup, 0.9 * sup):
        ex = exclusion_step(fvp, torch.tensor(g), torch.tensor(phi), 0.0, delta1, delta2, cg_iters=50)
        status, x = qcqp(h, g, phi, delta1, delta2)
        step = ex.step.numpy()
        assert status == "optimal" and ex.feasible
        assert 0.5 * step @ h @ step == pytest.approx(delta1, rel=1e-9) and phi @ step >= delta2
        assert g @ step >= g @ x - 1e-5 * abs(g @ x)  # cvxpy is accurate to ~1e-5 here
        np.testing.assert_allclose(step, x, atol=1e-4 * np.linalg.norm(x))
    # with a large fixed λ2 the step is still in the trust region and excludes more than δ2
    ex = exclusion_step(fvp, torch.tensor(g), torch.tensor(phi), 1e3, delta1, 0.3 * sup, cg_iters=50)
    assert ex.feasible and ex.lambda2 == 1e3 and ex.phi_step > 0.9 * sup
    # δ2 beyond the supremum: eq 8 is infeasible (cvxpy agrees), the step says so
    status, _ = qcqp(h, g, phi, delta1, 1.1 * sup)
    ex = exclusion_step(fvp, torch.tensor(g), torch.tensor(phi), 0.0, delta1, 1.1 * sup, cg_iters=50)
    assert status == "infeasible" and not ex.feasible


def test_least_lambda2_is_the_root_of_the_exclusion_equation():
    q, r, s, d1, d2 = 2.0, -0.5, 1.5, 0.01, 0.1
    lam = least_lambda2(q, r, s, d1, d2)
    excl = lambda lam2: math.sqrt(2 * d1) * (r + lam2 * s) / math.sqrt(q + 2 * lam2 * r + lam2 * lam2 * s)  # noqa: E731
    assert excl(lam) == pytest.approx(d2, rel=1e-9)
    assert excl(0.99 * lam) < d2 < excl(1.01 * lam)
    assert least_lambda2(q, r, s, d1, math.sqrt(2 * d1 * s)) is None  # the supremum is not attained


# -- eq 7: φ ---------------------------------------------------------------------------------------

def test_importance_weighted_phi_estimates_the_kl_gradient(float64):
    torch.manual_seed(0)
    pol, unsafe = GaussianPolicy(2, 1, [8]), GaussianPolicy(2, 1, [8])
    with torch.no_grad():
        pol.log_std.fill_(0.2)
        unsafe.log_std.fill_(-0.1)  # narrower than π_k: the importance weights have finite variance
    obs = torch.randn(8, 2).repeat(50_000, 1)
    learner = STRPO.__new__(STRPO)  # only the φ methods are exercised
    learner.policy, learner.unsafe = pol, unsafe

    class K:
        pass
    k = K()
    k.obs, k.params = obs, list(pol.parameters())
    with torch.no_grad():
        k.act = pol.dist(obs).sample()
        k.logp = pol.log_prob(obs, k.act)
    learner.p = STRPO.Params(exclusion_gradient="importance")
    estimate = learner.exclusion_gradient(k)
    learner.p = STRPO.Params(exclusion_gradient="analytic")
    exact = learner.exclusion_gradient(k)
    # the exact one by hand: ∂/∂μ and ∂/∂log σ of KL(N(μu, σu) ‖ N(μ, σ)) chained through autograd
    mu_u, s_u = unsafe.dist(obs).loc.detach(), unsafe.log_std.exp().detach()
    mu, log_s = pol.net(pol.normalised(obs)), pol.log_std
    kl = (log_s - s_u.log() + (s_u ** 2 + (mu_u - mu) ** 2) / (2 * torch.exp(2 * log_s)) - 0.5).sum(-1).mean()
    by_hand = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(kl, k.params)])
    torch.testing.assert_close(exact, by_hand, rtol=1e-9, atol=1e-12)
    assert torch.linalg.norm(estimate - exact) < 0.05 * torch.linalg.norm(exact)


# -- eq 4: the quantile critic and its CVaR -------------------------------------------------------

def test_quantile_loss_minimiser_gives_the_quantiles_and_cvar(float64):
    torch.manual_seed(0)
    n, alpha = 20, 0.25
    taus = (2 * torch.arange(n, dtype=torch.float64) + 1) / (2 * n)
    theta = torch.zeros(1, n, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    samples = torch.distributions.Exponential(1.0).sample((4096,)).reshape(1, -1)
    for _ in range(1500):
        loss = quantile_huber_loss(theta, samples, taus, kappa=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
    empirical = torch.quantile(samples[0], taus)
    torch.testing.assert_close(theta.detach()[0], empirical, atol=0.03, rtol=0.03)
    # CVaR of the upper 25% of Exp(1): 1 + ln 4 (memorylessness); the 5 top quantiles approximate it
    assert cvar(theta.detach(), alpha).item() == pytest.approx(1 + math.log(4), rel=0.06)
    assert cvar(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), 0.5).item() == 2.5  # mean of the two largest


def test_return_atoms_by_hand(float64):
    critic = QuantileCritic(1, [4], 3)
    batch = {"cost": torch.tensor([[1.0], [2.0], [3.0], [4.0]]), "next_obs": torch.randn(4, 1, 1),
             "end": torch.tensor([[False], [True], [False], [False]]),
             "terminated": torch.tensor([[False], [True], [False], [False]])}
    gamma = 0.9
    atoms = return_atoms(critic, lambda x: x, batch, "cost", gamma)
    with torch.no_grad():
        boot3 = critic(batch["next_obs"][3, 0])  # the batch's end bootstraps
    y3 = 4 + gamma * boot3
    y2 = 3 + gamma * y3
    y1 = torch.full((3,), 2.0)  # terminated: no bootstrap
    y0 = 1 + gamma * y1
    torch.testing.assert_close(atoms[:, 0], torch.stack([y0, y1, y2, y3]))


# -- real updates ------------------------------------------------------------------------------------

def explicit_fisher(policy, obs):
    fvp = fisher_vector_product(policy, obs)
    n = flat_params(policy).numel()
    return torch.stack([fvp(e) for e in torch.eye(n, dtype=flat_params(policy).dtype)])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beyond", [False, True])  # δ2: the paper's 1e-4, or 1.5× the most any step reaches
def test_accepted_steps_satisfy_both_constraints_or_are_the_fallback(seed, beyond):
    batches, _, env = rollouts(n_batches=2, steps=60, seed=seed)
    dev = torch.device("cpu")
    p = STRPO.Params(hidden=[4], exclusion=False, lambda2=0.01, critic_epochs=2)
    learner = STRPO(p, env, 8.0, dev, seed)
    torch.manual_seed(seed + 100)
    learner.unsafe = GaussianPolicy(env.obs_dim, env.act_dim, [4], init_log_std=-0.2)
    learner.unsafe.norm.update(torch.randn(100, 1) * 3)
    learner.update([batches[0]])
    learner.multiplier.value = 0.7
    prep = learner.prepare([batches[1]])
    k = learner.policy_at_k(prep)
    phi, theta_k = learner.exclusion_gradient(k), flat_params(learner.policy).clone()
    h = explicit_fisher(learner.policy, k.obs) + p.cg_damping * torch.eye(theta_k.numel())
    delta2 = 1.5 * math.sqrt(2 * p.target_kl * phi @ torch.linalg.solve(h, phi)) if beyond else 1e-4
    learner.p = p = p.model_copy(update={"delta2": float(delta2)})
    out = learner.policy_step(prep, [batches[1]])
    s = flat_params(learner.policy) - theta_k
    if out["strpo/case"] == 0:  # the step: both constraints of eq 8 hold
        assert 0.5 * s @ h @ s <= p.target_kl * (1 + 1e-4)  # float32 rounding
        assert phi @ s >= delta2 * (1 - 1e-4)
        assert out["kl"] <= p.target_kl * (1 + p.kl_tolerance)
    else:  # the reverse step (eq 10) within the KL bound, or no step at all
        assert out["strpo/case"] in (1, 2)
        assert out["kl"] <= p.target_kl * (1 + p.kl_tolerance)
        if out["strpo/case"] == 2:
            assert s.abs().max() == 0
    if beyond:  # unreachable exclusion: never the forward step
        assert out["strpo/case"] != 0 and out["exclusion_feasible"] == 0.0


# -- many updates on a toy bandit ---------------------------------------------------------------

def bandit_learner(module=None, seed=0, **params):
    """sTRPO on a contextual bandit: s ~ N(0, I₂), reward −(a − s₀/2 − 1/2)², cost sigmoid(−4a),
    π_unsafe = N(−1.5, 0.4²) (where the cost is), λ (the PID multiplier) held at 0.5."""
    mod = module or __import__("saferl.learners.strpo", fromlist=["STRPO"])
    env = EnvSpec(obs_dim=2, act_dim=1, act_low=[-3.0], act_high=[3.0], max_episode_steps=1)
    params = {"cg_iters": 10, **params}
    learner = mod.STRPO(mod.STRPO.Params(hidden=[16], exclusion=False, **params), env, 1.0, torch.device("cpu"), seed)
    unsafe = GaussianPolicy(2, 1, [16], init_log_std=math.log(0.4), normalise_obs=False)
    with torch.no_grad():
        for prm in unsafe.net.parameters():
            prm.zero_()
        unsafe.net[-1].bias.fill_(-1.5)
    learner.unsafe = unsafe.requires_grad_(False)
    learner.multiplier.value = 0.5
    return learner


def bandit_batch(learner, gen, n=256):
    obs = torch.randn(n, 2, generator=gen)
    with torch.no_grad():
        act = learner.policy.dist(obs).sample()
    r = -(act[:, 0] - 0.5 * obs[:, 0] - 0.5) ** 2
    c = torch.sigmoid(-4 * act[:, 0])
    return {"obs": obs, "act": act, "adv_r": r - r.mean(), "adv_c": c - c.mean()}


def bandit_run(iters=60, seed=0, module=None, **params):
    learner = bandit_learner(module, seed, **params)
    gen = torch.Generator().manual_seed(seed + 1)
    return learner, [learner.policy_step(bandit_batch(learner, gen), []) for _ in range(iters)]


BANDIT_CONFIGS = {"λ2 = max(0.01, λ2*) (default)": {}, "λ2 = max(1, λ2*)": {"lambda2": 1.0},
                  "λ2 = 0.01 fixed": {"adapt_lambda2": False}, "λ2 = 1 fixed": {"lambda2": 1.0, "adapt_lambda2": False},
                  "default, KL tolerance 0": {"kl_tolerance": 0.0}}


@pytest.mark.parametrize("name", list(BANDIT_CONFIGS))
def test_every_bandit_update_keeps_its_case_guarantee(name):
    """60 updates: a forward step meets both constraints of eq 8 and raises the penalised
    surrogate; a reverse step stays in the KL bound, raises the surrogate E[ρÃ] and does not
    lower D̄_KL(π_unsafe ‖ π_θ); otherwise θ_k is kept. The one-hot cases and cumulative shares
    are logged each update."""
    params = BANDIT_CONFIGS[name]
    learner, rows = bandit_run(60, **params)
    p = learner.p
    counts = dict.fromkeys(("forward", "reverse", "kept"), 0)
    for i, out in enumerate(rows):
        case = {0: "forward", 1: "reverse", 2: "kept"}[out["strpo/case"]]
        counts[case] += 1
        assert [out[f"strpo/{c}"] for c in counts] == [float(c == case) for c in counts]
        assert [out[f"strpo/{c}_share"] for c in counts] == pytest.approx([n / (i + 1) for n in counts.values()])
        if case == "forward":
            assert out["kl"] <= p.target_kl * (1 + p.kl_tolerance)
            assert out["phi_step"] >= p.delta2 * (1 - 1e-5)
            assert out["loss_pi"] - out["lambda2"] * out["phi_step"] < out["loss_pi_before"]
            if not p.adapt_lambda2:
                assert out["lambda2"] == p.lambda2
        elif case == "reverse":
            assert out["kl"] <= p.target_kl * (1 + p.kl_tolerance)
            assert out["loss_pi"] < out["loss_pi_before"]
            assert out["unsafe_kl"] >= out["unsafe_kl_before"]
        else:
            assert out["kl"] == 0.0 and out["loss_pi"] == out["loss_pi_before"] and out["step_norm"] == 0.0
    assert counts["forward"] >= 0.4 * len(rows), counts
    if params.get("kl_tolerance") == 0.0:  # backtracking with λ2 raised per fraction does find steps
        assert any(o["strpo/case"] == 0 and o["step_fraction"] < 1 for o in rows)


def test_reverse_step_taken_only_when_it_raises_the_surrogate_and_keeps_the_separation():
    """Eq 10's search on a hand-made step: reversing a descent step of E[ρÃ] that also heads
    away from π_unsafe is accepted; reversing the ascent step (against the surrogate) is not."""
    learner = bandit_learner()
    batch = bandit_batch(learner, torch.Generator().manual_seed(3))
    adv = learner.joint_advantage(batch["adv_r"], batch["adv_c"])
    k = learner.policy_at_k(batch)
    ex = exclusion_step(k.fvp, k.gradient(adv), None, 0.0, learner.p.target_kl, 0.0, 15)  # TRPO's ascent step
    loss_before, before = k.measure(adv)[0], learner.unsafe_kl(k)
    # the fallback candidate θ_k − αG for G = −ex.step (a descent direction): the ascent step
    res = learner.reverse_search(k, ex.step, adv, loss_before, before)
    k.move(ex.step, res.fraction)
    assert res.accepted and k.measure(adv)[0] < loss_before and learner.unsafe_kl(k) >= before
    # ... and for G = ex.step (the ascent): θ_k − αG descends, at every fraction: refused
    assert not learner.reverse_search(k, -ex.step, adv, loss_before, before).accepted


def test_without_the_unsafe_term_the_update_is_trpo_without_fallback():
    plain = bandit_learner()
    plain.unsafe = None  # exclusion off: no φ, no eq-10 fallback
    gen = torch.Generator().manual_seed(1)
    cases = [plain.policy_step(bandit_batch(plain, gen), [])["strpo/case"] for _ in range(20)]
    assert set(cases) <= {0, 2} and 0 in cases and plain.case_counts["reverse"] == 0


def test_unsafe_trpo_ascends_the_cvar_cost_advantage():
    batches, _, env = rollouts(n_batches=2, steps=60)
    learner = UnsafeTRPO(UnsafeTRPO.Params(hidden=[16, 16], critic_epochs=2), env, 8.0, torch.device("cpu"), 0)
    learner.update([batches[0]])
    old = copy.deepcopy(learner.policy)
    prep = learner.prepare([batches[1]])
    assert prep["ret_c"].shape == (prep["obs"].shape[0], 32)  # the quantile critic's target atoms
    out = learner.update([batches[1]])
    assert out["step_accepted"] == 1.0 and out["loss_pi"] < out["loss_pi_before"]  # E[ρ z(Â_c)] rose
    assert 0 < out["kl"] <= 0.015 and not torch.equal(old.net[0].weight, learner.policy.net[0].weight)


@pytest.mark.parametrize("cls", [STRPO, UnsafeTRPO])
def test_state_dict_resumes_identically(cls):
    extra = {"exclusion": False} if cls is STRPO else {}
    assert_resumes_identically(cls, cls.Params(hidden=[8, 8], critic_epochs=2, **extra))


# -- both stages end to end --------------------------------------------------------------------------

@pytest.mark.slow
def test_two_stages_on_ray_and_reuse_by_path(ray_session, run_root):
    from saferl.cluster.session import train

    cfg = load_config("strpo/FunctionEnv-v0", [f"run_root={run_root}", "total_env_steps=32000", "cost_limit=4",
                                               "algo_params.unsafe_steps=16000"])
    run = train(cfg)
    stage1 = pd.read_csv(run / "unsafe_policy" / "metrics.csv")
    assert stage1["episode/cost"].iloc[-2:].mean() > stage1["episode/cost"].iloc[:2].mean() + 5  # eq 3 ascends
    m = pd.read_csv(run / "metrics.csv")
    assert (m["strpo/case"] == 0).mean() >= 0.5 and (m["lagrange_multiplier"] > 0).all()
    assert m["episode/cost"].iloc[-2:].mean() < m["episode/cost"].iloc[:2].mean() - 5, m["episode/cost"].tolist()
    assert m["unsafe_kl"].iloc[-1] > m["unsafe_kl_before"].iloc[0]  # moved away from π_unsafe
    resolved = load_config(run / "config.yaml")
    assert resolved.algo_params["unsafe_policy"] == str(run / "unsafe_policy")
    # reuse by path: no second stage 1
    again = train(load_config("strpo/FunctionEnv-v0", [f"run_root={run_root}", "total_env_steps=2000",
                                                       f"algo_params.unsafe_policy={run / 'unsafe_policy'}"]))
    assert not (again / "unsafe_policy").exists() and len(pd.read_csv(again / "metrics.csv")) == 1


def test_two_stages_on_ray_pipeline(ray_session, run_root):
    """The fast companion of the test above: stage 1 runs first and its policy is recorded by
    path in the run's config (tiny budgets; the claims about the stages need the longer run)."""
    from saferl.cluster.session import train

    cfg = load_config("strpo/FunctionEnv-v0", [f"run_root={run_root}", "total_env_steps=4000", "cost_limit=4",
                                               "algo_params.unsafe_steps=2000", "logging.tensorboard=false"])
    run = train(cfg)
    assert len(pd.read_csv(run / "unsafe_policy" / "metrics.csv")) == 1
    m = pd.read_csv(run / "metrics.csv")
    assert len(m) == 2 and {"strpo/case", "unsafe_kl", "lagrange_multiplier"} <= set(m.columns)
    assert load_config(run / "config.yaml").algo_params["unsafe_policy"] == str(run / "unsafe_policy")


def test_bad_unsafe_policy_paths_are_refused(tmp_path, run_root):
    with pytest.raises(ConfigError, match=r"algo_params.unsafe_policy: path .* does not exist"):
        load_config("strpo/FunctionEnv-v0", ["algo_params.unsafe_policy=/nonexistent/run"]).learner_params()
    with pytest.raises(ConfigError, match=r"algo_params.unsafe_policy: .* has no checkpoint"):
        STRPO(STRPO.Params(unsafe_policy=str(tmp_path)), rollouts(steps=2)[2], 8.0, torch.device("cpu"), 0)


def _main(argv=None) -> None:
    """The toy-bandit shares of docs/results/strpo.md (module docstring)."""
    import argparse
    import importlib.util
    import sys

    ap = argparse.ArgumentParser(prog="python -m tests.test_strpo")
    ap.add_argument("--module", help="another copy of learners/strpo.py to measure instead of this one")
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mod = None
    if args.module:
        spec = importlib.util.spec_from_file_location("strpo_other", args.module)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    print(f"{args.module or 'learners/strpo.py'}: {args.updates} updates x {args.seeds} seeds per configuration")
    print("| configuration | forward | reverse | kept | reverse steps that lowered E[ρÃ] | "
          "reverse steps that lowered KL(π_unsafe‖π) | final KL(π_unsafe‖π) (median) |")
    print("|---|---|---|---|---|---|---|")
    for name, params in BANDIT_CONFIGS.items():
        rows = []
        finals = []
        for seed in range(args.seeds):
            _, r = bandit_run(args.updates, seed, mod, **params)
            rows += r
            finals.append(r[-1]["unsafe_kl"])
        cases = np.array([r["strpo/case"] for r in rows])
        rev = [r for r in rows if r["strpo/case"] == 1]
        lowered = sum(r["loss_pi"] > r["loss_pi_before"] for r in rev)
        closer = sum(r["unsafe_kl"] < r["unsafe_kl_before"] for r in rev)
        print(f"| {name} | " + " | ".join(f"{(cases == c).mean():.0%}" for c in (0, 1, 2))
              + f" | {lowered}/{len(rev)} | {closer}/{len(rev)} | {np.median(finals):.3g} |")


if __name__ == "__main__":
    _main()
