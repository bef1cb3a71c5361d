"""Numerical trouble in learners (issue #9): per algorithm family, a NaN/Inf loss, gradient or
solver result skips the step (parameters untouched, or set to the defined fallback), counts
the event (``health/skipped_updates``, ``health/solver_failures``, ``world_model/...``,
``safeguards.SOLVER_FAILURES``), and the next clean update works. No Ray: learners are built
directly, as in ``tests/test_bad_input.py``."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from saferl import registry
from saferl.actors.env_host import EnvHost
from saferl.learners.base import EnvSpec

CPU = torch.device("cpu")


def _learner(algo: str, spec: EnvSpec | None = None, **params):
    spec = spec or EnvSpec(obs_dim=1, act_dim=1, act_low=[-1.0], act_high=[1.0], max_episode_steps=8)
    cls = registry.get_algo(algo).load()
    return cls(cls.Params(**{"hidden": [8], **params}), spec, 8.0, CPU, 0)


def _tensors(*modules) -> list[torch.Tensor]:
    return [t for m in modules for t in (m.parameters() if isinstance(m, torch.nn.Module) else [m])]


def _snapshot(*modules) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _tensors(*modules)]


def _same(before, *modules) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, _tensors(*modules)))


# -- on-policy: CUP (its projection step) and FOCOPS ----------------------------------------------
@pytest.mark.parametrize("algo, per_minibatch", [("cup", 2), ("focops", 2)])
def test_onpolicy_nan_cost_skips_every_step(algo, per_minibatch):
    extra = {"projection_epochs": 2} if algo == "cup" else {}
    learner = _learner(algo, epochs=2, minibatch_size=8, **extra)
    learner.multiplier.value = 0.5  # ν > 0: the cost advantage enters both losses
    host = EnvHost("FunctionEnv-v0", 2, seed=0)
    batch, _ = host.rollout(learner.numpy_policy(), 8)  # 16 samples: 2 minibatches of 8
    batch = {k: v.copy() for k, v in batch.items()}
    batch["cost"][-1] = np.nan  # GAE carries it to every step: Â_C, Ĉ and the policy loss are NaN
    modules = (learner.policy, learner.v_r, learner.v_c)
    before = _snapshot(*modules)
    out = learner.update([batch])
    assert _same(before, *modules), f"{algo}: a NaN batch changed the parameters"
    # 2 epochs × 2 minibatches × (policy + critic) [+ CUP: 2 projection epochs × 2 minibatches]
    assert out["health/skipped_updates"] == 2 * 2 * per_minibatch + (4 if algo == "cup" else 0)
    batch["cost"][-1] = 0.0
    out = learner.update([batch])
    assert out["health/skipped_updates"] == 0 and not _same(before, *modules)


@pytest.mark.parametrize("algo", ["trpo_lag", "cpo", "pcpo", "trpo_unsafe"])
def test_trust_region_nan_cost_keeps_theta_k_and_counts_critic_steps(algo):
    """The toolkit's fallback (CG failure or no candidate passing the line search: θ stays θ_k,
    ``step_accepted`` 0); the critic steps go through ``descend`` and are counted."""
    learner = _learner(algo, critic_epochs=2, minibatch_size=8)
    host = EnvHost("FunctionEnv-v0", 2, seed=0)
    batch, _ = host.rollout(learner.numpy_policy(), 8)
    batch = {k: v.copy() for k, v in batch.items()}
    batch["cost"][-1] = np.nan
    critics = [m for m in (learner.v_r, getattr(learner, "v_c", None), getattr(learner, "q_c", None)) if m is not None]
    before = _snapshot(learner.policy, *critics)
    out = learner.update([batch])
    assert _same(before, learner.policy, *critics)
    assert out["step_accepted"] == 0.0 and out["health/skipped_updates"] == 2 * 2  # 2 epochs × 2 minibatches
    batch["cost"][-1] = 0.0
    out = learner.update([batch])
    assert out["health/skipped_updates"] == 0 and out["cg_failed"] == 0.0 and not _same(before, *critics)


# -- CVPO: critic, E-step dual, M-step ------------------------------------------------------------
def _cvpo_block(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = 32
    mb = {"obs": torch.randn(b, 3, generator=g), "act": torch.randn(b, 2, generator=g),
          "reward": torch.randn(b, generator=g), "cost": (torch.rand(b, generator=g) < 0.3).float(),
          "next_obs": torch.randn(b, 3, generator=g), "discount": torch.full((b,), 0.99)}
    return {k: v[None].numpy() for k, v in mb.items()}


def test_cvpo_nan_batch_keeps_duals_and_policy():
    spec = EnvSpec(obs_dim=3, act_dim=2, act_low=[-1.0] * 2, act_high=[1.0] * 2, max_episode_steps=100)
    learner = _learner("cvpo", spec, hidden=[16, 16], particles=8, mstep_iters=3)
    learner.update([_cvpo_block(0)])  # move the duals off their initial values first
    duals = (learner.eta, learner.lam, learner.beta_mean, learner.beta_cov)
    modules = (learner.policy, learner.q_r, learner.q_c)  # (the targets still move by polyak)
    before = _snapshot(*modules)
    # the target reward critic overflows (inf − inf = NaN): critic targets, E-step particle values
    # and the M-step weights are NaN
    # (hooked on each net's output layer: the E-step evaluates the nets layer by layer, particle_q)
    hooks = [net[-1].register_forward_hook(lambda m, i, out: out * float("nan")) for net in learner.q_r_target.qs]
    out = learner.update([_cvpo_block(1)])
    for hook in hooks:
        hook.remove()
    assert _same(before, *modules)
    assert (learner.eta, learner.lam, learner.beta_mean, learner.beta_cov) == duals  # the warm start kept
    assert out["health/skipped_updates"] == 1 + 3  # critic + M steps
    assert out["health/solver_failures"] == 1  # the E-step dual on NaN particle values
    out = learner.update([_cvpo_block(2)])
    assert out["health/skipped_updates"] == 0 and out["health/solver_failures"] == 0
    assert not _same(before, *modules) and learner.eta != duals[0]


def test_cvpo_estep_solver_failure_returns_the_warm_start(monkeypatch):
    from saferl.learners import cvpo

    rng = np.random.default_rng(0)
    x_r, x_c = rng.normal(size=(6, 8)), np.abs(rng.normal(size=(6, 8)))

    def raising(*args, **kwargs):
        raise ValueError("SLSQP blew up")

    monkeypatch.setattr(cvpo, "minimize", raising)
    assert cvpo.solve_estep(x_r, x_c, 0.5, 0.1, (0.3, 0.7), (1e-6, 1e5)) == (0.3, 0.7, False)
    monkeypatch.setattr(cvpo, "minimize", lambda *a, **k: types.SimpleNamespace(x=np.array([np.nan, 1.0]),
                                                                              success=True))
    assert cvpo._solve_estep(x_r, x_c, 0.5, 0.1, (0.3, 0.7), (1e-6, 1e5)) == (0.3, 0.7, False, True)
    monkeypatch.undo()
    eta, lam, ok, failed = cvpo._solve_estep(x_r, x_c, 0.5, 0.1, (0.3, 0.7), (1e-6, 1e5))
    assert ok and not failed and np.isfinite([eta, lam]).all()


# -- FAC-SIS: policy, α, multiplier network, Q_φ and the safety index ----------------------------
def test_fac_sis_nan_batch_skips_every_step():
    from saferl.envs.point_hazard import PointHazardEnv

    spec = EnvSpec(obs_dim=PointHazardEnv.obs_dim, act_dim=2, act_low=[-1, -1], act_high=[1, 1],
                   max_episode_steps=120, n_hazards=1)
    learner = _learner("fac_sis", spec, hidden=[16, 16], policy_lr=(1e-3, 1e-3), critic_lr=(1e-3, 1e-3),
                       multiplier_lr=(1e-3, 1e-3), index_lr=(1e-2, 1e-2))
    env, g = PointHazardEnv(1), torch.Generator().manual_seed(0)
    s = env.initial_state(32, g)
    s[:, 1] += torch.rand(32, generator=g) * 1.5
    a = torch.rand(32, 2, generator=g) * 2 - 1
    s2, r, c = env.step(s, a)
    mb = {"obs": env.observe(s), "act": torch.atanh(a.clamp(-0.999, 0.999)), "reward": r, "cost": c,
          "next_obs": env.observe(s2), "discount": torch.full((32,), 0.99)}
    bad = {k: v.clone() for k, v in mb.items()}
    bad["reward"][0] = float("nan")  # the critic loss (Q_R, Q_φ share one step)
    modules = (learner.policy, learner.q_r, learner.q_c, learner.multiplier_net, learner.index, learner.log_alpha)
    nan_grad = [t.register_hook(lambda grad: grad * float("nan"))  # π, α, λ_ξ and ζ: a NaN gradient
                for t in (next(learner.policy.parameters()), learner.log_alpha,
                          next(learner.multiplier_net.parameters()), learner.index.sigma)]
    before = _snapshot(*modules)
    out = learner.update([{k: v[None].numpy() for k, v in bad.items()}])  # every phase due
    for h in nan_grad:
        h.remove()
    assert _same(before, *modules)
    assert out["health/skipped_updates"] == 5  # Q, π, α, λ_ξ, ζ
    assert all(np.isfinite(v) for v in learner.index.values().values())
    out = learner.update([{k: v[None].numpy() for k, v in mb.items()}])
    assert out["health/skipped_updates"] == 0 and not _same(before, *modules)


# -- analytic gradients: SHAC-Lag, BPTT-Lag, CGPO --------------------------------------------------
def _window_result(n_params: int, rng, g_value=None, obs_mean=0.0):
    traj = {"obs": torch.zeros(3, 2, 1), "reward": torch.zeros(2, 2), "cost": torch.zeros(2, 2), "t0": 0}
    g = rng.normal(size=n_params)
    if g_value is not None:
        g[0] = g_value
    return {"l_r": 1.0, "l_c": 9.0, "j_r": 1.0, "j_c": 9.0, "g": g, "q": rng.normal(size=n_params), "n": 2,
            "traj": traj, "obs_count": 4, "obs_mean": np.full(1, obs_mean), "obs_var": np.ones(1)}


@pytest.mark.parametrize("algo", ["shac_lag", "bptt_lag", "cgpo"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_analytic_nan_gradient_skips_the_step(algo, bad):
    from saferl.learners.networks import flat_params

    spec = EnvSpec(obs_dim=1, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=100)
    extra = {} if algo == "bptt_lag" else {"critic_hidden": [4], "horizon": 2, "critic_iterations": 1}
    learner = _learner(algo, spec, hidden=[4], **extra)
    rng = np.random.default_rng(0)
    n = flat_params(learner.policy).numel()
    learner.update([_window_result(n, rng)])
    theta, norm = flat_params(learner.policy).clone(), learner.policy.norm.mean.clone()
    radius = getattr(learner, "radius_sq", None)
    # one of two shards is bad: the combined gradient is NaN/Inf; its observation moments too
    out = learner.update([_window_result(n, rng), _window_result(n, rng, g_value=bad, obs_mean=np.nan)])
    assert torch.equal(flat_params(learner.policy), theta) and torch.equal(learner.policy.norm.mean, norm)
    assert out["health/skipped_updates"] == 1
    assert learner.last_j_c == 9.0
    if algo == "cgpo":
        assert learner.prediction is None and learner.radius_sq == radius and out["step_norm"] == 0.0
    out = learner.update([_window_result(n, rng)])
    assert out["health/skipped_updates"] == 0 and not torch.equal(flat_params(learner.policy), theta)


def test_shac_critic_fit_skips_nan_targets():
    spec = EnvSpec(obs_dim=1, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=100)
    learner = _learner("shac_lag", spec, hidden=[4], critic_hidden=[4], horizon=2, critic_iterations=2)
    rng = np.random.default_rng(0)
    n = sum(p.numel() for p in learner.policy.parameters())
    res = _window_result(n, rng)
    res["traj"]["reward"][0, 0] = float("nan")  # TD(λ) targets NaN: every critic minibatch
    before = _snapshot(learner.critics)
    out = learner.update([res])
    assert _same(before, learner.critics) and out["health/skipped_updates"] == 2  # 2 iterations × 1 minibatch


def test_cgpo_subproblem_never_returns_a_nan_step():
    from saferl.learners.cgpo_math import solve_subproblem

    for g, q, c in [([np.nan, 1.0], [1.0, 0.0], 0.1), ([1.0, 0.0], [np.inf, 0.0], 0.1),
                    ([1.0, 0.0], [0.0, 1.0], np.nan)]:
        with pytest.raises(ValueError):  # refused, never a NaN δ (the learner skips before calling it)
            solve_subproblem(g, q, c, 1e-3)
    delta, _ = solve_subproblem([1e308, 1e308], [1e-308, 0.0], 1e308, 1e-3)  # extreme but finite
    assert np.isfinite(delta).all()


# -- world model (MB-CGPO) ------------------------------------------------------------------------
def test_world_model_drops_nan_transitions_and_skips_nan_steps():
    from saferl.learners.world_model import ReplayFit, WorldModelParams

    rng = np.random.default_rng(0)
    obs = rng.uniform(-2, 2, size=(64, 1)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(64, 1)).astype(np.float32)
    batch = {"obs": obs, "act": act, "next_obs": obs + 0.2 * act, "reward": obs[:, 0], "cost": obs[:, 0] ** 2}
    batch["reward"] = batch["reward"].copy()
    batch["reward"][:3] = np.nan
    fit = ReplayFit(1, 1, WorldModelParams(hidden=[16], fit_steps=5, batch_size=16), CPU, 0)
    assert fit.add(batch) == 61
    before = _snapshot(fit.model)
    hook = next(fit.model.parameters()).register_hook(lambda g: g * float("nan"))  # a NaN gradient
    out = fit.fit()
    assert _same(before, fit.model) and out["world_model/skipped_updates"] == 5
    assert out["world_model/dropped_transitions"] == 3 and np.isfinite(out["world_model/loss"])
    hook.remove()
    out = fit.fit()
    assert out["world_model/skipped_updates"] == 0 and out["world_model/dropped_transitions"] == 0
    assert not _same(before, fit.model)
    assert all(torch.isfinite(b).all() for b in fit.model.buffers())


# -- safeguards (SafeGBPO) ------------------------------------------------------------------------
def _polygons(n=16, k=12, seed=7):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(n, k, generator=g, dtype=torch.float64) * 6.283
    P = torch.stack([ang.cos(), ang.sin()], -1)
    p = torch.rand(n, k, generator=g, dtype=torch.float64) * 0.8 + 0.1  # contains a disc around 0
    z = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * 1.5
    box = torch.cat([torch.eye(2, dtype=torch.float64), -torch.eye(2, dtype=torch.float64)]).expand(n, 4, 2)
    return torch.cat([box, P], 1), torch.cat([torch.ones(n, 4, dtype=torch.float64), p], 1), z


class _Layer:
    """A stand-in cvxpylayers layer: raises, or returns NaN for the first half of the batch."""

    def __init__(self, mode: str, real=None):
        self.mode, self.real = mode, real

    def __call__(self, *args, **kwargs):
        if self.mode == "raise":
            raise RuntimeError("diffcp: solver failed")
        out = self.real(*args, **kwargs)
        first = out[0].clone()
        first[: first.shape[0] // 2] = float("nan")
        return (first, *out[1:])


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_zonotopic_centre_solver_failure_falls_back_to_a_safe_centre(monkeypatch, mode):
    from saferl.envs import safeguards as sg

    P, p, z = _polygons(n=4)
    real = sg._zonotope_layer
    if mode == "nan":
        monkeypatch.setattr(sg, "_zonotope_layer", lambda *a: _Layer("nan", real(*a)))
    else:
        monkeypatch.setattr(sg, "_zonotope_layer", lambda *a: _Layer("raise"))
    failures = sg.SOLVER_FAILURES["zonotopic_centre"]
    c = sg.zonotopic_centre(P, p)
    assert torch.isfinite(c).all() and sg.is_feasible(P, p, c).all()
    assert sg.SOLVER_FAILURES["zonotopic_centre"] - failures == (4 if mode == "raise" else 2)
    fallback = sg.fallback_centre(P, p)
    torch.testing.assert_close(c[:2], fallback[:2])
    out = sg.ray_map(P, p, z, c)  # the ray mask about the fallback centre stays safe
    assert sg.is_feasible(P, p, out).all()


def test_projection_solver_failures_fall_back_and_are_counted(monkeypatch):
    from saferl.envs import safeguards as sg

    P, p, z = _polygons()
    exact = sg.project_polytope(P, p, z)
    # cvxpylayers raises: the exact active-set projection instead
    monkeypatch.setattr(sg, "_projection_layer", lambda *a: _Layer("raise"))
    failures = sg.SOLVER_FAILURES["cvxpylayers_projection"]
    torch.testing.assert_close(sg.project_cvxpylayers(P, p, z), exact)
    assert sg.SOLVER_FAILURES["cvxpylayers_projection"] - failures == z.shape[0]
    monkeypatch.undo()
    # the active set stopped early (max_iter=1): the unconverged states take the cvxpylayers QP
    failures = sg.SOLVER_FAILURES["active_set"]
    a = sg.project_polytope(P, p, z, max_iter=1)
    assert sg.SOLVER_FAILURES["active_set"] > failures
    torch.testing.assert_close(a, exact, atol=1e-6, rtol=0)
    # NaN input (a diverged state): NaN for that state, no exception, the rest exact
    p_bad = p.clone()
    p_bad[0, 5] = float("nan")
    a, info = sg.project_polytope(P, p_bad, z, return_info=True)
    assert torch.isnan(a[0]).all() and not info["feasible"][0]
    torch.testing.assert_close(a[1:], exact[1:])


def test_safeguard_failures_reach_the_host_summaries(monkeypatch):
    """The per-process count of fallen-back solves is what env hosts report, and the coordinator
    sums the hosts' reports into ``health/safeguard_failures``."""
    from saferl.actors.env_host import EnvHost
    from saferl.cluster.iterations import with_safeguard_failures as _with_safeguard_failures
    from saferl.envs import safeguards

    monkeypatch.setattr(safeguards, "SOLVER_FAILURES", safeguards.Counter({"zonotope_centre": 3}))
    host = EnvHost("FunctionEnv-v0", 2, seed=0)
    _, summary = host.rollout({"uniform": True, "act_dim": 1}, 2)
    assert summary["safeguard_failures"] == 3
    assert _with_safeguard_failures({}, [summary, summary])["health/safeguard_failures"] == 6
