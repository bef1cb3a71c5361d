"""SafeGBPO safeguards (SafeGBPO paper, §5): the safe action polytope, the exact fast boundary
projection vs the cvxpylayers oracle, the ray mask (λ_s to the inner zonotope and to the full
polytope), passthrough, the regulariser as a policy-loss term, and the SafeguardedEnv wrapper.
The key property: every safeguard's output is safe by construction — in the action box and the
CTRL zonotope, with the next-state zonotope linearised at the current state (eq 13) inside the
RCI set (checked with the halfspace form and, independently, with the LP containment
certificate of eq 6)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.autograd.functional import jacobian

from saferl.envs import safeguards as sg
from saferl.envs.diff import TorchVecEnv
from saferl.envs.safegbpo_tasks import SafeGBPOPendulum, SafeGBPOQuadrotor
from saferl.envs.zonotope import Zonotope

TASKS = [SafeGBPOPendulum, SafeGBPOQuadrotor]
F64 = torch.float64


@pytest.fixture(scope="module", params=TASKS, ids=lambda c: c.__name__)
def env64(request):
    return request.param(dtype=F64)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _states(env, n, seed, power=1.0):
    """States in the RCI set, pushed towards its boundary with power < 1 (γ ↦ sign γ |γ|^power)."""
    g = _gen(seed)
    gam = torch.rand(n, env.rci.num_generators, generator=g, dtype=F64) * 2 - 1
    s = env.rci.center + (gam.sign() * gam.abs() ** power) @ env.rci.generators.T
    return env._extend(s)


def _actions(env, n, seed):
    a = torch.rand(n, env.act_dim, generator=_gen(seed), dtype=F64) * 2 - 1
    a[: n // 4] = a[: n // 4].sign()  # box corners: the farthest feasible actions
    return a


def _binding(env, n, seed):
    """States/actions where the safe set cuts the box and the projection is active (half), with
    row pruning to 64 exact (for the cvxpylayers programs). Copies of a per-module cache: the
    quadrotor's polytopes take seconds, and parametrised tests ask for the same draw."""
    s, a = _binding_draw(env, n, seed)
    return s.clone(), a.clone()


@functools.cache
def _binding_draw(env, n, seed):
    # about a fifth of the quadrotor's draws are active with an exact 64-row pruning: 8n leaves margin
    s, a = _states(env, 8 * n, seed, power=0.2), _actions(env, 8 * n, seed + 1)
    P, p = sg.safe_action_polytope(env, s)
    _, info = sg.project_polytope(P, p, a, return_info=True)
    exact = sg.prune_polytope(P, p, 64)[2]
    act = (info["active"] & exact).nonzero().squeeze(-1)[: n // 2]
    rest = (~info["active"] & exact).nonzero().squeeze(-1)[: n - act.numel()]
    idx = torch.cat([act, rest])
    assert act.numel() >= n // 4
    return s[idx], a[idx]


def _next_set(env, s, a):
    """The next-state zonotope linearised at the current state (eq 13), batched."""
    d, B, G = sg.next_set_at_state(env, s)
    return Zonotope(d + (B @ a.unsqueeze(-1)).squeeze(-1), G)


def _assert_safe(env, s, a_safe, lp_checks=6):
    tol = 1e-7
    assert (a_safe.abs() <= 1 + tol).all()
    assert env.ctrl.contains_point(a_safe, tol=1e-6).all()  # CTRL: gauge (LP) ≤ 1
    nxt = _next_set(env, s, a_safe)
    # exact halfspace check: support of the next set in every RCI facet normal
    sup = torch.stack([nxt.support(hrow.expand_as(nxt.center)) for hrow in env.rci_H], -1) \
        if env.rci_H.shape[0] < 100 else (nxt.center @ env.rci_H.T + (env.rci_H @ nxt.generators).abs().sum(-1))
    assert (sup <= env.rci_h + tol).all()
    # independent: the LP containment certificate (eq 6), sufficient
    k = min(lp_checks, s.shape[0])
    assert env.rci.contains_zonotope(nxt[:k], tol=1e-6).all()


def test_polytope_is_exact(env64):
    """a ∈ {P a ≤ p} ⟺ a in box ∧ a ∈ CTRL ∧ next-state zonotope ⊆ RCI (halfspace form)."""
    s, a = _states(env64, 256, 0, power=0.3), _actions(env64, 256, 1) * 1.05
    P, p = sg.safe_action_polytope(env64, s)
    assert P.shape[:-1] == p.shape and P.shape[-1] == env64.act_dim
    inside = sg.is_feasible(P, p, a, tol=0)
    nxt = _next_set(env64, s, a)
    sup = nxt.center @ env64.rci_H.T + (env64.rci_H @ nxt.generators).abs().sum(-1)
    Hc, hc = env64.ctrl.halfspaces()
    direct = ((a.abs() <= 1).all(-1) & (a @ Hc.T <= hc).all(-1) & (sup <= env64.rci_h).all(-1))
    assert torch.equal(inside, direct) and 0 < inside.sum() < 256
    # differentiable in the state (p is affine in s)
    s.requires_grad_(True)
    pp = sg.safe_action_polytope(env64, s)[1]
    (pp * torch.rand(pp.shape, generator=_gen(2), dtype=F64)).sum().backward()  # (±H rows cancel)
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def _max_violation(P, p, a):
    """max_i (P a − p)_i for actions a [N, A, m], state by state (the full P has 28.7k rows)."""
    return torch.stack([(a[i] @ P[i].mT - p[i]).amax(-1) for i in range(a.shape[0])])


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("linearise", ["state", "origin"])
def test_reduced_polytope_is_the_full_one(cls, dtype, linearise):
    """``reduce=True`` (the rows that may cut the box, then for m = 2 those cutting into the
    polygon) leaves S(s) unchanged to tolerance, on states inside, near the boundary of and
    outside the RCI set: the same feasibility of random box actions, the same boundary
    projections (and their state gradients), emptiness and ray-mask outputs."""
    env, e64 = cls(dtype=dtype), cls(dtype=F64)
    s = torch.cat([_states(e64, 16, 30), _states(e64, 16, 31, power=0.2),
                   _states(e64, 16, 32, power=0.2) * 1.03, _states(e64, 8, 36, power=0.2) * 1.3])
    s = s.to(dtype)  # (the last ones have S(s) = ∅ or tiny)
    n, tol = s.shape[0], sg._tol(dtype)
    P, p = sg.safe_action_polytope(env, s, linearise=linearise)
    Pr, pr = sg.safe_action_polytope(env, s, linearise=linearise, reduce=True)
    a = _actions(env, n * 256, 33).to(dtype).view(n, 256, env.act_dim)
    full, red = _max_violation(P, p, a), _max_violation(Pr, pr, a)
    assert (full <= 0).any() and (full > 0).any()
    clear = full.abs() > tol  # (away from the boundary, where round-off cannot decide)
    assert torch.equal((red <= 0)[clear], (full <= 0)[clear])
    assert (full[red <= 0] <= tol).all() and (red[full <= 0] <= tol).all()
    # boundary projections of points around the box
    z = (torch.rand(n, env.act_dim, generator=_gen(34), dtype=F64) * 2.4 - 1.2).to(dtype)
    a_full, info = sg.project_polytope(P, p, z, return_info=True)
    a_red, info_red = sg.project_polytope(Pr, pr, z, return_info=True)
    assert torch.equal(info["feasible"], info_red["feasible"])
    ok = info["feasible"]
    assert (~ok).any()
    rows = (Pr.abs().sum(-1) > 0).sum(-1)  # (padding rows are 0·a ≤ 1)
    assert rows.max() <= P.shape[-2] and rows[ok].max() < 100  # (quadrotor: of 28.7k)
    atol = 1e-8 if dtype == F64 else 1e-5
    torch.testing.assert_close(a_red[ok], a_full[ok], atol=atol, rtol=0)
    # many boundary points of the reduced set (its projections of points up to 3 box widths
    # out: edges and vertices) lie in the full set; with S ⊆ S' that makes every projection
    # onto S' the one onto S
    zz = (torch.rand(n, 64, env.act_dim, generator=_gen(37), dtype=F64) * 2 - 1) * 3
    zz = zz * torch.rand(n, 64, 1, generator=_gen(38), dtype=F64)
    edge = sg.project_polytope(Pr[ok].unsqueeze(1), pr[ok].unsqueeze(1), zz[ok].to(dtype))
    assert (_max_violation(P[ok], p[ok], edge) <= tol).all()
    # the ray mask about the orthogonal centre (box actions)
    zb = z.clamp(-1, 1)[ok]
    outs = []
    for Q, q in ((P[ok], p[ok]), (Pr[ok], pr[ok])):
        c, _, unsafe = sg.orthogonal_centre(Q, q, zb)
        outs.append(sg.ray_map(Q, q, zb, torch.where(unsafe.unsqueeze(-1), c, zb), True))
    torch.testing.assert_close(outs[1], outs[0], atol=10 * atol, rtol=0)
    if dtype == F64 and linearise == "state":  # state gradients of active projections
        idx = (ok & info["active"]).nonzero().squeeze(-1)[:8]
        assert idx.numel() >= 4
        w = torch.randn(idx.numel(), env.act_dim, generator=_gen(35), dtype=F64)
        grads = []
        for reduce in (False, True):
            x = s[idx].clone().requires_grad_(True)
            Q, q = sg.safe_action_polytope(env, x, linearise="state", reduce=reduce)
            grads.append(torch.autograd.grad((w * sg.project_polytope(Q, q, z[idx])).sum(), x)[0])
        torch.testing.assert_close(grads[1], grads[0], atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kind,centre", [("boundary_projection", "orthogonal"),
                                         ("ray_mask_linear", "orthogonal"),
                                         ("ray_mask_hyperbolic", "orthogonal"),
                                         ("ray_mask_linear", "zonotopic"),
                                         ("ray_mask_hyperbolic", "zonotopic")])
def test_safeguard_output_is_safe(env64, kind, centre):
    n = 8 if (centre == "zonotopic" and env64.act_dim > 1) else 48
    s = torch.cat([_states(env64, n // 2, 2), _binding(env64, n // 2, 3)[0]])
    a = _actions(env64, n, 4)
    a_safe = sg.safeguard(env64, s, a, kind, centre)
    _assert_safe(env64, s, a_safe)
    # safe actions are kept by the projection and the orthogonal ray mask
    P, p = sg.safe_action_polytope(env64, s)
    safe_in = sg.is_feasible(P, p, a, tol=0)
    if kind == "boundary_projection" or centre == "orthogonal":
        torch.testing.assert_close(a_safe[safe_in], a[safe_in])
        assert (a_safe[~safe_in] - a[~safe_in]).norm(dim=-1).min() > 0


def test_fast_projection_matches_cvxpylayers(env64):
    s, a = _binding(env64, 16, 5)
    s, a = s.clone().requires_grad_(True), a.clone().requires_grad_(True)
    P, p = sg.safe_action_polytope(env64, s)
    fast = sg.project_polytope(P, p, a)
    Pk, pk, exact = sg.prune_polytope(P, p, 64)
    assert exact.all()
    ref = sg.project_cvxpylayers(Pk, pk, a)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
    assert sg.is_feasible(P, p, fast).all()
    w = torch.randn(fast.shape, generator=_gen(6), dtype=F64)
    g_fast = torch.autograd.grad((w * fast).sum(), (a, s), retain_graph=True)
    g_ref = torch.autograd.grad((w * ref).sum(), (a, s))
    torch.testing.assert_close(g_fast[0], g_ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_fast[1], g_ref[1], atol=1e-5, rtol=1e-4)


def test_projection_2d_synthetic_against_oracle():
    """Random 2-D polygons with many rows (vertex solutions included) vs cvxpylayers."""
    g = _gen(7)
    n, k = 64, 24
    ang = torch.rand(n, k, generator=g, dtype=F64) * 6.283
    P = torch.stack([ang.cos(), ang.sin()], -1)
    p = torch.rand(n, k, generator=g, dtype=F64) * 0.8 + 0.1  # contains a disc around 0
    z = (torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1) * 1.5
    a = sg.project_polytope(P, p, z)
    ref = sg.project_cvxpylayers(P, p, z)
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)
    active = ((P @ a.unsqueeze(-1)).squeeze(-1) - p).abs() < 1e-9
    assert (active.sum(-1) == 2).sum() > 5 and (active.sum(-1) == 1).sum() > 5  # vertices & edges


def test_ray_mask_geometry(env64):
    s = torch.cat([_states(env64, 32, 8), _binding(env64, 32, 9)[0]])
    P, p = sg.safe_action_polytope(env64, s)
    a = _actions(env64, 64, 10)
    a[-8:] = a[-8:].sign()  # more box corners
    c = sg.zonotopic_centre(P, p) if env64.act_dim == 1 else sg.orthogonal_centre(P, p, a)[0]
    keep = slice(None) if env64.act_dim == 1 else sg.orthogonal_centre(P, p, a)[2]
    P, p, a, c = P[keep], p[keep], a[keep], c[keep]
    assert a.shape[0] > 4
    assert sg.is_feasible(P, p, c).all()
    for hyper in (False, True):
        out = sg.ray_map(P, p, a, c, hyper)
        assert sg.is_feasible(P, p, out).all()  # the box is mapped into S
        torch.testing.assert_close(sg.ray_map(P, p, c, c, hyper), c)  # centre fixed
        u, v = a - c, out - c  # same direction: parallel with a positive factor
        cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
        torch.testing.assert_close(cos, torch.ones_like(cos))
        # the farthest feasible point along the ray maps to the safe boundary
        lam_f = sg.box_boundary(c, u / u.norm(dim=-1, keepdim=True))
        far = c + u / u.norm(dim=-1, keepdim=True) * lam_f.unsqueeze(-1)
        viol = ((P @ sg.ray_map(P, p, far, c, hyper).unsqueeze(-1)).squeeze(-1) - p).amax(-1)
        assert viol.abs().max() < 1e-8


def test_boundary_projection_jacobian_lemma_1(env64):
    """Lemma 1: identity for safe actions; a projection of rank < m for projected ones."""
    s, a = _binding(env64, 16, 21)
    P, p = sg.safe_action_polytope(env64, s)
    _, info = sg.project_polytope(P, p, a, return_info=True)
    eye = torch.eye(env64.act_dim, dtype=F64)
    seen = set()
    for i in range(s.shape[0]):
        J = jacobian(lambda x: sg.project_polytope(P[i], p[i], x), a[i])  # noqa: B023  (called within the iteration)
        projected = bool(info["active"][i])
        seen.add(projected)
        if projected:
            assert torch.linalg.matrix_rank(J, atol=1e-9, rtol=0.0) < env64.act_dim
            torch.testing.assert_close(J @ J, J)  # idempotent: a projection matrix
        else:
            torch.testing.assert_close(J, eye)
    assert seen == {True, False}


def test_ray_mask_jacobian_full_rank():
    env = SafeGBPOQuadrotor(dtype=F64)
    s, a = _binding(env, 8, 11)
    P, p = sg.safe_action_polytope(env, s)
    c = sg.zonotopic_centre(P, p)
    for i in range(4):
        J = jacobian(lambda x: sg.ray_map(P[i], p[i], x, c[i].detach(), True), a[i])  # noqa: B023  (called within the iteration)
        assert torch.linalg.matrix_rank(J) == 2


def test_passthrough_identity_jacobian(env64):
    s, a = _binding(env64, 8, 12)
    for kind in sg.KINDS:
        def f(x):
            return sg.passthrough(x, sg.safeguard(env64, s[:1], x, kind))  # noqa: B023  (called within the iteration)
        x = a[:1].clone()
        J = jacobian(f, x).reshape(env64.act_dim, env64.act_dim)
        torch.testing.assert_close(J, torch.eye(env64.act_dim, dtype=F64))
        torch.testing.assert_close(f(x), sg.safeguard(env64, s[:1], x, kind))
    reg = sg.regulariser(torch.zeros(3, 2, dtype=F64), torch.ones(3, 2, dtype=F64), 0.1)
    assert float(reg) == pytest.approx(0.1)


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_wrapper_step(cls):
    base = cls(dtype=F64, noise_seed=3)
    wrapped = sg.SafeguardedEnv(cls(dtype=F64, noise_seed=3), kind="boundary_projection", c_reg=0.5)
    s, a = _binding(base, 16, 13)
    a = a.clone().requires_grad_(True)
    nxt, r, c = wrapped.step(s, a)
    a_safe = sg.safeguard(base, s, a.detach())
    nxt0, r0, c0 = base.step(s, a_safe)
    torch.testing.assert_close(nxt, nxt0)
    torch.testing.assert_close(r, r0)  # the regulariser is not a reward ...
    reg = wrapped.last_loss_term  # ... but a per-sample policy-loss term (eq 45)
    torch.testing.assert_close(reg, 0.5 * (a_safe - a.detach()).pow(2).mean(-1))
    assert (reg > 0).sum() >= 4
    torch.testing.assert_close(c, c0)
    assert (c == 0).all()  # linearised at the current state: the real step stays in the RCI set
    (r.sum() - reg.sum()).backward()
    assert torch.isfinite(a.grad).all()
    unreg = sg.SafeguardedEnv(cls(dtype=F64))
    unreg.step(s, a.detach())
    assert unreg.last_loss_term is None
    # linearised at the current state (exact for these control-affine tasks): the true step is
    # safe even from near-boundary states; float32 rollout behind the numpy protocol likewise
    w2 = sg.SafeguardedEnv(cls(dtype=F64), kind="ray_mask_linear", linearise="state")
    _assert_safe_state = sg.safe_action_polytope(base, s, linearise="state")
    assert (w2.step(s, a.detach())[2] == 0).all()
    assert _assert_safe_state[0].shape[-1] == cls.act_dim
    for kind, pt in [("ray_mask_hyperbolic", True), ("boundary_projection", False)]:
        venv = TorchVecEnv(sg.SafeguardedEnv(cls(), kind=kind, passthrough=pt, c_reg=0.1,
                                             linearise="state"), 8)
        venv.reset(0)
        rng = torch.Generator().manual_seed(0)
        for _ in range(10):
            act = (torch.rand(8, cls.act_dim, generator=rng) * 2 - 1).numpy()
            _, _, cost, *_ = venv.step(act)
            assert (cost == 0).all()


@pytest.mark.slow
def test_shac_through_the_ray_mask_improves_with_zero_violations(ray_session, run_root):
    """Through Ray, 12 episodes (slow; the fast in-process companion is
    tests/test_study_safeguards.py::test_safeguarded_shac_on_the_pendulum_improves_without_violations)."""
    import pandas as pd

    from saferl.cluster.session import train
    from saferl.config import load_config

    cfg = load_config("shac/SafeGBPOPendulum-RM-v0", ["total_env_steps=23040", "schedule.log_every=4",
                                                      f"run_root={run_root}"])
    m = pd.read_csv(train(cfg) / "metrics.csv").dropna(subset=["episode/return"])
    ret = m["episode/return"].to_numpy()
    assert ret[-2:].mean() > ret[0] + 200, ret.tolist()
    assert (m["episode/cost"] == 0).all() and m["episode/count"].sum() >= 40


def test_zonotope_ray_boundary_is_the_gauge_boundary():
    """λ = max{t : t r ∈ ⟨0, G⟩} in closed form: t r lies on the zonotope's boundary (gauge of
    eq 5 = 1, an LP), for m = 1, 2, 3 and zero generators."""
    g = _gen(40)
    for m, k in ((1, 1), (2, 4), (2, 3), (3, 6)):
        G = torch.randn(16, m, k, generator=g, dtype=F64)
        if k > m:
            G[:4, :, 0] = 0.0  # a zero generator (ℓ = 0): its normal is skipped
        r = torch.randn(16, m, generator=g, dtype=F64)
        r = r / r.norm(dim=-1, keepdim=True)
        t = sg.zonotope_ray_boundary(G, r)
        gauge = Zonotope(torch.zeros(16, m, dtype=F64), G).gauge(t.unsqueeze(-1) * r)
        torch.testing.assert_close(gauge, torch.ones_like(gauge), atol=1e-7, rtol=0)


@pytest.mark.parametrize("hyper", [False, True], ids=["linear", "hyperbolic"])
def test_ray_mask_inner_zonotope_vs_full_polytope(hyper):
    """The zonotopic ray mask's λ_s measured to the inner zonotope (the reference's default) and to
    the full safe polytope: λ_s inner ≤ λ_s full state by state, mapped actions safe in both, and
    the two differ (quadrotor; per-state resampled directions as ``SafeguardedEnv`` draws them)."""
    env = SafeGBPOQuadrotor(dtype=F64)
    s, a = _binding(env, 8, 41)
    P, p = sg.safe_action_polytope(env, s)
    D = sg.random_directions(s.shape[0], 2, 4, _gen(42))
    c, G = sg.zonotopic_centre(P, p, directions=D, return_generators=True)
    assert torch.isfinite(G).all() and sg.is_feasible(P, p, c).all()
    r = (a - c) / (a - c).norm(dim=-1, keepdim=True)
    lam_inner, lam_full = sg.zonotope_ray_boundary(G, r), sg.ray_boundary(P, p, c, r)
    assert (lam_inner <= lam_full + 1e-7).all() and (lam_inner < 0.99 * lam_full).any()
    kind = "ray_mask_hyperbolic" if hyper else "ray_mask_linear"
    out = {to: sg.safeguard(env, s, a, kind, "zonotopic", ray_boundary_to=to, directions=D)
           for to in sg.RAY_BOUNDARIES}
    for to in sg.RAY_BOUNDARIES:
        _assert_safe(env, s, out[to], lp_checks=2)
    # same centre and ray: the inner mapping lies no farther from the centre
    d_in, d_full = (out["zonotope"] - c).norm(dim=-1), (out["polytope"] - c).norm(dim=-1)
    assert (d_in <= d_full + 1e-7).all() and (d_full - d_in).max() > 1e-3
    with pytest.raises(ValueError, match="ray_boundary_to"):
        sg.safeguard(env, s, a, kind, "zonotopic", ray_boundary_to="box")
    # m = 1: the inner zonotope is the whole interval, so the two coincide
    pen = SafeGBPOPendulum(dtype=F64)
    s1, a1 = _binding(pen, 16, 43)
    outs = [sg.safeguard(pen, s1, a1, kind, "zonotopic", ray_boundary_to=to) for to in sg.RAY_BOUNDARIES]
    torch.testing.assert_close(outs[0], outs[1])


def test_wrapper_resamples_zonotope_directions_reproducibly():
    """``directions="resample"`` draws new directions every step (as the reference), from a
    stream reseeded at ``initial_state``: the same episode start gives the same draws."""
    env = sg.SafeguardedEnv(task="quadrotor", kind="ray_mask_linear", centre="zonotopic")
    draws = []
    for _ in range(2):
        env.initial_state(4, _gen(44))
        draws.append([sg.random_directions(4, 2, 4, env._dir_gen) for _ in range(2)])
    torch.testing.assert_close(draws[0][0], draws[1][0])
    torch.testing.assert_close(draws[0][1], draws[1][1])
    assert not torch.allclose(draws[0][0], draws[0][1])
    torch.testing.assert_close(draws[0][0].norm(dim=-2), torch.ones(4, 4, dtype=F64))
    with pytest.raises(ValueError, match="directions"):
        sg.SafeguardedEnv(task="pendulum", directions="sometimes")
    import pickle
    clone = pickle.loads(pickle.dumps(env))  # (the generator's state travels)
    torch.testing.assert_close(sg.random_directions(4, 2, 4, clone._dir_gen),
                               sg.random_directions(4, 2, 4, env._dir_gen))


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_regulariser_is_in_the_policy_loss_not_in_the_rewards(cls):
    """Eq 45 on a fixed batch: the gradient a window hands the learner (SHAC per step, g/h) equals
    the hand-computed −∇[L_π + c_reg·MSE(a_safe, a)] with L_π = −1/(N h) Σ γ^k r — the reference's
    loss — while the trajectory's rewards (critic targets, logged returns) are the task's."""
    from saferl.learners.analytic import rollout_window
    from saferl.learners.networks import GaussianPolicy, flat_grad

    torch.manual_seed(0)
    policy = GaussianPolicy(cls.obs_dim, cls.act_dim, [16], init_log_std=0.0, squash=True,
                            normalise_obs=False).double()
    with torch.no_grad():
        policy.net[-1].weight.mul_(300.0)  # actions spread over the box: many are unsafe
    s0 = _states(cls(dtype=F64), 16, 45, power=0.2)
    h, gamma, c_reg = 5, 0.9, 0.1
    noise = torch.randn(h, 16, cls.act_dim, generator=_gen(46), dtype=F64)
    params = list(policy.parameters())

    def window(c):
        env = sg.SafeguardedEnv(cls(dtype=F64, noise_seed=7), kind="boundary_projection", c_reg=c)
        sum_r, _, boot, _, _, traj = rollout_window(env, policy, s0, 0, h, 240, noise, None, gamma)
        return flat_grad((sum_r + boot).mean(), params) / h, traj

    g, traj = window(c_reg)
    # by hand: the task stepped with the safeguarded actions, the MSE over every (t, i, j)
    task = cls(dtype=F64, noise_seed=7)
    s, rewards, acts, safe = s0, [], [], []
    for k in range(h):
        a = policy.rsample(task.observe(s), noise[k]).clamp(-1, 1)
        a_safe = sg.safeguard(task, s, a)
        s, r, _ = task.step(s, a_safe)
        rewards.append(r)
        acts.append(a)
        safe.append(a_safe)
    disc = gamma ** torch.arange(h, dtype=F64)
    loss_pi = -(disc[:, None] * torch.stack(rewards)).sum() / (16 * h)
    mse = torch.nn.functional.mse_loss(torch.stack(safe), torch.stack(acts))
    assert float(mse.detach()) > 1e-3  # the safeguard intervenes on this batch
    expected = -flat_grad(loss_pi + c_reg * mse, params, retain_graph=True)
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(traj["reward"], torch.stack(rewards).detach())  # no penalty in rewards
    g0, traj0 = window(0.0)
    torch.testing.assert_close(g0, -flat_grad(loss_pi, params), rtol=1e-6, atol=1e-9)
    assert (g - g0).norm() > 1e-3 * g0.norm()  # the term changes the gradient
    torch.testing.assert_close(traj0["reward"], traj["reward"])


def test_ray_map_without_an_inner_zonotope_uses_the_polytope():
    """States whose zonotopic solve failed (NaN generators: the centre fell back) take λ_s from
    the polytope, so the inner-zonotope ray mask stays safe and finite there."""
    env = SafeGBPOQuadrotor(dtype=F64)
    s, a = _binding(env, 8, 47)
    P, p = sg.safe_action_polytope(env, s)
    c = sg.fallback_centre(P, p)
    G = torch.full((s.shape[0], 2, 4), float("nan"), dtype=F64)
    G[:4] = 1e-3 * torch.eye(2, 4, dtype=F64)  # a tiny inner box around c for half of them
    out = sg.ray_map(P, p, a, c, generators=G)
    full = sg.ray_map(P, p, a, c)
    torch.testing.assert_close(out[4:], full[4:])
    assert sg.is_feasible(P, p, out).all() and torch.isfinite(out).all()
    assert ((out[:4] - c[:4]).norm(dim=-1) <= 1e-3 * 2 ** 0.5 + 1e-12).all()
