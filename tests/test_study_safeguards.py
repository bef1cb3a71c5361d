"""`saferl study safeguards`: the metric definitions on hand-made curves, a small real study, and
SHAC's settings for the SafeGBPO tasks (the loss per step, gradient norms under the clip, many
safeguarded updates without a violation)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from saferl.tools.studies.safeguards import bootstrap_ci, shac_in_process, smooth, steps_to_band


def test_steps_to_band_is_where_the_curve_stays_within_5_percent():
    x = [10, 20, 30, 40, 50, 60]
    r = [-500, -120, -104, -90, -101, -100]  # enters the band at 30, leaves at 40, stays from 50
    assert steps_to_band(x, r, 0.05) == 50
    assert steps_to_band(x, [-100, -100, -100], 0.05) == 10
    assert steps_to_band([], [], 0.05) is None


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 3, 5, 7], 2) == [1, 2, 4, 6]


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(-10, 2, 20).tolist(), rng.normal(-10, 2, 2000).tolist()
    lo, hi = bootstrap_ci(small)
    assert lo < np.mean(small) < hi
    lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 4  # ~1/sqrt(100) of the width
    assert bootstrap_ci([1.0]) is None


@pytest.mark.slow
def test_safeguards_study_end_to_end(ray_session, tmp_path):
    """SHAC and PPO, unsafe and through the ray mask, one seed each, a few episodes: every output is
    written, safeguarded runs have zero violations and the unsafe SHAC run has some."""
    from saferl.cli import main

    out = tmp_path / "study"
    rc = main(["study", "safeguards", "--variants", "none,RM", "--algos", "shac,ppo", "--seeds", "1",
               "--budget", "shac=9600,ppo=9600", "--eval-episodes", "4", "--out", str(out)])
    assert rc == 0
    for name in ("table.md", "runs.csv", "curves.csv", "curves.png", "study.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs)
    for r in runs:
        if r["variant"] == "RM":
            assert float(r["train_violations"]) == 0 and float(r["eval_violations"]) == 0, r
    unsafe = [float(r["train_violations"]) for r in runs if r["variant"] == "none"]
    assert max(unsafe) > 0, "unsafe training should leave the RCI set at least once"
    text = (out / "table.md").read_text()
    assert "| RM | SHAC |" in text and "| none | PPO |" in text
    assert "Safeguarded runs with a violation: none." in text


def test_shac_loss_per_step_divides_the_window_gradient_by_h():
    """``loss_per_step`` (SHAC's −1/(Nh) Σ ..., the reference's loss): the policy step and the
    reported (clipped) gradient norm use g/h for a window of h steps; off, the window sum."""
    from saferl.learners.base import EnvSpec
    from saferl.learners.shac_lag import SHAC

    env = EnvSpec(obs_dim=1, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=100)
    norms, steps = {}, {}
    for per_step in (False, True):
        p = SHAC.Params(hidden=[4], critic_hidden=None, horizon=100, max_grad_norm=1e9, loss_per_step=per_step,
                        lr=1e-3)
        learner = SHAC(p, env, cost_limit=0.0, device=torch.device("cpu"), seed=0)
        n = sum(x.numel() for x in learner.policy.parameters())
        h = 7
        traj = {"obs": torch.zeros(h + 1, 2, 1), "reward": torch.zeros(h, 2), "cost": torch.zeros(h, 2), "t0": 0}
        g = np.random.default_rng(0).normal(size=n)
        res = {"l_r": 0.0, "l_c": 0.0, "j_r": 0.0, "j_c": 0.0, "g": g, "q": np.zeros(n), "n": 2, "traj": traj,
               "obs_count": 2 * h, "obs_mean": np.zeros(1), "obs_var": np.ones(1)}
        before = torch.cat([x.detach().flatten() for x in learner.policy.parameters()])
        norms[per_step] = learner.update([res])["grad_norm"]
        steps[per_step] = torch.cat([x.detach().flatten() for x in learner.policy.parameters()]) - before
        assert learner.opt.state[next(iter(learner.policy.parameters()))]["exp_avg"].abs().sum() > 0
    assert norms[False] == pytest.approx(np.linalg.norm(g), rel=1e-5)
    assert norms[True] == pytest.approx(np.linalg.norm(g) / 7, rel=1e-5)
    # Adam's first step is ±lr whatever the scale: the scale matters through the clip only
    torch.testing.assert_close(steps[True], steps[False], rtol=1e-3, atol=1e-7)


def test_quadrotor_gradient_norms_are_under_the_clip():
    """With the loss per step (the shipped SafeGBPO SHAC config), the policy gradient of real
    Quadrotor windows is below max_grad_norm = 2 (the clip rarely acts, as in the reference);
    as the window sum it is h = 43 times larger and always clipped."""
    after = shac_in_process("shac/SafeGBPOQuadrotor-v0", iterations=3)
    norms = [m["grad_norm"] for m in after]
    assert all(np.isfinite(norms)) and max(norms) < 2.0, norms
    before = shac_in_process("shac/SafeGBPOQuadrotor-v0", ["algo_params.loss_per_step=false"], iterations=1)
    assert before[0]["grad_norm"] == pytest.approx(43 * norms[0], rel=1e-4)  # same first window
    assert before[0]["grad_norm"] > 2.0


def _episode_returns(metrics):
    return [float(np.mean([e["return"] for e in m["episodes"]])) for m in metrics if m["episodes"]]


def _episode_costs(metrics):
    return [e["cost"] for m in metrics for e in m["episodes"]]


def test_safeguarded_shac_on_the_pendulum_improves_without_violations():
    """16 SHAC updates (4 episodes of 4 windows, the shipped config) through the regularised ray
    mask on the Pendulum, in process: every training episode has zero violations, and the return
    of the last episode beats the first one's by a fifth."""
    episodes = 4
    m = shac_in_process("shac/SafeGBPOPendulum-RMReg-v0", iterations=4 * episodes)
    ret, cost = _episode_returns(m), _episode_costs(m)
    assert len(ret) == episodes and len(cost) == 8 * episodes
    assert all(c == 0 for c in cost), cost
    assert ret[-1] > ret[0] + 0.2 * abs(ret[0]), ret


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["BP", "BPReg", "RM", "RMReg", "RMHypReg"])
def test_safeguarded_shac_on_the_pendulum_converges_without_violations_slow(variant):
    """The slow companion: 25 episodes (100 updates): zero violations throughout, and the last
    episodes' return beats the first one's by far."""
    m = shac_in_process(f"shac/SafeGBPOPendulum-{variant}-v0", iterations=100)
    ret, cost = _episode_returns(m), _episode_costs(m)
    assert all(c == 0 for c in cost), cost
    assert np.mean(ret[-3:]) > ret[0] + 0.5 * abs(ret[0]), ret


def test_elu_policy_acts_the_same_in_env_hosts():
    """The SafeGBPO SHAC configs' ELU policy: the numpy policy the env hosts evaluate with gives
    the torch policy's deterministic action (the activation travels with the weights)."""
    from saferl.actors import np_policy
    from saferl.config import load_config
    from saferl.learners.base import EnvSpec
    from saferl.learners.shac_lag import SHAC

    params = load_config("shac/SafeGBPOQuadrotor-v0").learner_params()
    assert params.activation == "elu"
    env = EnvSpec(obs_dim=8, act_dim=2, act_low=[-1, -1], act_high=[1, 1], max_episode_steps=240)
    learner = SHAC(params, env, cost_limit=0.0, device=torch.device("cpu"), seed=0)
    with torch.no_grad():
        for prm in learner.policy.net.parameters():
            prm.normal_(0.0, 0.5)  # (pre-activations on both sides of 0)
    obs = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    act, _, _ = np_policy.act(learner.numpy_policy(), obs, np.random.default_rng(0), deterministic=True)
    with torch.no_grad():
        ref = learner.policy.rsample(torch.as_tensor(obs), None).numpy()
    np.testing.assert_allclose(act, ref, atol=1e-5)
    tanh = dict(learner.numpy_policy(), activation="tanh")
    assert np.abs(np_policy.act(tanh, obs, np.random.default_rng(0), deterministic=True)[0] - ref).max() > 1e-3


def test_the_not_converged_mark_is_explained_only_where_it_is_used():
    from saferl.tools.studies.safeguards import table

    def rec(variant, stuck):
        return {"status": "ok", "base": "SafeGBPOPendulum-v0", "variant": variant, "algo": "shac", "stuck": stuck,
                "steps_to_5pct": 1000, "eval_returns": "[-4.0, -5.0]", "train_violations": 0, "eval_violations": 0,
                "s_per_1k_steps": 1.0, "run_dir": f"runs/{variant}"}

    s = {"seeds": 1, "budget": {"shac": 9600}, "tasks": ["SafeGBPOPendulum-v0"], "variants": ["none", "RM"],
         "algos": ["shac"], "modifications": []}
    converged = table([rec("none", False), rec("RM", False)], s)
    assert "†" not in converged
    stuck = table([rec("none", False), rec("RM", True)], s)
    assert "| RM | SHAC | - | -4.5 [" in stuck and " † |" in stuck and "† no run converged" in stuck
