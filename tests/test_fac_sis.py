"""FAC-SIS ("Joint Synthesis of Safety Certificate and Safe Control Policy") against independent
computations: the safety index by hand and its gradient by finite differences, the custom
point/hazard task's dynamics, distributions and actuator constants, the three timescales firing
exactly at their gradient-step intervals (the coordinator's clock across updates) and refused when
unlisted, the index's step size against its travel bound over many updates, Fig. 4's per-episode
violations counted by hand, FAC's fixed index, exact resume, the feasibility study's sensitivity
table, and runs on the local Ray cluster."""
from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saferl.config import ConfigError, load_config
from saferl.envs.point_hazard import DISTRIBUTIONS, GOAL, PointHazardEnv, geometry_dim
from saferl.learners.base import EnvSpec
from saferl.learners.fac_sis import FAC, FACSIS, index_lr_for_travel, index_travel_bound
from saferl.learners.safety_index import PRESETS, IndexParams, SafetyIndex
from tests.conftest import needs_sg


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
    return FACSIS.Params(**{"hidden": [16, 16], "policy_lr": (1e-3, 1e-3), "critic_lr": (1e-3, 1e-3),
                            "multiplier_lr": (1e-3, 1e-3), "index_lr": (1e-2, 1e-2), **kw})


def test_step_phases_fire_exactly_at_their_intervals_across_updates():
    every = {"policy": 3, "multiplier": 12, "safety_index": 24}
    learner = FACSIS(fac_params(), spec(), 0.0, torch.device("cpu"), seed=0)
    zeta0 = dict(learner.index.values())
    pi0 = copy.deepcopy(learner.policy.state_dict())
    out = learner.update(minibatches(2), {"first_step": 1, "every": every})  # gradient steps 1, 2
    assert learner.index.values() == zeta0 and all(torch.equal(v, pi0[k])
                                                   for k, v in learner.policy.state_dict().items())
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


def test_fac_on_ray_logs_violations_per_episode(ray_session, run_root):
    """Fast companion of the run below: the coordinator hands the hosts' rollouts to the learner,
    which counts Fig. 4's safe-action violations per finished episode; they are logged beside the
    episode cost as episode/safe_action_violations (one count per 120-step episode)."""
    from saferl.cluster.session import train

    cfg = load_config("fac/PointHazard-D1-v0", [
        f"run_root={run_root}", "total_env_steps=1440", "algo_params.hidden=[16]", "algo_params.utd=0.05",
        "algo_params.warmup_steps=480", "algo_params.batch_size=32", "schedule.log_every=1",
        "logging.tensorboard=false"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    assert m["episode/count"].tolist() == [4, 4, 4]  # 4 envs × one 120-step episode per 480-step iteration
    v = m["episode/safe_action_violations"]
    assert v.notna().all() and ((v >= 0) & (v <= 120)).all() and (v * 4 == (v * 4).round()).all()
    assert "fac/replay_violation_share" in m and "fac/violation_rate" not in m


@pytest.mark.slow
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
    assert (last["updates/policy"], last["updates/multiplier"],
            last["updates/safety_index"]) == (g // 3, g // 12, g // 24)
    # the violations rise while the policy learns to head for the goal, then fall as λ(s) and the
    # index catch up (measured on replayed transitions: a lagging, low-noise signal)
    rate = learning["fac/replay_violation_share"]
    peak = rate[learning["env_steps"] <= 12000].max()
    assert rate.iloc[-3:].mean() < 0.85 * peak, rate.tolist()
    assert last["fac/k"] < 1.0 and last["fac/sigma"] < 0.3  # the index moved (σ, k fall: App. E.3)
    assert m["episode/safe_action_violations"].notna().sum() >= len(m) - 1  # Fig. 4's count, every logged row
    # the feasibility study reads the run's initial and learned index
    from saferl.cli import main

    out = Path(run_root) / "sis"
    assert main(["study", "sis-feasibility", "--run", str(run), "--trajectories", "6", "--grid", "5",
                 "--sens-acc-max", "", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "sis_feasibility.csv").set_index("index")
    assert list(rows.index) == ["φ0", "φ_h", "φ_F", "φ_i", "φ_SIS"]
    assert rows.loc["φ_SIS", ["sigma", "k", "n"]].tolist() == pytest.approx(
        [m["fac/sigma"].iloc[-1], m["fac/k"].iloc[-1], m["fac/n"].iloc[-1]], rel=1e-5)
    assert rows.loc["φ_i", ["sigma", "k", "n"]].tolist() == [0.3, 1.0, 2.0]
    assert (out / "index_trajectory.png").stat().st_size > 0 and (out / "trajectories.png").stat().st_size > 0


def test_feasibility_check_agrees_with_brute_force():
    from saferl.tools.studies.sis_feasibility import check

    grid_n, weak = 7, {"acc_max": 2.0}  # a weaker brake than the default: φ_h infeasible in most episodes
    index = SafetyIndex(IndexParams(preset="handcrafted"), n_hazards=1)
    res = check(index, distribution=1, trajectories=8, grid_n=grid_n, seed=0, constants=weak)
    assert res["infeasible_at"], "φ_h has infeasible states on this task (cf. Table 3's 30%)"
    fail = 1 - res["success_rate"]  # a failure is a violation or an infeasible state, or both
    assert max(res["phi0_violation_rate"], res["infeasible_rate"]) <= fail + 1e-9
    assert fail <= res["phi0_violation_rate"] + res["infeasible_rate"] + 1e-9
    env, axis = PointHazardEnv(1, **weak), np.linspace(-1, 1, grid_n)

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
    assert m["fac/replay_violation_share"].notna().sum() == 3  # every iteration updates (the first ends the warm-up)
    assert m["updates/safety_index"].iloc[-1] == 3 * 50 // 24


# -- actuator constants (Table 3's sensitivity) ------------------------------------------------------

def test_point_hazard_constants_are_parameters_and_validated():
    state = torch.tensor([[0.0, -1.0, math.pi / 2, 0.5, 0.0, 0.6]])
    for acc, vmax in ((2.25, 2.0), (5.0, 2.0), (5.0, 0.6)):
        env = PointHazardEnv(1, acc_max=acc, v_max=vmax)
        nxt, _, _ = env.step(state, torch.tensor([[0.0, 1.0]]))
        assert nxt[0, 3].item() == pytest.approx(min(0.5 + acc * env.dt, vmax))
    assert PointHazardEnv(1).constants()["acc_max"] == 2.25  # the default the study argues for
    with pytest.raises(ValueError, match="acc_max must be > 0"):
        PointHazardEnv(1, acc_max=0.0)


def test_feasibility_study_reports_the_sensitivity(tmp_path, capsys):
    """The sensitivity table repeats φ0 / φ_h / φ_F per (acc_max, v_max); a stronger brake cannot
    make an index less feasible on the same start states, and the defaults are stated."""
    from saferl.cli import main

    out = tmp_path / "sis"
    assert main(["study", "sis-feasibility", "--trajectories", "8", "--grid", "5", "--sens-acc-max", "2,5",
                 "--sens-v-max", "2", "--out", str(out)]) == 0
    sens = pd.read_csv(out / "sensitivity.csv")
    assert len(sens) == 2 * 3 and set(sens["index"]) == {"φ0", "φ_h", "φ_F"}
    rate = sens.set_index(["acc_max", "index"])["success_rate"]
    assert rate[(2.0, "φ0")] == rate[(5.0, "φ0")] == 0.0  # d_min − d: never dissipates at the boundary
    for label in ("φ_h", "φ_F"):
        assert rate[(5.0, label)] >= rate[(2.0, label)]
    assert rate[(2.0, "φ_h")] < 1.0 and rate[(5.0, "φ_h")] == 1.0  # the table is decided by acc_max
    text = (out / "sis_feasibility.md").read_text()
    assert "Sensitivity to the actuator constants" in text and "acc_max 2.25" in text
    assert "These are the task's defaults" in text and "| paper |" in text
    capsys.readouterr()
    assert main(["study", "sis-feasibility", "--sens-v-max", "fast", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("usage error: --sens-v-max") and "\n" not in err and not (tmp_path / "bad").exists()


# -- the three timescales must be configured ---------------------------------------------------------

def test_step_phases_must_be_listed_for_every_phase():
    from saferl.config import CONFIG_DIR, read_config_file

    data = read_config_file(CONFIG_DIR / "fac_sis" / "PointHazard-D1-v0.yaml")  # merged over defaults.yaml
    del data["schedule"]["step_phases"]
    with pytest.raises(ConfigError) as err:
        load_config(data)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config error: schedule.step_phases: fac_sis")
    assert "missing ['policy', 'multiplier', 'safety_index']" in msg
    data["schedule"]["step_phases"] = {"policy": 3, "multiplier": 12}
    with pytest.raises(ConfigError, match=r"missing \['safety_index'\]"):
        load_config(data)
    data["schedule"]["step_phases"]["safety_index"] = 24
    assert load_config(data).schedule.step_phases == {"policy": 3, "multiplier": 12, "safety_index": 24}
    fac = read_config_file(CONFIG_DIR / "fac" / "PointHazard-D1-v0.yaml")
    del fac["schedule"]["step_phases"]["multiplier"]
    with pytest.raises(ConfigError, match=r"schedule.step_phases: fac .*missing \['multiplier'\]"):
        load_config(fac)


# -- the index's step size ---------------------------------------------------------------------------

def test_index_travel_bound_of_the_shipped_configs():
    """Table 4's index step size can move σ, k, n at most 0.056 (300k steps) / 0.375 (2M) — less
    than Table 2's 0.85 from φ_h to φ_SIS in n; every shipped fac_sis config allows about 2."""
    from saferl.config import CONFIG_DIR, DEFAULTS

    table2_distance = max(abs(a - b) for a, b in zip((0.0958, 0.7821, 1.149), (0.3, 1.0, 2.0)))
    assert table2_distance == pytest.approx(0.851)
    for path in sorted(p for p in (CONFIG_DIR / "fac_sis").glob("*.yaml") if p.name != DEFAULTS):
        cfg = load_config(str(path))
        p, every = cfg.learner_params(), cfg.schedule.step_phases["safety_index"]
        g = round(p.utd * (cfg.total_env_steps - p.warmup_steps + cfg.steps_per_iteration))
        paper = index_travel_bound((8e-6, 1e-6), p.lr_anneal_steps, g, every)
        shipped = index_travel_bound(p.index_lr, p.lr_anneal_steps, g, every)
        assert paper < 0.4 < table2_distance < 2.0 < shipped < 2.2, (path.name, paper, shipped)
        assert p.index_lr[0] / p.index_lr[1] == pytest.approx(8.0)  # Table 4's annealing ratio
        assert p.index_lr[0] == pytest.approx(index_lr_for_travel(shipped, p.lr_anneal_steps, g, every)[0])
    ph = load_config("fac_sis/PointHazard-D1-v0")
    assert index_travel_bound((8e-6, 1e-6), 300_000, 298_080, 24) == pytest.approx(0.056, abs=5e-4)
    assert ph.learner_params().index_lr == (3e-4, 3.75e-5)


def test_index_moves_materially_within_a_short_budget():
    """60 index steps, at gradient steps 24, 48, … of a 1440-step budget with the learner's linear
    annealing (the index phase alone: λ(s) from the untrained multiplier net, replayed transitions
    near the hazard). With the step size the shipped rule gives for this budget (travel 2) ζ moves as
    far as Table 2's σ and k did; with Table 4's it cannot move by more than 60 × 8e-6. σ never
    rises (∂J/∂σ ≥ 0, eq 40) and k, n stay in the projection box. With Adam, whose steps are about
    β whatever the gradient (clipped SGD, the default, moves less: its steps follow the violations)."""
    steps = 1440
    data = minibatches(60, seed=3)[0]
    trajectories = {}
    for name, index_lr in (("paper", (8e-6, 1e-6)), ("rule", index_lr_for_travel(2.0, steps, steps, 24))):
        params = fac_params(index_lr=index_lr, lr_anneal_steps=steps, index_optimizer="adam")
        learner = FACSIS(params, spec(), 0.0, torch.device("cpu"), seed=0)
        traj = [learner.index.values()]
        for j in range(steps // 24):
            learner.steps = 24 * (j + 1) - 1  # the annealing clock at gradient step 24 (j + 1)
            learner._anneal()
            b = {k: torch.as_tensor(data[k][j]) for k in ("obs", "next_obs")}
            with torch.no_grad():
                lam = learner.multiplier_net(b["obs"])
            learner.index_step(b, lam)
            traj.append(learner.index.values())
        trajectories[name] = traj
    start = dict(zip(("sigma", "k", "n"), PRESETS["handcrafted"]))
    moved = {n: max(abs(t[-1][key] - start[key]) for key in start) for n, t in trajectories.items()}
    assert 0 < moved["paper"] <= 60 * 8e-6 * 1.01
    assert moved["rule"] >= 0.2, trajectories["rule"][-1]
    sigmas = [t["sigma"] for t in trajectories["rule"]]
    assert all(b <= a + 1e-7 for a, b in itertools.pairwise(sigmas)) and sigmas[-1] < 0.3 - 0.1
    box = IndexParams()
    for t in trajectories["rule"]:
        assert box.k_range[0] <= t["k"] <= box.k_range[1] and box.n_range[0] <= t["n"] <= box.n_range[1]



def test_index_sgd_is_eq_10s_clipped_step():
    """``index_optimizer: sgd``: ζ ← ζ − β min(1, 1/‖G‖) G (eq 10), then the box; Adam (the default)
    moves each coordinate by about β whatever ‖G‖ (its first step is exactly β · sign)."""
    data = minibatches(1, seed=3, b=256)[0]
    b = {k: torch.as_tensor(data[k][0]) for k in ("obs", "next_obs")}
    moves = {}
    for opt in ("sgd", "adam"):
        learner = FACSIS(fac_params(index_optimizer=opt, index_lr=(1e-3, 1e-3)), spec(), 0.0, torch.device("cpu"), 0)
        lam = learner.multiplier_net(b["obs"]).detach()
        zeta = torch.cat([prm.detach().flatten() for prm in learner.index.parameters()])
        loss = (lam * torch.relu(learner.index.delta(b["obs"], b["next_obs"]))).mean()
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(learner.index.parameters()))])
        learner.index_step(b, lam)
        after = torch.cat([prm.detach().flatten() for prm in learner.index.parameters()])
        moves[opt] = (after - zeta, grad)
    step, grad = moves["sgd"]
    assert grad.norm() > 0
    # float32 parameters near 1: their rounding is ~6e-8
    torch.testing.assert_close(step, -1e-3 * grad / max(1.0, grad.norm().item()), rtol=1e-3, atol=1e-7)
    step, grad = moves["adam"]
    torch.testing.assert_close(step[grad != 0].abs(), torch.full_like(step[grad != 0], 1e-3), rtol=1e-3, atol=1e-7)


def test_index_stops_when_the_violations_stop_under_eq_10_not_under_adam():
    """40 index steps on violating transitions (random actions near the hazard), then 40 on
    transitions that cannot violate (s' = s, so Δφ = φ(s) − max(φ(s), 0) ≤ 0): eq 10's clipped SGD
    (the default) leaves ζ exactly where the violations left it; Adam's momentum carries it on."""
    violating = minibatches(40, seed=5, b=64)[0]
    drift = {}
    for opt in ("sgd", "adam"):
        learner = FACSIS(fac_params(index_optimizer=opt, index_lr=(1e-2, 1e-2)), spec(), 0.0, torch.device("cpu"), 0)
        for j in range(40):
            b = {k: torch.as_tensor(violating[k][j]) for k in ("obs", "next_obs")}
            learner.index_step(b, learner.multiplier_net(b["obs"]).detach())
        moved = learner.index.values()
        assert moved != dict(zip(("sigma", "k", "n"), PRESETS["handcrafted"]))
        for j in range(40):
            obs = torch.as_tensor(violating["obs"][j])
            learner.index_step({"obs": obs, "next_obs": obs}, learner.multiplier_net(obs).detach())
        drift[opt] = max(abs(learner.index.values()[key] - moved[key]) for key in moved)
    assert drift["sgd"] == 0.0 and drift["adam"] > 1e-3, drift


def _fragment(obs: torch.Tensor, nxt: torch.Tensor) -> dict:
    """A one-step rollout fragment of ``len(obs)`` envs (as ``EnvHost.rollout`` returns one), no episode ending."""
    zeros = np.zeros((1, len(obs)), np.float32)
    return {"obs": obs[None].numpy(), "last_obs": nxt.numpy(), "final_idx": np.zeros((0, 2), np.int64),
            "final_obs": np.zeros((0, obs.shape[1]), np.float32), "terminated": zeros.astype(bool),
            "truncated": zeros.astype(bool), "valid": ~zeros.astype(bool), "reward": zeros, "cost": zeros}


def test_index_settles_on_the_policys_own_transitions_and_collapses_on_the_replay():
    """Eq 4 / eq 13 evaluate Δφ on the policy's own transitions, with the policy on the fastest
    timescale. Here (with Adam, which moves ζ at its full rate) the policy is exact: before each
    index step it takes, in every state, the action of a 9 × 9 grid that minimises Δφ under the
    index in force, and the learner observes those transitions as its latest rollouts; the replayed
    minibatches hold uniform random actions (an early buffer). By default (``index_data: rollouts``)
    the index makes the policy's constraint hold in all
    but a handful of states (the paper's claim: J(φ) → 0), with k raised and n lowered from φ_h. Fed
    the replay (``index_data: replay``) it runs to the box's corner (σ 0, k 0.5), the trivial
    minimiser, and the policy's violations grow."""
    steps, n = 24 * 150, 2048
    env, g = PointHazardEnv(1), torch.Generator().manual_seed(3)
    s = env.initial_state(n, g)
    s[:, 1] += torch.rand(n, generator=g) * 1.5  # many near the hazard
    s[:, 3] = torch.rand(n, generator=g) * 2
    obs, grid = env.observe(s), torch.cartesian_prod(torch.linspace(-1, 1, 9), torch.linspace(-1, 1, 9))
    nexts = torch.stack([env.observe(env.step(s, a.expand(n, 2))[0]) for a in grid])  # [A, n, d]
    random = nexts[torch.randint(len(grid), (n,), generator=g), torch.arange(n)]
    runs = {}
    for data in ("rollouts", "replay"):
        params = fac_params(index_lr=index_lr_for_travel(2.0, steps, steps, 24), lr_anneal_steps=steps,
                            index_data=data, index_optimizer="adam")
        learner, trajectory = FACSIS(params, spec(), 0.0, torch.device("cpu"), seed=0), []
        for j in range(steps // 24):
            with torch.no_grad():
                deltas = torch.stack([learner.index.delta(obs, nxt) for nxt in nexts])
                own = nexts[deltas.argmin(0), torch.arange(n)]
            assert learner.observe_rollouts([_fragment(obs, own)]) == []
            learner.steps = 24 * (j + 1) - 1
            learner._anneal()
            idx = torch.randint(n, (32,), generator=g)
            b = {"obs": obs[idx], "next_obs": random[idx]}
            learner.index_step(b, learner.multiplier_net(b["obs"]).detach())
            with torch.no_grad():
                violations = (learner.index.delta(obs, own) > 0).float().mean().item()
            trajectory.append((violations, learner.index.values()))
        runs[data] = trajectory
    first, (last_share, last) = runs["rollouts"][0][0], runs["rollouts"][-1]
    assert first > 0.02 and last_share < min(0.005, first / 10), (first, last_share)  # φ_h is not feasible here
    assert last["k"] > 1.0 and last["n"] < 1.9, last  # moved away from φ_h, inside the box
    first, (last_share, last) = runs["replay"][0][0], runs["replay"][-1]
    assert last["sigma"] == 0.0 and last["k"] == pytest.approx(0.5) and last_share >= first, (first, last_share, last)


# -- Fig. 4's quantity: safe-action violations per episode -------------------------------------------

def _phi_by_hand(x, y, vx, vy, hx, hy, r=0.5, sigma=0.3, k=1.0, n=2.0):
    d = math.hypot(hx - x, hy - y)
    d_dot = -(vx * (hx - x) + vy * (hy - y)) / d
    return sigma + r ** n - d ** n - k * d_dot


def _scripted_episode(ys, vs, hazard_y=0.0):
    """States of a robot on the y axis below a hazard at (0, hazard_y), moving up at speeds ``vs``."""
    return [np.array([0.0, y, 0.0, v, 0.0, hazard_y, 0.5], np.float32) for y, v in zip(ys, vs)]


def test_violations_per_episode_counted_by_hand_across_fragments():
    """A scripted env (one robot, geometry only) whose episodes straddle rollout fragments; the
    learner's per-episode count of Δφ > 0 steps equals a count by hand, and an episode skipped for
    bad data is dropped as the hosts drop it."""
    episodes = [  # (states s_0..s_L, skipped?)
        (_scripted_episode([-1.2, -1.1, -1.0, -0.9, -0.8], [1.0] * 5), False),        # approaching: φ rises
        (_scripted_episode([-1.2, -1.15, -1.15, -1.15, -1.15], [1.0, 0.5, 0.0, 0.0, 0.0]), False),  # braking
        (_scripted_episode([-2.0, -1.9, -1.3, -1.25, -1.2], [0.0, 0.0, 1.0, 1.0, 1.0]), False),  # mixed
        (_scripted_episode([-1.2, -1.1, -1.0, -0.9, -0.8], [1.0] * 5), True),         # bad data: skipped
    ]
    by_hand = []
    for states, skipped in episodes:
        phis = [_phi_by_hand(*s[:6]) for s in states]
        count = sum(phis[t + 1] - max(phis[t], 0.0) > 0 for t in range(len(states) - 1))
        if not skipped:
            by_hand.append(count)
    assert by_hand[0] == 4 and by_hand[1] == 0 and 0 < by_hand[2] < 4
    # the transitions of the stream, cut into fragments of 3, 6 and 7 steps (one env)
    prefix = np.zeros(PointHazardEnv.obs_dim - 7, np.float32)
    stream = [(states[t], states[t + 1], t == len(states) - 2, skipped)
              for states, skipped in episodes for t in range(len(states) - 1)]
    batches, i = [], 0
    for size in (3, 6, 7):
        part = stream[i:i + size]
        i += size
        obs = np.stack([np.concatenate([prefix, s]) for s, _, _, _ in part])[:, None]
        end = np.array([[e] for _, _, e, _ in part])
        valid = np.array([[not bad] for _, _, _, bad in part])
        final_idx = np.array([(t, 0) for t, (_, _, e, _) in enumerate(part) if e], np.int64).reshape(-1, 2)
        final_obs = np.stack([np.concatenate([prefix, s2]) for _, s2, e, _ in part if e] or
                             [np.zeros(PointHazardEnv.obs_dim, np.float32)])[:len(final_idx)]
        nxt = part[-1][1] if not part[-1][2] else stream[i][0] if i < len(stream) else part[-1][1]
        batches.append({"obs": obs, "terminated": np.zeros_like(end), "truncated": end, "valid": valid,
                        "reward": np.zeros(end.shape, np.float32), "cost": np.zeros(end.shape, np.float32),
                        "last_obs": np.concatenate([prefix, nxt])[None], "final_idx": final_idx,
                        "final_obs": final_obs})
    assert i == len(stream) == 16
    learner = FACSIS(fac_params(), spec(), 0.0, torch.device("cpu"), seed=0)
    counted = []
    for batch in batches:
        counted += learner.observe_rollouts([batch])
    assert [c["safe_action_violations"] for c in counted] == by_hand
    # resume: the running count of an episode in flight survives a checkpoint
    other = FACSIS(fac_params(), spec(), 0.0, torch.device("cpu"), seed=1)
    learner2 = FACSIS(fac_params(), spec(), 0.0, torch.device("cpu"), seed=0)
    learner2.observe_rollouts([batches[0]])
    other.load_state_dict(copy.deepcopy(learner2.state_dict()))
    assert [c["safe_action_violations"] for c in other.observe_rollouts([batches[1]])] == by_hand[:2]
