"""PDO (Chow et al. 2018, primal-dual policy gradient) and APPO (Dai et al. 2023, augmented-
Lagrangian PPO): the losses against hand-computed closed forms on fixed batches, the multiplier
updates by hand through the dual phase, each learner against PPO-Lag where they must coincide
(PDO = PPO-Lag without the clip; APPO with w = 0 = PPO on z(Â_R)) over several updates, resume,
the shipped configs, and short runs on FunctionEnv-v0 where the cost comes down toward its limit."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from saferl.actors.env_host import EnvHost
from saferl.learners.appo import APPO, appo_loss, augmented_multiplier_step, multiplier_penalty, penalty_weight
from saferl.learners.base import EnvSpec
from saferl.learners.networks import flat_params
from saferl.learners.onpolicy_base import assemble, flat
from saferl.learners.pdo import PDO, pdo_loss
from saferl.learners.ppo_lag import PPOLag
from saferl.registry import get_algo

CPU = torch.device("cpu")
BRAX_TASKS = ("BraxCartPole-v1", "BraxReacher-v0", "BraxHalfCheetahVel-v0", "BraxAntVel-v0")

# A fixed minibatch: ratios on both sides of the clip range 1 ± 0.2, advantages of both signs.
RATIO = torch.tensor([0.5, 1.0, 1.1, 1.5], dtype=torch.float64)
LOGP_OLD = torch.tensor([-1.0, -0.3, -2.0, 0.4], dtype=torch.float64)
LOGP = LOGP_OLD + RATIO.log()
ADV_R = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
ADV_C = torch.tensor([2.0, -1.0, -0.5, 1.0], dtype=torch.float64)


def env_spec(envs: int = 8, seed: int = 0) -> tuple[EnvHost, EnvSpec]:
    host = EnvHost("FunctionEnv-v0", envs, seed)
    return host, EnvSpec.of(host.spec())


# -- registry and configs -------------------------------------------------------------------------

def test_registered_with_dual_phase_and_shipped_configs():
    from saferl.config import load_config

    for name, cls in (("pdo", PDO), ("appo", APPO)):
        spec = get_algo(name)
        assert spec.kind == "sampling" and spec.phases == ("dual",) and spec.load() is cls
        assert issubclass(cls, PPOLag)
        for task in ("FunctionEnv-v0", *BRAX_TASKS):
            cfg = load_config(f"{name}/{task}")
            assert isinstance(cfg.learner_params(), cls.Params) and set(cfg.schedule.phases) == {"dual"}
    # every Table 1 algorithm has a config for every Brax task, on the gradient algorithms' budget
    for task in BRAX_TASKS:
        budget = load_config(f"cgpo/{task}").total_env_steps
        for algo in ("pdo", "appo", "cpo", "cup", "bptt_lag", "shac_lag"):
            cfg = load_config(f"{algo}/{task}")
            assert cfg.total_env_steps == budget and cfg.learner_params() is not None, (algo, task)
            if get_algo(algo).kind == "sampling":  # one episode of every env per iteration
                n = cfg.resources.num_env_hosts * cfg.resources.envs_per_host
                assert cfg.steps_per_iteration == n * cfg.task_spec.max_episode_steps, (algo, task)
    # APPO's σ is the authors' 0.1 at limit 25, scaled to the task's limit
    for task in BRAX_TASKS:
        cfg = load_config(f"appo/{task}")
        assert cfg.learner_params().sigma == pytest.approx(2.5 / abs(cfg.limit))


def test_appo_bad_multiplier_settings_are_one_line_errors():
    from saferl.config import ConfigError, load_config

    for override, field in (("algo_params.lagrange.kind=pid", "lagrange.kind"),
                            ("algo_params.lagrange.lr=0.1", "lagrange.lr"),
                            ("algo_params.sigma=0", "algo_params.sigma")):
        with pytest.raises(ConfigError) as err:
            load_config("appo/FunctionEnv-v0", [override]).learner_params()
        assert field in str(err.value) and "\n" not in str(err.value), str(err.value)


# -- PDO ------------------------------------------------------------------------------------------

def test_pdo_loss_is_the_unclipped_importance_weighted_lagrangian_gradient():
    # L = −mean(ρ Â) with ρ = (0.5, 1, 1.1, 1.5): −(0.5 − 2 + 0.55 + 4.5)/4 = −0.8875 (no clipping:
    # PPO's clipped surrogate would give −(0.5 − 2 + 0.55 + 3.6)/4 = −0.6625)
    loss, ratio = pdo_loss(LOGP, LOGP_OLD, ADV_R)
    assert loss.item() == pytest.approx(-0.8875, rel=1e-12)
    torch.testing.assert_close(ratio, RATIO)
    # at θ = θ_k (ρ = 1) its gradient in log π is −Â/M: the likelihood-ratio policy gradient
    logp = LOGP_OLD.clone().requires_grad_(True)
    pdo_loss(logp, LOGP_OLD, ADV_R)[0].backward()
    torch.testing.assert_close(logp.grad, -ADV_R / 4)


def test_pdo_is_ppo_lag_without_the_clip_over_several_updates():
    """PDO's updates equal PPO-Lag's with a clip range no ratio reaches, batch after batch (same
    seeds, own rollouts, λ > 0 from the start), and differ from PPO-Lag's clipped ones."""
    def run(cls, **kw):
        host, env = env_spec()
        params = cls.Params(hidden=[16], epochs=2, minibatch_size=240, target_kl=10.0,
                            lagrange={"kind": "lagrange", "init": 0.5, "lr": 0.1}, **kw)
        learner = cls(params, env, cost_limit=8.0, device=CPU, seed=3)
        for _ in range(3):
            batch, _ = host.rollout(learner.numpy_policy(), 60)
            learner.update([batch])
            learner.phase("dual", {"episode_cost": 12.0})
        return flat_params(learner.policy), learner.multiplier.value

    pdo, lam = run(PDO)
    unclipped, lam_ppo = run(PPOLag, clip=1e9)
    clipped, _ = run(PPOLag, clip=0.01)
    torch.testing.assert_close(pdo, unclipped, rtol=0, atol=0)
    assert lam == lam_ppo == pytest.approx(0.5 + 3 * 0.1 * 4.0)  # λ ← λ + η(J_C − b), three times
    assert not torch.allclose(pdo, clipped)


# -- APPO: loss and multiplier ---------------------------------------------------------------------

def test_multiplier_penalty_function_and_its_derivative():
    # ψ_σ(t, λ) = λt + σt²/2 where λ + σt ≥ 0, −λ²/(2σ) below; λ = 0.5, σ = 0.25 (switch at t = −2)
    assert multiplier_penalty(2.0, 0.5, 0.25) == pytest.approx(0.5 * 2 + 0.125 * 4)    # 1.5
    assert multiplier_penalty(-4.0, 0.5, 0.25) == pytest.approx(-0.25 / 0.5)           # −0.5
    assert multiplier_penalty(-2.0, 0.5, 0.25) == pytest.approx(-0.5)                  # continuous
    assert penalty_weight(2.0, 0.5, 0.25) == 1.0 and penalty_weight(-4.0, 0.5, 0.25) == 0.0
    # w = ∂ψ/∂t everywhere (central differences over both branches)
    for t in np.linspace(-8, 8, 33):
        h = 1e-6
        fd = (multiplier_penalty(t + h, 0.5, 0.25) - multiplier_penalty(t - h, 0.5, 0.25)) / (2 * h)
        assert fd == pytest.approx(penalty_weight(t, 0.5, 0.25), abs=1e-6), t


def test_appo_loss_closed_form_on_a_fixed_batch():
    # S_R = mean(min(ρÂ_R, clip(ρ, 0.8, 1.2)Â_R)) = (0.5 − 2 + 0.55 + 3.6)/4 = 0.6625
    # S_C = mean(max(ρÂ_C, clip(ρ)Â_C))           = (1.6 − 1 − 0.55 + 1.5)/4 = 0.3875
    # λ = 0.5, σ = 0.25, Ĵ_C = 10, b = 8: t = 2, w = 0.5 + 0.25·2 = 1: L = (−0.6625 + 0.3875)/2
    w = penalty_weight(10.0 - 8.0, 0.5, 0.25)
    loss, ratio, s_r, s_c = appo_loss(LOGP, LOGP_OLD, ADV_R, ADV_C, 0.2, w)
    assert (s_r.item(), s_c.item()) == (pytest.approx(0.6625), pytest.approx(0.3875))
    assert loss.item() == pytest.approx(-0.1375, rel=1e-12)
    torch.testing.assert_close(ratio, RATIO)
    # feasible enough that λ + σt < 0 (Ĵ_C = 4): w = 0, the loss is PPO's reward surrogate alone
    w = penalty_weight(4.0 - 8.0, 0.5, 0.25)
    assert w == 0.0 and appo_loss(LOGP, LOGP_OLD, ADV_R, ADV_C, 0.2, w)[0].item() == pytest.approx(-0.6625)
    # the gradient at θ_k is (−∇S_R + w ∇S_C)/(1 + w): in log π, (−Â_R + w Â_C)/(M (1 + w))
    logp = LOGP_OLD.clone().requires_grad_(True)
    appo_loss(logp, LOGP_OLD, ADV_R, ADV_C, 0.2, 3.0)[0].backward()
    torch.testing.assert_close(logp.grad, (-ADV_R + 3.0 * ADV_C) / (4 * 4.0))


def test_appo_multiplier_steps_by_hand_through_the_dual_phase():
    _, env = env_spec()
    learner = APPO(APPO.Params(hidden=[8], sigma=0.5), env, cost_limit=8.0, device=CPU, seed=0)
    # λ ← max(0, λ + σ(J_C − b)), σ = 0.5, b = 8:
    # 12: 0 + 2 = 2;  10: 2 + 1 = 3;  4: 3 − 2 = 1;  2: 1 − 3 < 0 -> 0;  20: 0 + 6 = 6;  (none);  8: 6
    got = []
    for cost in (12.0, 10.0, 4.0, 2.0, 20.0, None, 8.0):
        out = learner.phase("dual", {"episode_cost": cost})
        got.append(out.get("lagrange_multiplier"))
    assert got == [2.0, 3.0, 1.0, 0.0, 6.0, None, 6.0]
    assert learner.sigma == 0.5  # no growth by default

    # growing penalty ρ = 0.1 and the cap λ ≤ 2.5:
    # 12: λ = 0 + 0.5·4 = 2, σ -> 0.55;  10: λ = 2 + 0.55·2 = 3.1 -> 2.5 (cap), σ -> 0.605;
    # 4: λ = 2.5 − 0.605·4 = 0.08, σ -> 0.6655
    learner = APPO(APPO.Params(hidden=[8], sigma=0.5, sigma_growth=0.1, lagrange={"upper": 2.5}), env,
                   cost_limit=8.0, device=CPU, seed=0)
    got = [learner.phase("dual", {"episode_cost": c}) for c in (12.0, 10.0, 4.0)]
    assert [g["lagrange_multiplier"] for g in got] == [pytest.approx(2.0), pytest.approx(2.5), pytest.approx(0.08)]
    assert [g["appo/sigma"] for g in got] == [pytest.approx(0.55), pytest.approx(0.605), pytest.approx(0.6655)]
    assert augmented_multiplier_step(1.0, -3.0, 0.5) == 0.0


# -- APPO: updates ---------------------------------------------------------------------------------

def test_appo_update_weights_the_cost_by_the_batch_episode_cost():
    """w_k = max(0, λ_k + σ(Ĵ_C − b)) with Ĵ_C the mean cost of the batch's finished episodes (two
    100-step batches of 50: the first ends none, the second ends all 8), and the loss's metrics."""
    host, env = env_spec()
    learner = APPO(APPO.Params(hidden=[16], sigma=0.2, epochs=2, minibatch_size=200), env, cost_limit=8.0,
                   device=CPU, seed=0)
    learner.multiplier.value = 1.5
    first, _ = host.rollout(learner.numpy_policy(), 50)
    out = learner.update([first])  # no episode ended: per-step mean × T 100
    assert out["appo/j_c"] == pytest.approx(float(first["cost"].mean()) * 100, rel=1e-6)
    second, _ = host.rollout(learner.numpy_policy(), 50)
    out = learner.update([second])
    assert second["truncated"][-1].all()
    j_c = float((first["cost"].sum(0) + second["cost"].sum(0)).mean())  # the whole 100-step episodes
    assert out["appo/j_c"] == pytest.approx(j_c, rel=1e-6)
    assert out["appo/weight"] == pytest.approx(max(0.0, 1.5 + 0.2 * (j_c - 8.0)))
    assert out["appo/psi"] == pytest.approx(multiplier_penalty(j_c - 8.0, 1.5, 0.2))
    assert {"appo/surrogate_reward", "appo/surrogate_cost", "clip_frac", "loss_pi", "kl"} <= set(out)


def test_appo_with_zero_weight_is_ppo_on_the_reward_over_several_updates():
    """Far below the limit with λ = 0, w = 0: APPO's updates are PPO-Lag's with λ = 0, exactly."""
    def run(cls, **kw):
        host, env = env_spec()
        learner = cls(cls.Params(hidden=[16], epochs=2, minibatch_size=240, **kw), env, cost_limit=1e6,
                      device=CPU, seed=5)
        for _ in range(3):
            batch, _ = host.rollout(learner.numpy_policy(), 60)
            out = learner.update([batch])
        return flat_params(learner.policy), out

    appo, out = run(APPO)
    ppo, _ = run(PPOLag, lagrange={"kind": "lagrange", "init": 0.0})
    assert out["appo/weight"] == 0.0
    torch.testing.assert_close(appo, ppo, rtol=0, atol=0)


def cost_surrogate_change(limit: float) -> tuple[float, dict]:
    """One APPO update on a fresh 50-step batch; E[ρ Â_C] on that batch afterwards (ρ = π_θ{k+1}/π_θk,
    Â_C centred as in the loss), and the update's metrics."""
    host, env = env_spec()
    learner = APPO(APPO.Params(hidden=[16, 16], sigma=1.0, epochs=5, minibatch_size=100, target_kl=10.0,
                               normalise_obs=False), env, cost_limit=limit, device=CPU, seed=1)
    batch, _ = host.rollout(learner.numpy_policy(), 50)
    b = assemble([batch], CPU)
    adv_c = learner.policy_advantages(b)[0][:, 1]
    obs, act = flat(b, b["obs"]), flat(b, b["act"])
    with torch.no_grad():
        before = learner.policy.log_prob(obs, act)
    out = learner.update([batch])
    with torch.no_grad():
        return (torch.exp(learner.policy.log_prob(obs, act) - before) * adv_c).mean().item(), out


def test_appo_weight_turns_the_update_against_the_cost():
    """Reward = cost on FunctionEnv: with w = 0 (limit far above) the update raises E[ρ Â_C]; with the
    cost far above the limit (w = σ Ĵ_C ≫ 1) the same update lowers it."""
    up, out_free = cost_surrogate_change(1e6)
    down, out_tight = cost_surrogate_change(0.0)
    assert out_free["appo/weight"] == 0.0 and out_tight["appo/weight"] > 10
    assert down < 0 < up, (down, up)


def test_appo_resume_is_exact():
    """A learner restored from a checkpoint (σ grown, λ, the partial-episode carry, RNG) repeats the
    next update bit for bit."""
    host, env = env_spec()
    learner = APPO(APPO.Params(hidden=[16], sigma=0.3, sigma_growth=0.5, epochs=2, minibatch_size=100), env,
                   cost_limit=5.0, device=CPU, seed=1)
    first, _ = host.rollout(learner.numpy_policy(), 50)
    learner.update([first])
    learner.phase("dual", {"episode_cost": 15.0})
    nxt, _ = host.rollout(learner.numpy_policy(), 50)  # ends the episodes begun in ``first``
    state = copy.deepcopy(learner.state_dict())
    a = learner.update([nxt])
    twin = APPO(learner.p, env, cost_limit=5.0, device=CPU, seed=99)
    twin.load_state_dict(state)
    b = twin.update([nxt])
    assert twin.sigma == learner.sigma == pytest.approx(0.45) and twin.multiplier.value == pytest.approx(3.0)
    assert a["appo/j_c"] == b["appo/j_c"] == pytest.approx(float((first["cost"].sum(0) + nxt["cost"].sum(0)).mean()))
    torch.testing.assert_close(flat_params(twin.policy), flat_params(learner.policy), rtol=0, atol=0)


# -- runs over many iterations (learner and env host in this process) ---------------------------

# PDO's shipped dual step (0.05) needs λ > 1 before the cost term outweighs the reward (= cost
# here); a faster one fits the seconds-long test.
FAST = {"pdo": ["algo_params.lagrange.lr=0.2"], "appo": []}


@pytest.mark.parametrize("algo", ["pdo", "appo"])
def test_cost_comes_down_toward_the_limit(algo):
    """Limit 4 (a random policy's episode cost ≈ 19): over 6 iterations (12,000 env steps; learner
    and env host in this process) the cost falls by more than 3 and ends closer to the limit,
    while λ rises."""
    from tests.inprocess import column, run_in_process

    rows = run_in_process(f"{algo}/FunctionEnv-v0", 4.0, 6, FAST[algo])
    cost, lam = column(rows, "cost"), column(rows, "lam")
    assert cost[-2:].mean() < cost[:2].mean() - 3.0, cost.round(2).tolist()
    assert lam[-1] > lam[0] > 0, lam.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["pdo", "appo"])
def test_cost_oscillates_around_the_limit(algo):
    """Limit 6, the shipped dual steps, 80 iterations (160,000 env steps; learner and env host in
    this process). A primal-dual method does not settle within this budget: λ lags the cost, so
    the cost overshoots below the limit, λ falls, the cost rises past it again (a period of
    30-60 iterations here). What its guarantees are about is the average: over iterations 20-79
    the cost lies on both sides of the limit and its mean is within 2 of it."""
    from tests.inprocess import column, run_in_process

    cost = column(run_in_process(f"{algo}/FunctionEnv-v0", 6.0, 80), "cost")
    assert cost[:3].mean() > 14.0, cost.round(2).tolist()  # a random policy's cost ≈ 19
    late = cost[20:]
    assert late.min() < 6.0 < late.max(), late.round(2).tolist()
    assert abs(late.mean() - 6.0) < 2.0, late.round(2).tolist()
