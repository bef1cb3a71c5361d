"""SafeGBPO's Pendulum and Quadrotor (SafeGBPO paper, Appendix 7.1): protocol, Jacobians, rewards,
resets, the violation monitor, and the data/dynamics consistency of the RCI sets."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from saferl.envs.diff import TorchVecEnv
from saferl.envs.safegbpo_tasks import SafeGBPOPendulum, SafeGBPOQuadrotor
from saferl.registry import get_task

TASKS = [SafeGBPOPendulum, SafeGBPOQuadrotor]


@pytest.fixture(scope="module", params=TASKS, ids=lambda c: c.__name__)
def env64(request):
    return request.param(dtype=torch.float64)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_jacobians_match_autograd(env64):
    g = _gen(0)
    for _ in range(3):
        s = env64.physical(env64.initial_state(1, g))[0]
        a = torch.rand(env64.act_dim, generator=g, dtype=torch.float64) * 2 - 1
        w = env64.sample_noise(1)[0]
        A, B, E = env64.jacobians(s, a, w)
        jA, jB, jE = jacobian(env64.f, (s, a, w))
        torch.testing.assert_close((A, B, E), (jA, jB, jE))
    # batched call agrees with per-sample calls
    S = env64.physical(env64.initial_state(4, g))
    U = torch.zeros(4, env64.act_dim, dtype=torch.float64)
    A4 = env64.jacobians(S, U)[0]
    torch.testing.assert_close(A4[2], env64.jacobians(S[2], U[2])[0])


def test_linearised_next_set(env64):
    lin = env64.lin  # the origin
    assert lin.state.abs().max() == 0 and lin.action.abs().max() == 0
    torch.testing.assert_close(lin.f0, torch.zeros(env64.dyn_dim, dtype=torch.float64))  # equilibrium
    s = env64.initial_state(5, _gen(1)) * 1e-3  # close to the linearisation point
    a = torch.full((5, env64.act_dim), 1e-3, dtype=torch.float64)
    z = env64.linearised_next_set(s, a)
    assert z.batch_shape == (5,) and z.dim == env64.dyn_dim and z.num_generators == env64.noise_dim
    expect = env64.physical(s) @ lin.A.T + a @ lin.B.T  # f0 = 0, c_w = 0
    torch.testing.assert_close(z.center, expect)
    nonlinear = env64.f(env64.physical(s), a, torch.zeros(5, env64.noise_dim, dtype=torch.float64))
    assert (nonlinear - z.center).abs().max() < 1e-5  # first order: O(1e-6) error
    torch.testing.assert_close(z.generators[0], lin.E * env64.noise_bound)
    d, B, _G = env64.next_set_affine(s)
    torch.testing.assert_close(d + a @ B.T, z.center)
    # at the linearisation point itself every realised next state (w ∈ W) lies in the set
    origin = torch.zeros(5, env64.dyn_dim, dtype=torch.float64)
    still = torch.zeros(5, env64.act_dim, dtype=torch.float64)
    step = env64.f(origin, still, env64.sample_noise(5))
    assert env64.linearised_next_set(origin, still).contains_point(step, tol=1e-6).all()


def test_rci_is_invariant_under_the_linearisation(env64):
    """Data/dynamics consistency: at RCI corners some CTRL action puts the linearised next-state
    zonotope inside the RCI set by the sufficient certificate (eq 6) — so dt, B, E, the noise
    bound and the origin linearisation match the ones the sets were computed for."""
    cp = pytest.importorskip("cvxpy")
    rci, ctrl = env64.rci, env64.ctrl
    signs = torch.randint(0, 2, (3, rci.num_generators), generator=_gen(3)).double() * 2 - 1
    states = rci.center + signs @ rci.generators.T
    d, B, G = (t.numpy() for t in env64.next_set_affine(states))
    c2, G2, Gc = rci.center.numpy(), rci.generators.numpy(), ctrl.generators.numpy()
    for i in range(3):
        a, gam = cp.Variable(env64.act_dim), cp.Variable(Gc.shape[1])
        Gm, beta = cp.Variable((G2.shape[1], G.shape[1])), cp.Variable(G2.shape[1])
        M = cp.hstack([Gm, cp.reshape(beta, (-1, 1), order="C")])
        cons = [a == ctrl.center.numpy() + Gc @ gam, cp.abs(gam) <= 1, cp.abs(a) <= 1,
                G2 @ Gm == G, c2 - d[i] - B @ a == G2 @ beta]
        prob = cp.Problem(cp.Minimize(cp.max(cp.sum(cp.abs(M), axis=1))), cons)
        prob.solve()
        assert prob.value <= 1.0


def test_protocol_and_reproducible_resets():
    for cls in TASKS:
        env = cls()
        assert env.max_episode_steps == 240 and (env.act_low, env.act_high) == (-1.0, 1.0)
        s = env.initial_state(6, _gen(5))
        assert s.shape == (6, 8 if cls is SafeGBPOQuadrotor else 2) and s.dtype == torch.float32
        assert env.observe(s).shape == (6, env.obs_dim)
        torch.testing.assert_close(s, env.initial_state(6, _gen(5)))
        assert not torch.equal(s, env.initial_state(6, _gen(6)))
        assert not env.violations(s).any()  # resets lie in the RCI set
        assert env.rci.contains_point(env.physical(s[:2]).double(), tol=1e-6).all()
        # same reset generator ⇒ same noise stream ⇒ same trajectory
        runs = []
        for _ in range(2):
            st = env.initial_state(6, _gen(5))
            for _ in range(3):
                st, r, c = env.step(st, torch.zeros(6, env.act_dim))
            runs.append((st, r, c))
        torch.testing.assert_close(runs[0], runs[1])
        assert r.shape == c.shape == (6,) and r.dtype == c.dtype == torch.float32
        w = env.sample_noise(1000)
        assert w.abs().max() <= 0.1 and w.abs().max() > 0.09
        assert cls(stochastic=False).sample_noise(3).abs().max() == 0
        clone = pickle.loads(pickle.dumps(env))
        torch.testing.assert_close(clone.sample_noise(4), env.sample_noise(4))
    s = SafeGBPOQuadrotor().initial_state(3, _gen(0))
    torch.testing.assert_close(s[:, 6:], s[:, :2])  # goal = reset position


def test_zero_action_rollout_and_gradients():
    for cls in TASKS:
        env = cls()
        s = env.initial_state(4, _gen(2))
        actions = torch.zeros(10, 4, env.act_dim, requires_grad=True)
        total = 0.0
        for t in range(10):
            s, r, c = env.step(s, actions[t])
            total = total + r.sum()
            assert torch.isfinite(s).all() and set(c.tolist()) <= {0.0, 1.0}
        total.backward()
        assert torch.isfinite(actions.grad).all() and actions.grad.abs().sum() > 0
    vec = TorchVecEnv(SafeGBPOQuadrotor(), 3)
    obs = vec.reset(seed=1)
    obs, rew, _cost, _term, trunc, _ = vec.step(np.zeros((3, 2), np.float32))
    assert obs.shape == (3, 8) and rew.dtype == np.float32 and not trunc.any()


def test_reward_spot_checks():
    pend = SafeGBPOPendulum(stochastic=False, dtype=torch.float64)
    s, a = torch.tensor([[0.1, -0.2]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)
    nxt, r, c = pend.step(s, a)
    thdd = 1.5 * 9.81 * math.sin(0.1) + 90 * 0.5
    thd = -0.2 + 0.05 * thdd
    th = 0.1 + 0.05 * thd
    torch.testing.assert_close(nxt[0], torch.tensor([th, thd], dtype=torch.float64))
    assert r.item() == pytest.approx(-th ** 2 - 0.1 * thd ** 2 - 0.001 * 0.25)
    assert c.item() == 0.0

    quad = SafeGBPOQuadrotor(stochastic=False, dtype=torch.float64)
    s = torch.tensor([[0.1, -0.1, 0.05, 0.2, -0.1, 0.3, 0.0, 0.0]], dtype=torch.float64)
    a = torch.tensor([[0.2, -0.4]], dtype=torch.float64)
    nxt, r, _ = quad.step(s, a)
    T, phic = 6 / 7 * 0.2 + 9.81, math.pi / 12 * -0.4
    xd = 0.2 + 0.05 * T * math.sin(0.05)
    zd = -0.1 + 0.05 * (T * math.cos(0.05) - 9.81)
    phid = 0.3 + 0.05 * (55 * phic - 70 * 0.05 - 17 * 0.3)
    x, z, phi = 0.1 + 0.05 * xd, -0.1 + 0.05 * zd, 0.05 + 0.05 * phid
    expect_state = torch.tensor([x, z, phi, xd, zd, phid, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(nxt[0], expect_state)
    expect = (-2.5 * math.hypot(x, z) - 0.1 * (phi ** 2 + xd ** 2 + zd ** 2 + phid ** 2)
              - 0.002 * T ** 2 - 0.001 * phic ** 2)
    assert r.item() == pytest.approx(expect)


def test_violation_monitor():
    quad = SafeGBPOQuadrotor(stochastic=False)
    s = torch.zeros(3, 8)
    s[1, 2] = 0.3  # roll beyond the feasible box (π/12) and the RCI set
    s[2, 0] = 0.6  # x beyond the RCI set's interval hull (0.50), inside the box
    assert quad.violations(s).tolist() == [False, True, True]
    assert quad.in_box(s).tolist() == [True, False, True]
    _, _, c = quad.step(s, torch.zeros(3, 2))  # cost is judged before the feasibility clamp
    assert c.tolist() == [0.0, 1.0, 1.0]
    nxt, _, _ = quad.step(s, torch.zeros(3, 2))
    assert nxt[1, 2] <= math.pi / 12 + 1e-6  # clamped into the box
    pend = SafeGBPOPendulum(stochastic=False)
    far = torch.tensor([[0.0, 11.0], [0.0, 0.0]])  # θ̇ = 11 is outside the RCI set at θ = 0
    assert pend.violations(far).tolist() == [True, False]


def test_registry_entries():
    for name, cls in [("SafeGBPOPendulum-v0", SafeGBPOPendulum),
                      ("SafeGBPOQuadrotor-v0", SafeGBPOQuadrotor)]:
        spec = get_task(name)
        assert (spec.kind, spec.max_episode_steps, spec.cost_limit) == ("torch", 240, 0.0)
        assert spec.differentiable
        assert spec.entry == f"saferl.envs.safegbpo_tasks:{cls.__name__}"
