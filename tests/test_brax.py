"""The JAX↔torch bridge and CGPO's Brax tasks (envs/jax_bridge.py, envs/brax_tasks.py).

Kept fast: every default test uses the smallest task (BraxCartPole, 2 DOF) with the same batch
shape (N envs), so the step and its VJP compile once per session (~15 s cold on a 2-core CPU,
~5 s with the persistent cache in ~/.cache/saferl/jax) and later tests reuse them. Float32
throughout — enabling JAX x64 would compile everything a second time; the float64 check is
marked slow and runs in a subprocess so x64 cannot leak into other tests.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("brax")
jnp = pytest.importorskip("jax.numpy")

from saferl import registry  # noqa: E402
from saferl.envs.jax_bridge import JaxFunction  # noqa: E402

N, H = 4, 5  # envs and window length shared by the CartPole tests (one compile)


@pytest.fixture(scope="module")
def cartpole():
    from saferl.envs.brax_tasks import BraxCartPole

    return BraxCartPole()


# --- (a) the bridge ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["recompute", "store"])
def test_bridge_gradient_matches_torch_autograd(mode):
    f = JaxFunction(lambda x, y: (jnp.sin(x) * y, jnp.sum(x ** 2) * y[0]), vmap=True, mode=mode)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, requires_grad=True)
    y = torch.randn(5, 3, generator=gen, requires_grad=True)
    w1, w2 = torch.randn(5, 3, generator=gen), torch.randn(5, generator=gen)

    a, b = f(x, y)
    loss = (a * w1).sum() + (b * w2).sum()
    ga, gb = torch.autograd.grad(loss, (x, y), retain_graph=True)
    ga2, gb2 = torch.autograd.grad(2 * loss, (x, y))  # second backward through the same graph

    ref_a, ref_b = torch.sin(x) * y, (x ** 2).sum(1) * y[:, 0]
    ra, rb = torch.autograd.grad((ref_a * w1).sum() + (ref_b * w2).sum(), (x, y))
    torch.testing.assert_close(a, ref_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, ref_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga2, 2 * ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb2, 2 * rb, rtol=1e-5, atol=1e-6)


def test_bridge_dtypes_views_and_no_grad_path():
    f = JaxFunction(lambda x: x * x)
    base = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x = base[:, 1]  # non-contiguous view of a float64 leaf
    (y,) = f(x)
    assert y.dtype == torch.float32  # JAX computes in float32 (x64 off)
    (g,) = torch.autograd.grad(y.sum(), base)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g[:, 1], 2 * x.detach(), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(g[:, [0, 2, 3]]) == 0
    with torch.no_grad():
        (y,) = f(x)
    assert y.grad_fn is None


def test_bridge_matches_finite_differences():
    f = JaxFunction(lambda x: (jnp.sum(jnp.tanh(x) ** 3 + jnp.cos(2 * x)),))
    x = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64, requires_grad=True)
    (y,) = f(x)
    (g,) = torch.autograd.grad(y, x)
    eps = 1e-2
    with torch.no_grad():
        fd = torch.stack([(f(x + eps * e)[0] - f(x - eps * e)[0]) / (2 * eps)
                          for e in torch.eye(7, dtype=torch.float64)])
    torch.testing.assert_close(g, fd.to(g.dtype), rtol=2e-3, atol=2e-3)


# --- (b) a Brax task's window gradient vs central finite differences ----------------------------

def _window_cost(env, s0, actions):
    s, total = s0, torch.zeros((), dtype=torch.float64)
    for t in range(actions.shape[0]):
        s, _, c = env.step(s, actions[t])
        total = total + c.sum().double()
    return total


def test_cartpole_window_cost_gradient_matches_finite_differences(cartpole):
    """d(Σ_{t<5} Σ_envs c_t)/d(actions, s_0) by the torch path vs central differences.

    Float32 (see the module docstring): central differences have truncation error O(ε²) and
    round-off O(u·|J|/ε) with u ≈ 6e-8; at ε = 1e-2 both are ~1e-5 relative here (measured: the
    float32 FD agrees with a float64 reference gradient to ~2e-5), so rtol 2e-3 leaves a wide
    margin yet catches any real error (a wrong VJP is off by O(1)). Actions stay well inside
    [−1, 1] so the control clip and the rail limits (non-smooth) are not hit."""
    env = cartpole
    gen = torch.Generator().manual_seed(7)
    s0 = env.initial_state(N, gen)
    actions = 0.5 * (2 * torch.rand(H, N, 1, generator=gen) - 1)

    a = actions.clone().requires_grad_(True)
    s = s0.clone().requires_grad_(True)
    j = _window_cost(env, s, a)
    ga, gs = torch.autograd.grad(j, (a, s))
    assert torch.isfinite(ga).all() and ga.abs().sum() > 0
    assert torch.isfinite(gs).all() and gs.abs().sum() > 0

    eps = 1e-2
    with torch.no_grad():
        for _ in range(3):
            d = torch.randn(actions.shape, generator=gen)
            d /= d.norm()
            fd = (_window_cost(env, s0, actions + eps * d) - _window_cost(env, s0, actions - eps * d)) / (2 * eps)
            ad = (ga * d).sum().double()
            assert abs(ad - fd) <= 2e-3 * abs(fd) + 1e-6, (ad.item(), fd.item())
        d = torch.randn(s0.shape, generator=gen)
        d /= d.norm()
        fd = (_window_cost(env, s0 + eps * d, actions) - _window_cost(env, s0 - eps * d, actions)) / (2 * eps)
        ad = (gs * d).sum().double()
        assert abs(ad - fd) <= 2e-3 * abs(fd) + 1e-6, (ad.item(), fd.item())


# --- (c) the DiffEnv protocol ----------------------------------------------------------------------

def test_cartpole_protocol(cartpole):
    env = cartpole
    assert (env.obs_dim, env.act_dim, env.max_episode_steps) == (4, 1, 300)
    assert (env.act_low, env.act_high) == (-1.0, 1.0)
    s = env.initial_state(N, torch.Generator().manual_seed(3))
    assert s.shape == (N, env.state_dim) and s.dtype == torch.float32
    torch.testing.assert_close(s, env.initial_state(N, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    assert not torch.equal(s, env.initial_state(N, torch.Generator().manual_seed(4)))
    assert s.abs().max() <= 0.01  # inverted_pendulum's reset noise U(−0.01, 0.01)
    obs = env.observe(s)
    assert obs.shape == (N, env.obs_dim) and obs.dtype == torch.float32
    with torch.no_grad():
        s2, r, c = env.step(s, torch.zeros(N, 1))
    assert s2.shape == s.shape and r.shape == (N,) and c.shape == (N,)
    assert s2.dtype == r.dtype == c.dtype == torch.float32
    torch.testing.assert_close(c, -s2[:, 0] ** 2)  # position cost c = −x²
    torch.testing.assert_close(r, 1 - (s2[:, 1] / 0.2) ** 2)  # smooth "upright" reward


def test_cartpole_through_torch_vec_env(cartpole):
    from saferl.envs.diff import TorchVecEnv

    venv = TorchVecEnv(cartpole, N)
    obs = venv.reset(seed=0)
    assert obs.shape == (N, 4) and obs.dtype == np.float32
    obs, rew, cost, _term, _trunc, _info = venv.step(np.zeros((N, 1), np.float32))
    assert obs.shape == (N, 4) and rew.shape == cost.shape == (N,) and np.isfinite(obs).all()


def test_brax_tasks_registered_with_paper_limits():
    expected = {  # name: (cost limit, horizon, obs_dim, act_dim) — CGPO paper, Table 4
        "BraxCartPole-v0": (-50.0, 300, 4, 1),
        "BraxCartPole-v1": (-50.0, 300, 4, 1),
        "BraxReacher-v0": (400.0, 300, 11, 2),
        "BraxHalfCheetahVel-v0": (400.0, 200, 17, 6),
        "BraxAntVel-v0": (1000.0, 300, 27, 8),
    }
    from saferl.actors.gradient_worker import make_diff_env

    for name, (limit, steps, obs_dim, act_dim) in expected.items():
        spec = registry.get_task(name)
        assert (spec.kind, spec.differentiable, spec.cost_limit, spec.max_episode_steps) == \
            ("torch", True, limit, steps)
        env = make_diff_env(name)  # builds the Brax system; nothing is compiled yet
        assert (env.obs_dim, env.act_dim, env.max_episode_steps) == (obs_dim, act_dim, steps)
        s = env.initial_state(2, torch.Generator().manual_seed(0))
        assert s.shape == (2, env.nq + env.nv)
        torch.testing.assert_close(s, env.initial_state(2, torch.Generator().manual_seed(0)))
        if name != "BraxReacher-v0":  # Reacher's observation is a jitted kinematics call
            assert env.observe(s).shape == (2, obs_dim)


# --- (d) a gradient worker on a Brax task -----------------------------------------------------------

def test_gradient_worker_on_brax_cartpole():
    from saferl.actors.gradient_worker import GradientWorker

    arch = {"policy": dict(obs_dim=4, act_dim=1, hidden=(16,), squash=True), "critic_hidden": [16]}
    worker = GradientWorker("BraxCartPole-v0", 0, N, N, 0, arch, "cpu")
    weights = {"policy": worker.policy.state_dict(), "v_r": worker.critics[0].state_dict(),
               "v_c": worker.critics[1].state_dict()}
    out, _ = worker.compute(weights, 0, h=H)
    n_params = sum(p.numel() for p in worker.policy.parameters())
    for key in ("g", "q"):
        assert out[key].shape == (n_params,)
        assert np.isfinite(out[key]).all() and np.abs(out[key]).sum() > 0
    assert np.isfinite(out["l_r"]) and np.isfinite(out["l_c"])
    assert out["traj"]["cost"].shape == (H, N) and (out["traj"]["cost"] <= 0).all()  # c = −x²
    # a second worker with the same seed reproduces the window (common randomness, same start)
    twin = GradientWorker("BraxCartPole-v0", 0, N, N, 0, arch, "cpu")
    again, _ = twin.compute(weights, 0, h=H)
    np.testing.assert_allclose(again["g"], out["g"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(again["q"], out["q"], rtol=1e-5, atol=1e-7)
    # and the worker carries its envs on to the next window
    nxt, _ = worker.compute(weights, 1, h=H)
    assert np.isfinite(nxt["g"]).all() and np.isfinite(nxt["q"]).all()


# --- slow ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cartpole_gradient_float64_subprocess():
    """The same check in float64 (JAX x64 on from process start), tight tolerance."""
    code = textwrap.dedent("""
        import jax, torch
        jax.config.update("jax_enable_x64", True)
        from saferl.envs.brax_tasks import BraxCartPole
        env = BraxCartPole()
        g = torch.Generator().manual_seed(1)
        s0 = env.initial_state(4, g).double()
        acts = (0.5 * (2 * torch.rand(5, 4, 1, generator=g) - 1)).double()
        def J(a):
            s, tot = s0, 0.0
            for t in range(5):
                s, r, c = env.step(s, a[t]); tot = tot + c.sum()
            return tot
        a = acts.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad(J(a), a)
        assert ga.dtype == torch.float64
        for _ in range(3):
            d = torch.randn(acts.shape, generator=g, dtype=torch.float64); d /= d.norm()
            with torch.no_grad():
                fd = (J(acts + 1e-4 * d) - J(acts - 1e-4 * d)) / 2e-4
            ad = (ga * d).sum()
            assert abs(ad - fd) <= 1e-6 * abs(fd) + 1e-10, (ad.item(), fd.item())
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_ENABLE_X64": "1"})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BraxReacher-v0", "BraxHalfCheetahVel-v0", "BraxAntVel-v0"])
def test_larger_brax_tasks_step_and_differentiate(name):
    from saferl.actors.gradient_worker import make_diff_env

    env = make_diff_env(name)
    s = env.initial_state(2, torch.Generator().manual_seed(0))
    a = torch.zeros(3, 2, env.act_dim, requires_grad=True)
    total = torch.zeros(())
    for t in range(3):
        obs = env.observe(s)
        assert obs.shape == (2, env.obs_dim) and torch.isfinite(obs).all()
        s, r, c = env.step(s, torch.tanh(a[t] + 0.3))
        total = total + r.sum() + c.sum()
    (g,) = torch.autograd.grad(total, a)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.slow
def test_ant_gradient_through_the_absorbing_state():
    """Env 0 healthy, env 1 already absorbed (torso z 11 m, |qd| ~1e3: the kind of state that
    diverged). Gradients stay finite; the absorbed env is the identity map with r = c = 0, so
    it passes its state cotangent through unchanged and gives its actions zero gradient (the
    physics is never differentiated at the absorbed state)."""
    from saferl.actors.gradient_worker import make_diff_env

    env = make_diff_env("BraxAntVel-v0")
    gen = torch.Generator().manual_seed(0)
    s0 = env.initial_state(2, gen)
    s0[1, 2] = 11.0
    s0[1, env.nq:] = 1e3 * torch.randn(env.nv, generator=gen)
    assert env.alive(s0).tolist() == [True, False]
    s0.requires_grad_(True)
    a = (0.5 * torch.randn(3, 2, env.act_dim, generator=gen)).requires_grad_(True)
    w = torch.randn(env.state_dim, generator=gen)
    s, total = s0, torch.zeros(())
    for t in range(3):
        s, r, c = env.step(s, a[t])
        total = total + r.sum() + c.sum()
    assert torch.equal(s[1], s0[1].detach())
    ga, gs = torch.autograd.grad(total + (s * w).sum(), (a, s0))
    assert torch.isfinite(ga).all() and torch.isfinite(gs).all()
    assert ga[:, 0].abs().sum() > 0 and (ga[:, 1] == 0).all()
    torch.testing.assert_close(gs[1], w)


@pytest.mark.slow
def test_policy_window_matches_per_step_rollout(cartpole):
    """The optional JAX-side window (lax.scan + JAX port of the policy) gives the numbers and
    policy gradients of the per-step bridge with the torch policy."""
    from saferl.learners.analytic import rollout_window
    from saferl.learners.networks import GaussianPolicy, flat_grad

    torch.manual_seed(0)
    policy = GaussianPolicy(4, 1, (16,), squash=True)
    policy.norm.update(torch.randn(64, 4) * 0.05)
    s0 = cartpole.initial_state(N, torch.Generator().manual_seed(5))
    noise = torch.randn(H, N, 1, generator=torch.Generator().manual_seed(6))
    params = list(policy.parameters())

    sum_r, sum_c, _, _, s_end, traj = rollout_window(cartpole, policy, s0, 0, H, 300, noise)
    g_ref = flat_grad(sum_c.mean(), params)
    s_w, r_w, c_w, obs_w, _rs, _cs = cartpole.policy_window(policy, H)(s0, noise)
    g_win = flat_grad(c_w.mean(), params)
    torch.testing.assert_close(c_w, sum_c, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r_w, sum_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_w, s_end, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(obs_w, traj["obs"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_win, g_ref, rtol=1e-3, atol=1e-6)


def test_cartpole_stays_finite_when_the_pole_falls():
    """Random actions over the whole T = 300 (the regime a fresh policy visits)."""
    from saferl.actors.gradient_worker import make_diff_env

    env = make_diff_env("BraxCartPole-v0")
    gen = torch.Generator().manual_seed(0)
    state = env.initial_state(4, gen)
    with torch.no_grad():
        for _ in range(env.max_episode_steps):
            state, _r, _c = env.step(state, torch.rand(4, 1, generator=gen) * 2 - 1)
    assert torch.isfinite(state).all() and state.abs().max() < 100


def test_ant_stays_finite_under_random_actions():
    """Regression (PPO-Lag on BraxAntVel went NaN): with Brax's unhealthy termination kept as an
    absorbing state, random actions over the whole T = 300 stay finite and bounded. Before, the
    ant flipped, sank through the floor, was launched metres up (torso z 3–270 m) and the
    generalized pipeline diverged (|qd| > 1e3, then NaN) in a few envs per hundred.

    Envs 0-3 get a fresh PPO policy's Gaussian actions (σ 0.6, clipped), envs 4-7 bang-bang ±1:
    first through the functional task (absorbing states frozen, no reward, no cost), then through
    TorchVecEnv as PPO-Lag's env hosts run it (leaving the healthy range terminates and resets)."""
    from saferl.actors.env_host import make_vec_env

    n = 8
    venv = make_vec_env("BraxAntVel-v0", n)
    env = venv.env
    gen = torch.Generator().manual_seed(0)

    def actions():
        return torch.cat([0.6 * torch.randn(4, 8, generator=gen),
                          torch.randint(0, 2, (4, 8), generator=gen) * 2.0 - 1.0]).clamp(-1, 1)

    s0 = env.initial_state(n, gen)
    absorbed_seen = torch.zeros(n, dtype=torch.bool)
    with torch.no_grad():
        for t in range(env.max_episode_steps):
            a, alive = actions(), env.alive(s0)
            s1, rew, cost = env.step(s0, a)
            assert torch.isfinite(s1).all() and torch.isfinite(rew).all() and torch.isfinite(cost).all(), t
            assert s1[:, env.nq:].abs().max() < 1e3 and ((s1[:, 2] > -1) & (s1[:, 2] < 2)).all(), t
            assert torch.equal(s1[~alive], s0[~alive]), t  # absorbed: frozen, no reward, no cost
            assert (rew[~alive] == 0).all() and (cost[~alive] == 0).all(), t
            # alive: Brax's ant reward v_x + 1 − 0.5‖a‖² and the cost ‖v_xy‖ (v by finite difference)
            v = (s1[alive, :2] - s0[alive, :2]) / env.dt
            torch.testing.assert_close(rew[alive], v[:, 0] + 1 - 0.5 * (a[alive] ** 2).sum(1), rtol=1e-4, atol=2e-3)
            torch.testing.assert_close(cost[alive], v.norm(dim=1), rtol=1e-4, atol=2e-3)
            absorbed_seen |= ~env.alive(s1)
            s0 = s1
    assert absorbed_seen.all()  # random actions do topple every ant: the regime that diverged

    venv.reset(seed=0)
    lengths = []
    for t in range(100):
        was_alive = env.alive(venv.state)
        obs, rew, cost, term, trunc, info = venv.step(actions().numpy())
        assert np.isfinite(obs).all() and was_alive.all(), t  # a fallen ant never takes another step
        lengths += [e["length"] for e in info["episodes"]]
        assert len(info["episodes"]) == int(term.sum()) and not trunc.any()
    assert lengths and max(lengths) < 100


@pytest.mark.slow  # JAX compiles in each worker; the one-worker path is test_gradient_worker_on_brax_cartpole
def test_cgpo_runs_on_a_brax_task_through_two_gradient_workers(ray_session, run_root):
    import pandas as pd

    from saferl.cluster.session import train
    from saferl.config import load_config

    cfg = load_config("cgpo/BraxCartPole-v1", [
        "resources.num_env_hosts=2", "resources.envs_per_host=4", "algo_params.horizon=5",
        "total_env_steps=120", "schedule.log_every=1", f"run_root={run_root}"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    assert list(m["iteration"]) == [1, 2, 3]
    assert np.isfinite(m[["j_r", "j_c", "step_norm", "critic_loss"]].to_numpy()).all()
    assert (m["step_norm"] > 0).all()


def test_cartpole_v1_puts_a_fallen_pole_back_upright_and_keeps_its_gradient():
    """BraxCartPole-v1: a pole that passes 1.4 rad is put back upright at rest after that step, the
    cart keeping its position and velocity. BraxCartPole-v0 lets it rest on the ±90° hinge limit,
    where a 10-step window's reward has almost no gradient with respect to the actions; from the
    same fallen start, under the same push, v1's gradient is many times larger (the pole is upright
    again and tilting)."""
    from saferl.actors.gradient_worker import make_diff_env

    v0, v1 = make_diff_env("BraxCartPole-v0"), make_diff_env("BraxCartPole-v1")
    tipping = torch.tensor([[0.3, 1.39, 0.5, 3.0], [0.0, 0.1, 0.0, 0.0]])  # (x, θ, ẋ, θ̇)
    with torch.no_grad():
        free, r0, c0 = v0.step(tipping, torch.zeros(2, 1))
        reset, r1, c1 = v1.step(tipping, torch.zeros(2, 1))
    assert free[0, 1] > 1.4 and reset[0, 1] == 0 and reset[0, 3] == 0  # crossed 1.4 rad: upright, at rest
    torch.testing.assert_close(reset[0, [0, 2]], free[0, [0, 2]])  # the cart is the step's
    torch.testing.assert_close(reset[1], free[1])  # an upright pole is untouched
    torch.testing.assert_close((r1, c1), (r0, c0))  # the step's reward and cost
    fallen = torch.tensor([[0.0, math.pi / 2, 0.0, 0.0]] * 4)
    norms = {}
    for name, env in (("v0", v0), ("v1", v1)):
        actions = torch.full((10, 4, 1), 0.3, requires_grad=True)  # a push: the reset pole tilts again
        state, total = fallen, 0.0
        for a in actions:
            state, r, _ = env.step(state, a)
            total = total + r.sum()
        total.backward()
        norms[name] = actions.grad.norm().item()
    assert norms["v1"] > 20 * norms["v0"], norms
