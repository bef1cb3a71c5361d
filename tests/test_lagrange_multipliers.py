"""The Lagrange multipliers of the ``*_lag`` baselines (``learners/lagrange.py``): OmniSafe's Adam rule
against Adam written out by hand over many dual steps (clamping at 0 included), the cost window,
warm-up and per-gradient-step stepping, the defaults each baseline takes and the named
alternatives, checkpoints, and the multiplier in closed loop driving a cost to its limit."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from saferl.learners.lagrange import (
    AdamLagrange,
    Lagrange,
    LagrangeParams,
    OmniSafeLagrangeParams,
    OmniSafeOffPolicyLagrangeParams,
    PIDLagrange,
    dual_phase,
    make_multiplier,
)


def adam_by_hand(costs, limit, lr, init, upper=1e3, b1=0.9, b2=0.999, eps=1e-8):
    """OmniSafe's update written out: loss −λ (J_C − b), so grad = −(J_C − b); Adam (Kingma & Ba,
    Algorithm 1, torch's ε placement) in float64, then λ clamped to [0, upper]."""
    lam, m, v, out = init, 0.0, 0.0, []
    for t, cost in enumerate(costs, start=1):
        g = -(cost - limit)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        lam = min(max(lam - lr * m_hat / (math.sqrt(v_hat) + eps), 0.0), upper)
        out.append(lam)
    return out


def test_adam_rule_matches_omnisafes_update_by_hand_over_many_steps():
    rng = np.random.default_rng(0)
    # above the limit for a while (λ rises), then below (λ falls and sits clamped at 0), then around it
    costs = [*(60 + 20 * rng.standard_normal(60)), *(5 + rng.standard_normal(200)),
             *(25 + 10 * rng.standard_normal(140))]
    mult = make_multiplier(OmniSafeLagrangeParams(window=0))
    assert isinstance(mult, AdamLagrange) and mult.value == pytest.approx(0.001)
    got = [mult.update(c, 25.0) for c in costs]
    want = adam_by_hand(costs, 25.0, lr=0.035, init=0.001)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert max(got) > 1.0 and min(got[60:260]) == 0.0 and got[259] == 0.0  # it rose; the clamp held it at 0
    # Adam moves λ about lr per step whatever the size of J_C − b (the plain step moved it
    # 0.01 × 104 = 1.04 at J_C = 129): 35 steps at J_C = 129 from 0.001
    big = make_multiplier(OmniSafeLagrangeParams(window=0))
    steps = np.diff([0.001] + [big.update(129.0, 25.0) for _ in range(35)])
    assert np.all(steps <= 0.035 + 1e-6) and np.all(steps > 0.03)


def test_plain_and_pid_rules_stay_available_by_name():
    plain = make_multiplier(OmniSafeLagrangeParams(kind="lagrange", lr=0.01))
    assert type(plain) is Lagrange and plain.value == 0.0  # the plain defaults, not OmniSafe's λ₀
    assert plain.update(129.0, 25.0) == pytest.approx(1.04)
    pid = make_multiplier(OmniSafeOffPolicyLagrangeParams(kind="pid", kp=0.1, ki=0.01, kd=0.0))
    assert isinstance(pid, PIDLagrange) and (pid.p.window, pid.p.warmup, pid.p.per_gradient_step) == (0, 0, False)
    assert pid.update(35.0, 25.0) == pytest.approx(0.1 * 10 + 0.01 * 10)
    with pytest.raises(Exception, match="kind"):
        LagrangeParams(kind="sgd")


def test_cost_window_is_the_last_n_episodes_and_steps_without_new_ones():
    mult = make_multiplier(OmniSafeLagrangeParams(window=4, lr=0.1, init=0.0, kind="lagrange"))
    assert dual_phase(mult, {"episode_cost": None, "episode_costs": []}, 10.0) == {}  # no J_C yet
    assert dual_phase(mult, {"episode_costs": [30.0, 10.0]}, 10.0) == {"lagrange_multiplier": pytest.approx(1.0)}
    # window [10, 30, 50, 70] (the first 30 has left): J_C = 40
    assert dual_phase(mult, {"episode_costs": [50.0, 70.0, 10.0]}, 10.0)["lagrange_multiplier"] == \
        pytest.approx(1.0 + 0.1 * (np.mean([10.0, 50.0, 70.0, 10.0]) - 10.0))
    before = mult.value  # no episode ended: the window's J_C is used again (OmniSafe steps every epoch)
    assert dual_phase(mult, {"episode_cost": None, "episode_costs": []}, 10.0)["lagrange_multiplier"] == \
        pytest.approx(before + 0.1 * (35.0 - 10.0))
    # without a window: only the episodes of this phase, none -> no step
    plain = make_multiplier(LagrangeParams(lr=0.1))
    assert dual_phase(plain, {"episode_cost": 12.0}, 10.0) == {"lagrange_multiplier": pytest.approx(0.2)}
    assert dual_phase(plain, {"episode_cost": None}, 10.0) == {}


def test_off_policy_warmup_and_one_step_per_gradient_step():
    p = OmniSafeOffPolicyLagrangeParams(warmup=3, window=0)
    assert (p.kind, p.lr, p.init, p.per_gradient_step) == ("adam", 1e-5, 0.001, True)
    mult = make_multiplier(p)
    for _ in range(3):  # warm-up phases: λ reported, unchanged
        assert (dual_phase(mult, {"episode_cost": 100.0}, 25.0, steps=2000)
                == {"lagrange_multiplier": pytest.approx(0.001)})
    dual_phase(mult, {"episode_cost": 100.0}, 25.0, steps=2000)
    want = adam_by_hand([100.0] * 2000, 25.0, lr=1e-5, init=0.001)[-1]  # = 2000 OmniSafe updates
    assert mult.value == pytest.approx(want, rel=1e-4) and mult.value == pytest.approx(0.001 + 2000 * 1e-5, rel=1e-3)


def test_checkpoint_resumes_the_adam_moments_window_and_warmup():
    p = OmniSafeLagrangeParams(window=5, warmup=1)
    a = make_multiplier(p)
    for c in (80.0, 60.0, 40.0):
        dual_phase(a, {"episode_costs": [c, c + 5]}, 25.0)
    sd = copy.deepcopy(a.state_dict())
    b = make_multiplier(p)
    b.load_state_dict(sd)
    fresh_moments = make_multiplier(p)
    fresh_moments.value, fresh_moments.costs = a.value, copy.copy(a.costs)
    fresh_moments.phases = a.phases
    seq = [[20.0], [], [10.0, 12.0], [90.0]]
    out_a = [dual_phase(a, {"episode_costs": c}, 25.0) for c in seq]
    out_b = [dual_phase(b, {"episode_costs": c}, 25.0) for c in seq]
    out_c = [dual_phase(fresh_moments, {"episode_costs": c}, 25.0) for c in seq]
    assert out_a == out_b
    assert out_a != out_c  # the moments matter: dropping them would change the resumed run


@pytest.mark.parametrize("algo,kind,lr,init", [
    ("ppo_lag", "adam", 0.035, 0.001), ("trpo_lag", "adam", 0.035, 0.001), ("sac_lag", "adam", 1e-5, 0.001),
    ("td3_lag", "adam", 1e-5, 0.001), ("ddpg_lag", "adam", 1e-5, 0.001),
    ("cup", "lagrange", 0.01, 0.0), ("rcpo", "lagrange", 0.01, 0.0), ("cppo_pid", "pid", 0.035, 0.0),
    ("ppo", "lagrange", 0.035, 0.0), ("trpo", "lagrange", 0.035, 0.0), ("sac", "lagrange", 0.035, 0.0),
    ("td3", "lagrange", 0.035, 0.0), ("ddpg", "lagrange", 0.035, 0.0)])
def test_default_multiplier_of_each_baseline(algo, kind, lr, init):
    """The ``*_lag`` baselines default to OmniSafe's Adam rule, also when a config gives only some
    of the multiplier's fields; the unconstrained ones keep λ = 0."""
    from saferl.registry import get_algo

    params_cls = get_algo(algo).load().Params
    lag = params_cls().lagrange
    assert (lag.kind, lag.lr, lag.init) == (kind, lr, init)
    if kind == "adam":
        assert params_cls(lagrange={"lr": 0.01}).lagrange.kind == "adam"
        assert params_cls(lagrange={"kind": "pid"}).lagrange.window == 0


def test_adam_multiplier_drives_a_cost_to_its_limit_in_closed_loop():
    """A plant whose episode cost falls as λ rises, J_C(λ) = 80 e^{−2λ} + noise, limit 25: the Adam
    rule (OmniSafe's defaults, 50-episode window, 20 episodes per phase) settles λ near
    ln(80/25)/2 ≈ 0.58 and the cost near the limit over 300 phases, in steps of at most lr."""
    rng = np.random.default_rng(1)
    runs = {}
    for kind, lr in (("adam", 0.035), ("lagrange", 0.01)):
        mult, costs, lams = make_multiplier(OmniSafeLagrangeParams(kind=kind, lr=lr, window=50)), [], []
        for _ in range(300):
            episodes = list(80 * math.exp(-2 * mult.value) + 3 * rng.standard_normal(20))
            costs.append(float(np.mean(episodes)))
            lams.append(dual_phase(mult, {"episode_costs": episodes}, 25.0)["lagrange_multiplier"])
        runs[kind] = (np.array(costs), np.array(lams))
    costs, lams = runs["adam"]
    assert costs[:5].mean() > 60 and abs(costs[-100:].mean() - 25.0) < 3.0, costs[-100:].mean()
    assert abs(lams[-100:].mean() - math.log(80 / 25) / 2) < 0.1
    assert np.abs(np.diff([0.001, *lams])).max() <= 0.035 + 1e-6  # bounded steps
    # the plain step's first move at J_C ≈ 80 is ≈ 0.55: a jump the Adam rule never makes
    assert runs["lagrange"][1][0] > 0.5


def test_reproduces_the_multipliers_omnisafe_logged():
    """OmniSafe 0.5 PPOLag on SafetyPointGoal1-v0, seed 0, 2,000 steps per epoch (two 1000-step
    episodes), run through ``saferl/tools/studies/reference_omnisafe.py``: its first two epochs logged
    Metrics/EpCost 159.5 and 157.0 (the 50-episode window) and Metrics/LagrangeMultiplier
    0.03599999 and 0.07098134. The default PPO-Lag multiplier fed the same episodes gives the same λ."""
    from saferl.learners.ppo_lag import PPOLag

    mult = make_multiplier(PPOLag.Params().lagrange)
    got = [dual_phase(mult, {"episode_costs": eps}, 25.0)["lagrange_multiplier"]
           for eps in ([159.5, 159.5], [154.5, 154.5])]  # window means 159.5, then 157.0
    assert got == pytest.approx([0.03599999, 0.07098134], abs=1e-7)


def test_every_algorithm_with_a_dual_phase_keeps_its_multiplier_in_the_one_mixin():
    """The learners the coordinator's ``dual`` phase steps all derive from ``LagrangianLearner``
    (λ built, stepped and checkpointed in one place), and no other learner has a ``phase_dual``
    (the unconstrained variants derive from their Lagrangian version, with λ never stepped)."""
    from saferl import registry
    from saferl.learners.lagrange import LagrangianLearner

    for name, spec in registry.ALGORITHMS.items():
        cls = spec.load()
        if "dual" in spec.phases:
            assert issubclass(cls, LagrangianLearner), name
        assert issubclass(cls, LagrangianLearner) == hasattr(cls, "phase_dual"), name


def test_per_gradient_step_on_a_learner_without_gradient_steps_to_count_is_refused():
    """``per_gradient_step`` counts the off-policy learners' gradient steps; an on-policy learner
    has none between dual phases, so λ would never move: a one-line error, not a silent no-op."""
    from saferl.learners.base import EnvSpec
    from saferl.learners.ppo_lag import PPOLag

    spec = EnvSpec(obs_dim=3, act_dim=1, act_low=[-1.0], act_high=[1.0], max_episode_steps=10)
    params = PPOLag.Params(lagrange={"per_gradient_step": True})
    with pytest.raises(ValueError, match=r"^lagrange.per_gradient_step: PPOLag takes no gradient steps"):
        PPOLag(params, spec, 0.0, "cpu", 0)
