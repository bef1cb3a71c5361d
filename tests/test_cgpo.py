"""CGPO's learner (Algorithm 1): the ratio test of eq 18 on the window that produced g and q
(a forward-only re-roll in the gradient workers), the trust region kept when the observation
normaliser moves, and the adaptive radius over many updates on FunctionEnv (§5.3)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from saferl.actors.gradient_worker import GradientWorker
from saferl.learners.base import EnvSpec
from saferl.learners.cgpo import CGPO, reexpress_first_layer
from saferl.learners.cgpo_math import adapt_radius, solve_subproblem
from saferl.learners.networks import flat_params

SPEC = EnvSpec(obs_dim=1, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=100)


def fake_result(n_params, rng, j_r, j_c, l_r=None, l_c=None, obs_mean=0.0, obs_var=1.0):
    traj = {"obs": torch.zeros(3, 2, 1), "reward": torch.zeros(2, 2), "cost": torch.zeros(2, 2), "t0": 0}
    return {"l_r": j_r if l_r is None else l_r, "l_c": j_c if l_c is None else l_c, "j_r": j_r, "j_c": j_c,
            "g": rng.normal(size=n_params), "q": rng.normal(size=n_params), "n": 2, "traj": traj,
            "obs_count": 4, "obs_mean": np.full(1, obs_mean), "obs_var": np.full(1, obs_var)}


def small_learner(**radius):
    p = CGPO.Params(hidden=[4], critic_hidden=[4], horizon=2, critic_iterations=1,
                    **({"radius": radius} if radius else {}))
    return CGPO(p, SPEC, cost_limit=8.0, device=torch.device("cpu"), seed=0)


def test_ratio_test_uses_the_re_rolled_window_and_adapts_the_radius_by_eq_18():
    learner = small_learner()
    rng = np.random.default_rng(0)
    theta0 = flat_params(learner.policy).double().numpy()
    res = fake_result(theta0.size, rng, j_r=10.0, j_c=9.0, l_r=4.0, l_c=3.0)
    trial = learner.propose([res])
    assert np.array_equal(flat_params(learner.policy).double().numpy(), theta0)  # propose takes no step
    delta, _ = solve_subproblem(res["g"], res["q"], 9.0 - 8.0, learner.p.radius.init)
    gain_r, gain_c = float(res["g"] @ delta), float(res["q"] @ delta)
    # the re-rolled window gains 90% of the predicted ΔL_R and ΔL_C, so ρ = 0.9 and
    # ζ = |b − J_C(θ+δ)| / |J_C(θ+δ) − Ĵ_C(θ+δ)| with J_C(θ+δ) = 9 + 0.9 qᵀδ
    ev = [{"l_r": 4.0 + 0.9 * gain_r, "l_c": 3.0 + 0.9 * gain_c, "n": 2, "seconds": 0.1, "window_seconds": 0.3}]
    out = learner.update([res], evaluations=ev)
    np.testing.assert_allclose(flat_params(learner.policy).double().numpy() - theta0, delta, atol=1e-6)
    trial_policy = copy.deepcopy(learner.policy)
    trial_policy.load_state_dict(trial["policy"])
    np.testing.assert_allclose(flat_params(trial_policy).double().numpy(), theta0 + delta, atol=1e-6)
    zeta = abs(8.0 - (9.0 + 0.9 * gain_c)) / abs(0.1 * gain_c)
    assert out["cgpo/reduction_ratio"] == pytest.approx(0.9, rel=1e-6)
    assert out["cgpo/toleration_ratio"] == pytest.approx(zeta, rel=1e-6)
    assert out["cgpo/radius"] == learner.p.radius.init
    assert learner.radius_sq == adapt_radius(learner.p.radius.init, 0.9, zeta, learner.p.radius)
    assert out["cgpo/radius_next"] == learner.radius_sq and out["time/ratio_test_s"] == 0.1
    # a re-roll that loses what was predicted: ρ < η1 shrinks δ̂ by β1
    before = learner.radius_sq
    res = fake_result(theta0.size, rng, j_r=10.0, j_c=5.0)
    learner.propose([res])
    out = learner.update([res], evaluations=[{"l_r": 10.0 - 1.0, "l_c": 5.0, "n": 2}])
    assert out["cgpo/reduction_ratio"] < 0 and learner.radius_sq == pytest.approx(before * 0.8)
    # without evaluations (no workers) there is no test: δ̂ is kept
    out = learner.update([fake_result(theta0.size, rng, j_r=10.0, j_c=5.0)])
    assert "cgpo/reduction_ratio" not in out and learner.radius_sq == pytest.approx(before * 0.8)
    clone = small_learner()
    clone.load_state_dict(learner.state_dict())
    assert clone.radius_sq == learner.radius_sq and clone.prediction is None


def workers(learner, n_envs=16, shards=2, seed=0):
    per = n_envs // shards
    return [GradientWorker("FunctionEnv-v0", i * per, per, n_envs, seed, learner.arch, "cpu") for i in range(shards)]


def iterate(learner, ws, it):
    """One coordinator iteration without Ray: windows, propose, re-rolls, update."""
    weights = learner.policy_state()
    results = [w.compute(weights, it, learner.horizon)[0] for w in ws]
    trial = learner.propose(results)
    return results, trial, learner.update(results, evaluations=[w.evaluate(trial) for w in ws])


def test_a_re_roll_with_the_same_weights_changes_nothing_and_a_small_step_matches_the_gradient():
    learner = CGPO(CGPO.Params(hidden=[16], critic_hidden=[16], horizon=10, critic_iterations=1), SPEC, 8.0,
                   torch.device("cpu"), 0)
    ws = workers(learner)
    for it in range(3):  # a window inside the episode, with critics and a moved normaliser
        iterate(learner, ws, it)
    weights = learner.policy_state()
    res = [w.compute(weights, 3, learner.horizon)[0] for w in ws]
    for w, r in zip(ws, res):
        ev = w.evaluate({"policy": weights["policy"]})
        assert ev["l_r"] == r["l_r"] and ev["l_c"] == r["l_c"]  # bit-identical: same window, same θ
    g = sum(r["g"] * r["n"] for r in res) / sum(r["n"] for r in res)
    delta = 1e-3 * g / np.linalg.norm(g)
    theta = flat_params(learner.policy)
    trial = copy.deepcopy(learner.policy)
    from saferl.learners.networks import set_flat_params

    set_flat_params(trial, theta + torch.as_tensor(delta, dtype=theta.dtype))
    evs = [w.evaluate({"policy": trial.state_dict()}) for w in ws]
    change = np.mean([e["l_r"] for e in evs]) - np.mean([r["l_r"] for r in res])
    assert change == pytest.approx(float(g @ delta), rel=0.05)  # first order on the same window


def equivalent_params(policy, new_stats, old_stats) -> torch.Tensor:
    """The parameters that compute ``policy``'s function under the statistics ``old_stats``."""
    p = copy.deepcopy(policy)
    reexpress_first_layer(p.net[0], new_stats, old_stats, p.net[0].in_features)
    return flat_params(p).double()


def test_the_executed_step_lies_within_the_trust_region_while_the_normaliser_moves():
    """Over 25 updates on FunctionEnv: the policy executed at k+1 (its parameters under the new
    observation statistics) is θ_k + δ* under the old ones, so ‖δ‖² ≤ δ̂_k; the raw parameter
    change read under the old statistics (no re-expression) would leave the region."""
    learner = CGPO(CGPO.Params(hidden=[16], critic_hidden=[16], horizon=10, critic_iterations=1), SPEC, 8.0,
                   torch.device("cpu"), 0)
    ws = workers(learner)
    obs = torch.linspace(-6, 6, 101)[:, None]
    naive_outside = 0
    for it in range(25):
        norm = learner.policy.norm
        old = (norm.mean.clone(), norm.var.clone())
        theta_k, radius = flat_params(learner.policy).double(), learner.radius_sq
        _, trial, out = iterate(learner, ws, it)
        new = (norm.mean.clone(), norm.var.clone())
        assert not torch.equal(old[0], new[0])  # the statistics moved at every update
        step = equivalent_params(learner.policy, new, old) - theta_k
        assert float(step @ step) <= radius * (1 + 1e-4), (it, float(step @ step), radius)
        assert float(step @ step) == pytest.approx(out["step_norm"] ** 2, rel=1e-3)
        trial_policy = copy.deepcopy(learner.policy)
        trial_policy.load_state_dict(trial["policy"])  # θ_k + δ* with the old statistics
        with torch.no_grad():
            torch.testing.assert_close(learner.policy.net(learner.policy.normalised(obs)),
                                       trial_policy.net(trial_policy.normalised(obs)), rtol=1e-4, atol=1e-5)
        raw = flat_params(trial_policy).double() - theta_k  # the trial's parameters under the new statistics:
        naive = equivalent_params(trial_policy, new, old) - theta_k  # what not re-expressing executes
        assert float(raw @ raw) <= radius * (1 + 1e-4)
        naive_outside += float(naive @ naive) > radius * 1.01
    assert naive_outside >= 5, naive_outside


def run_in_process(updates, radius=None, n_envs=16, seed=0, critic_iterations=1):
    p = CGPO.Params(hidden=[32, 32], critic_hidden=[64, 64], horizon=10, critic_iterations=critic_iterations,
                    **({"radius": radius} if radius else {}))
    learner = CGPO(p, SPEC, 8.0, torch.device("cpu"), seed)
    ws = workers(learner, n_envs=n_envs, seed=seed)
    rows = []
    for it in range(updates):
        results, _, out = iterate(learner, ws, it)
        out["j_r_window"] = float(np.mean([r["j_r"] for r in results]))
        rows.append(out)
    return rows


def test_the_radius_adapts_over_many_updates():
    """§5.3 / eq 18 on FunctionEnv over 50 updates: with the same-window ratio test ρ is close to
    1 while the linear prediction is good, δ̂ follows eq 18 at every update, grows off its
    initial value and does not sit at its floor; with a ceiling far above where the model
    holds it also shrinks again (ρ or ζ below η1)."""
    rows = run_in_process(50, radius={"init": 1e-3, "lower": 1e-4, "upper": 1.0})
    rho = np.array([r["cgpo/reduction_ratio"] for r in rows])
    zeta = np.array([r["cgpo/toleration_ratio"] for r in rows])
    radius = np.array([r["cgpo/radius"] for r in rows])
    params = CGPO.Params(radius={"init": 1e-3, "lower": 1e-4, "upper": 1.0}).radius
    for k in range(len(rows) - 1):
        assert radius[k + 1] == adapt_radius(radius[k], rho[k], zeta[k], params)
    assert radius.max() >= 1e-2 and (radius > 1e-4).mean() > 0.9
    grew, shrank = np.diff(radius) > 0, np.diff(radius) < 0
    assert grew.sum() >= 5 and shrank.sum() >= 2, radius.tolist()
    small = radius[:-1] <= 1e-2  # steps where the linear model is good: ρ near 1
    assert np.median(np.abs(rho[:-1][small] - 1)) < 0.1, rho.tolist()
    # the next window's J_R instead: noise of the window, unrelated to the prediction
    gains = np.array([r["cgpo/predicted_change_r"] for r in rows])
    j_r = np.array([r["j_r_window"] for r in rows])
    rho_next = (j_r[1:] - j_r[:-1]) / gains[:-1]
    iqr = lambda x: np.subtract(*np.percentile(x, [75, 25]))  # noqa: E731
    assert iqr(rho_next) > 5 * iqr(rho), (iqr(rho_next), iqr(rho))


@pytest.mark.slow
def test_the_shipped_radius_settings_leave_the_floor_over_250_updates():
    """The shipped FunctionEnv settings (64 envs, δ̂ in [1e-4, 1e-2]) over 250 updates: δ̂ is at
    its floor in few updates and ρ is near 1. (Where the cost ends is not asserted here: with δ̂
    at its ceiling it oscillates above the limit; docs/results/cgpo.md.)"""
    rows = run_in_process(250, n_envs=64, critic_iterations=4)
    radius = np.array([r["cgpo/radius"] for r in rows])
    rho = np.array([r["cgpo/reduction_ratio"] for r in rows])
    assert (radius <= 1e-4).mean() < 0.1 and np.median(radius) >= 5e-3
    assert np.median(np.abs(rho - 1)) < 0.2


def test_mb_cgpo_re_rolls_the_model_window_from_the_same_real_start():
    """MB-CGPO: ``evaluate`` rolls the last window through the same world model from the same real
    start observations: the same weights give the same L_R, L_C, another policy another."""
    from saferl.actors.gradient_worker import ModelGradientWorker
    from saferl.learners.cgpo import MBCGPO
    from saferl.learners.world_model import WorldModel

    learner = MBCGPO(MBCGPO.Params(hidden=[8], critic_hidden=[8], horizon=5, critic_iterations=1), SPEC, 8.0,
                     torch.device("cpu"), 0)
    worker = ModelGradientWorker("FunctionEnvFloor-v0", 0, 4, 4, 0, learner.arch, [16], "cpu")
    model = {k: v.clone() for k, v in WorldModel(1, 1, [16]).state_dict().items()}
    weights = learner.policy_state()
    worker.collect(weights, 0, 5)
    res = worker.compute(weights, model, 0)
    same = worker.evaluate({"policy": weights["policy"]})
    assert (same["l_r"], same["l_c"], same["n"]) == (res["l_r"], res["l_c"], 4)
    trial = learner.propose([res])
    moved = worker.evaluate(trial)
    assert moved["l_r"] != res["l_r"]
    assert worker.evaluate(None) is None
