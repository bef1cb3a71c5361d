"""FAC-SIS (seed 004) against independent computations: the safety index by hand and its
gradient by finite differences, the custom point/hazard task's dynamics and distributions,
the three timescales firing exactly at their gradient-step intervals (the coordinator's clock
across updates), FAC's fixed index, exact resume, and a short run on the local Ray cluster."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saferl.config import ConfigError, load_config
from saferl.envs.point_hazard import DISTRIBUTIONS, GOAL, PointHazardEnv, geometry_dim
from saferl.learners.base import EnvSpec
from saferl.learners.fac_sis import FAC, FACSIS
from saferl.learners.safety_index import IndexParams, SafetyIndex
from tests.conftest import needs_sg

pytestmark = pytest.mark.usefixtures("one_thread")


def geometry_obs(p, v, hazards, prefix=3):
    """An observation whose tail is the geometry of robot p, v and hazards [(x, y, r)]."""
    tail = [*p, *v, *[x for h in hazards for x in h]]
    return torch.tensor([[0.5] * prefix + tail], dtype=torch.float64)


def test_safety_index_by_hand(float64):
    idx = SafetyIndex(IndexParams(preset=None, sigma=0.2, k=0.7, n=1.5), n_hazards=2)
    p, v = (0.0, 0.0), (0.0, 1.0)
    hazards = [(0.0, 2.0, 0.5), (3.0, 0.0, 0.4)]  # one ahead (approached), one to the side
    phi = idx.phi(geometry_obs(p, v, hazards)).item()
    d1, d1_dot = 2.0, -1.0  # moving straight at it
    d2, d2_dot = 3.0, 0.0
    by_hand = max(0.2 + 0.5 ** 1.5 - d1 ** 1.5 - 0.7 * d1_dot, 0.2 + 0.4 ** 1.5 - d2 ** 1.5 - 0.7 * d2_dot)
    assert phi == pytest.approx(by_hand, rel=1e-12)
    # φ0 = d_min − d: positive exactly inside a hazard
    zero = SafetyIndex(IndexParams(preset="zero"), n_hazards=1)
    assert zero.phi(geometry_obs((0.0, 0.0), (1.0, 0.0), [(0.3, 0.0, 0.5)])).item() == pytest.approx(0.2)
    # Δφ = φ(s') − max(φ(s) − η_D, 0)
    s, s2 = geometry_obs(p, v, hazards), geometry_obs((0.0, 0.1), v, hazards)
    assert idx.delta(s, s2).item() == pytest.approx(idx.phi(s2).item() - max(phi, 0.0))


def test_safety_index_loss_gradient_matches_finite_differences(float64):
    torch.manual_seed(0)
    idx = SafetyIndex(IndexParams(preset=None, sigma=0.3, k=1.0, n=2.0, eta_d=0.05), n_hazards=2)
    b = 64
    obs = torch.cat([torch.randn(b, 3), torch.randn(b, 2), torch.randn(b, 2),
                     torch.rand(b, 2) * 2 - 1 + torch.tensor([0.0, 1.0]), torch.full((b, 1), 0.5),
                     torch.rand(b, 2) * 2 - 1 + torch.tensor([1.0, 0.0]), torch.full((b, 1), 0.4)], -1)
    nxt = obs.clone()
    nxt[:, 3:7] += 0.05 * torch.randn(b, 4)
    weights = torch.rand(b)

    def loss():
        return (weights * torch.relu(idx.delta(obs, nxt))).mean()

    grads = torch.autograd.grad(loss(), [idx.sigma, idx.k, idx.n])
    for param, g in zip([idx.sigma, idx.k, idx.n], grads):
        h, orig = 1e-6, param.item()
        with torch.no_grad():
            param.fill_(orig + h)
            up = loss().item()
            param.fill_(orig - h)
            down = loss().item()
            param.fill_(orig)
        assert g.item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_point_hazard_dynamics_reward_cost_and_distributions():
    for dist, ((x0, x1), (y0, y1), (h0, h1)) in DISTRIBUTIONS.items():
        env = PointHazardEnv(dist)
        s = env.initial_state(2000, torch.Generator().manual_seed(dist))
        assert ((s[:, 0] >= x0) & (s[:, 0] <= x1) & (s[:, 1] >= y0) & (s[:, 1] <= y1)).all()
        assert ((s[:, 5] >= h0) & (s[:, 5] <= h1) & (s[:, 4] == 0)).all()
        assert ((s[:, 2] - math.pi / 2).abs() <= math.pi / 4 + 1e-6).all() and (s[:, 3] == 0).all()
    env = PointHazardEnv(1)
    state = torch.tensor([[0.0, 0.3, math.pi / 2, 1.0, 0.0, 0.6]])  # inside the hazard, heading to the goal
    nxt, r, c = env.step(state, torch.tensor([[0.0, 0.5]]))
    v = 1.0 + env.acc_max * 0.5 * env.dt
    assert nxt[0, 3].item() == pytest.approx(v) and nxt[0, 1].item() == pytest.approx(0.3 + v * env.dt)
    dist = GOAL[1] - nxt[0, 1].item()
    assert r.item() == pytest.approx(-abs(v - dist / 5.0), abs=1e-6) and c.item() == 1.0
    obs = env.observe(nxt)
    assert obs.shape == (1, env.obs_dim) and env.obs_dim == 9 + geometry_dim(1)
    np.testing.assert_allclose(obs[0, 9:].numpy(), [0.0, nxt[0, 1].item(), 0.0, v, 0.0, 0.6, 0.5], atol=1e-6)


def spec():
    return EnvSpec(obs_dim=PointHazardEnv.obs_dim, act_dim=2, act_low=[-1, -1], act_high=[1, 1],
                   max_episode_steps=120, n_hazards=1)


def minibatches(k: int, seed: int = 0, b: int = 32) -> list[dict]:
    env, g = PointHazardEnv(1), torch.Generator().manual_seed(seed)
    s = env.initial_state(k * b, g)
    s[:, 1] += torch.rand(k * b, generator=g) * 1.5  # some near the hazard
    s[:, 3] = torch.rand(k * b, generator=g) * 2
    a = torch.rand(k * b, 2, generator=g) * 2 - 1
    s2, r, c = env.step(s, a)
    block = {"obs": env.observe(s), "act": torch.atanh(a.clamp(-0.999, 0.999)), "reward": r, "cost": c,
             "next_obs": env.observe(s2), "discount": torch.full((k * b,), 0.99)}
    return [{key: v.reshape(k, b, *v.shape[1:]).numpy() for key, v in block.items()}]


def fac_params(**kw):
    return FACSIS.Params(hidden=[16, 16], policy_lr=(1e-3, 1e-3), critic_lr=(1e-3, 1e-3),
                         multiplier_lr=(1e-3, 1e-3), index_lr=(1e-2, 1e-2), **kw)


def test_step_phases_fire_exactly_at_their_intervals_across_updates():
    every = {"policy": 3, "multiplier": 12, "safety_index": 24}
    learner = FACSIS(fac_params(), spec(), 0.0, torch.device("cpu"), seed=0)
    zeta0 = dict(learner.index.values())
    pi0 = copy.deepcopy(learner.policy.state_dict())
    out = learner.update(minibatches(2), {"first_step": 1, "every": every})  # gradient steps 1, 2
    assert learner.index.values() == zeta0 and all(torch.equal(v, pi0[k]) for k, v in learner.policy.state_dict().items())
    assert out["updates/policy"] == 0
    out = learner.update(minibatches(46, seed=1), {"first_step": 3, "every": every})  # steps 3..48
    assert (out["updates/policy"], out["updates/multiplier"], out["updates/safety_index"]) == (16, 4, 2)
    assert learner.index.values() != zeta0
    out = learner.update(minibatches(23, seed=2), {"first_step": 49, "every": every})  # 49..71: no index step
    zeta = learner.index.values()
    assert (out["updates/policy"], out["updates/multiplier"], out["updates/safety_index"]) == (23, 5, 2)
    learner.update(minibatches(1, seed=3), {"first_step": 72, "every": every})  # 72 = 3·24
    assert learner.index.values() != zeta and learner.counts == {"policy": 24, "multiplier": 6, "safety_index": 3}


def test_fac_keeps_its_index_and_refuses_to_learn_it():
    learner = FAC(FAC.Params(hidden=[16, 16], safety_index={"preset": "feasible"}), spec(), 0.0,
                  torch.device("cpu"), seed=0)
    learner.update(minibatches(24), {"first_step": 1, "every": {"policy": 3, "multiplier": 12}})
    assert learner.index.values() == pytest.approx({"sigma": 0.04, "k": 1.0, "n": 2.0})
    assert learner.counts["safety_index"] == 0
    with pytest.raises(ConfigError, match="learn_index"):
        load_config("fac/PointHazard-D1-v0", ["algo_params.learn_index=true"]).learner_params()
    with pytest.raises(ConfigError, match="step_phases: fac has no step phase"):
        load_config("fac/PointHazard-D1-v0", ["schedule.step_phases.safety_index=24"])
    with pytest.raises(ConfigError, match="geometry"):
        FACSIS(fac_params(), EnvSpec(obs_dim=3, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=10),
               0.0, torch.device("cpu"), 0)


def test_state_dict_resumes_identically():
    every = {"policy": 3, "multiplier": 12, "safety_index": 24}
    a = FACSIS(fac_params(), spec(), 0.0, torch.device("cpu"), seed=1)
    a.update(minibatches(30), {"first_step": 1, "every": every})
    sd = copy.deepcopy(a.state_dict())
    out_a = a.update(minibatches(30, seed=1), {"first_step": 31, "every": every})
    b = FACSIS(fac_params(), spec(), 0.0, torch.device("cpu"), seed=2)
    b.load_state_dict(sd)
    assert b.update(minibatches(30, seed=1), {"first_step": 31, "every": every}) == out_a


def test_fac_sis_on_ray_lowers_its_violation_rate(ray_session, run_root):
    from saferl.cluster.session import train

    cfg = load_config("fac_sis/PointHazard-D1-v0", [
        f"run_root={run_root}", "total_env_steps=24000", "algo_params.hidden=[64,64]", "algo_params.utd=0.5",
        "algo_params.policy_lr=[3e-4,3e-4]", "algo_params.critic_lr=[1e-3,1e-3]",
        "algo_params.multiplier_lr=[3e-4,3e-4]", "algo_params.alpha_lr=[3e-4,3e-4]",
        "algo_params.index_lr=[1e-3,1e-3]", "schedule.log_every=1"])
    run = train(cfg)
    m = pd.read_csv(run / "metrics.csv")
    learning = m[m["updates/policy"].notna()]  # iterations with updates: from the one that ends the warm-up
    assert learning["env_steps"].iloc[0] == cfg.learner_params().warmup_steps
    g = round(0.5 * 480) * len(learning)  # gradient steps on the coordinator's clock
    last = learning.iloc[-1]
    assert (last["updates/policy"], last["updates/multiplier"], last["updates/safety_index"]) == (g // 3, g // 12, g // 24)
    # the violations rise while the policy learns to head for the goal, then fall as λ(s) and the
    # index catch up (measured on replayed transitions: a lagging, low-noise signal)
    rate = learning["fac/violation_rate"]
    peak = rate[learning["env_steps"] <= 12000].max()
    assert rate.iloc[-3:].mean() < 0.85 * peak, rate.tolist()
    assert last["fac/k"] < 1.0 and last["fac/sigma"] < 0.3  # the index moved (σ, k fall: App. E.3)
    # the feasibility study reads the run's initial and learned index
    from saferl.cli import main

    out = Path(run_root) / "sis"
    assert main(["study", "sis-feasibility", "--run", str(run), "--trajectories", "6", "--grid", "5",
                 "--out", str(out)]) == 0
    rows = pd.read_csv(out / "sis_feasibility.csv").set_index("index")
    assert list(rows.index) == ["φ0", "φ_h", "φ_F", "φ_i", "φ_SIS"]
    assert rows.loc["φ_SIS", ["sigma", "k", "n"]].tolist() == pytest.approx(
        [m["fac/sigma"].iloc[-1], m["fac/k"].iloc[-1], m["fac/n"].iloc[-1]], rel=1e-5)
    assert rows.loc["φ_i", ["sigma", "k", "n"]].tolist() == [0.3, 1.0, 2.0]
    assert (out / "index_trajectory.png").stat().st_size > 0 and (out / "trajectories.png").stat().st_size > 0


def test_feasibility_check_agrees_with_brute_force():
    from saferl.cluster.studies.sis_feasibility import check

    grid_n = 7
    index = SafetyIndex(IndexParams(preset="handcrafted"), n_hazards=1)
    res = check(index, distribution=1, trajectories=8, grid_n=grid_n, seed=0)
    assert res["infeasible_at"], "φ_h has infeasible states on this task (cf. Table 3's 30%)"
    fail = 1 - res["success_rate"]  # a failure is a violation or an infeasible state, or both
    assert max(res["phi0_violation_rate"], res["infeasible_rate"]) <= fail + 1e-9
    assert fail <= res["phi0_violation_rate"] + res["infeasible_rate"] + 1e-9
    env, axis = PointHazardEnv(1), np.linspace(-1, 1, grid_n)

    def safe_actions(state):  # one state, every grid action, one at a time
        out = []
        for a0 in axis:
            for a1 in axis:
                nxt, _, _ = env.step(state[None], torch.tensor([[a0, a1]], dtype=torch.float32))
                out.append(index.delta(env.observe(state[None]), env.observe(nxt)).item() <= 0)
        return out

    for state in res["infeasible_at"][:3]:
        assert not any(safe_actions(state))
    start = env.initial_state(1, torch.Generator().manual_seed(5))[0]  # at rest, far from the hazard
    assert any(safe_actions(start))


@needs_sg()
def test_fac_sis_runs_on_a_safety_gymnasium_task_with_its_geometry(ray_session, run_root):
    """The geometry tail crosses the interpreter boundary: env hosts in the Safety-Gymnasium
    interpreter, replay, learner; the index sees 8 hazards of radius 0.2."""
    from saferl.cluster.session import train

    cfg = load_config("fac_sis/SafetyPointGoal1-SIS-v0", [
        f"run_root={run_root}", "total_env_steps=3000", "steps_per_iteration=1000", "resources.num_env_hosts=1",
        "resources.envs_per_host=2", "algo_params.hidden=[32]", "algo_params.warmup_steps=1000",
        "algo_params.utd=0.05", "algo_params.batch_size=64", "schedule.log_every=1"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    assert m["fac/violation_rate"].notna().sum() == 3  # every iteration updates (the first ends the warm-up)
    assert m["updates/safety_index"].iloc[-1] == 3 * 50 // 24
