"""SafeGBPO's differentiable safeguards ("Provably Safe Reinforcement Learning from Analytic
Gradients", §5 "Safeguards", eq 7-14, 45-54), batched torch.

Safe action set (paper eq 7 with the linearised transition of eq 12-14 / 48). For a state s,

    S(s) = {a ∈ [−1, 1]^m ∩ CTRL : ⟨d(s) + B(s) a, G⟩ ⊆ RCI},

where ⟨d(s) + B(s) a, G⟩ is the next-state zonotope of the dynamics linearised at the current
state s (eq 13: the Taylor expansion around the current state, exact when evaluated there;
``next_set_at_state``) — the default everywhere (``linearise="state"``). With the
RCI set in its exact halfspace form {x : Hx ≤ h} (``env.rci_H, env.rci_h``), a zonotope ⟨c, G⟩
lies in it iff every row's support value is below the offset, h_{Hᵢ}(⟨c, G⟩) = Hᵢc + ‖Gᵀ Hᵢ‖₁ ≤ hᵢ
(eq 4). Hence the containment is EXACT (necessary and sufficient, not the sufficient LP
certificate of eq 6) and linear in a:

    H B a ≤ h − H d(s) − |H G| 1.

The CTRL zonotope and the action box are polytopes too (``Zonotope.halfspaces``), so

    S(s) = {a : P a ≤ p(s)}                           (``safe_action_polytope``)

— exact for the linearised dynamics, and convex (the paper's Lemma 2). P(s) and p(s) are
differentiable in s (P is state-independent only for the fixed linearisation point "origin").
Rows are normalised to unit length (zero rows — constraints on the state only — are kept
unnormalised; S(s) is empty if one of them is violated).

Row reduction (``reduce=True``, what ``safeguard`` uses for large RCI sets; not in the paper,
which solves with all rows). The quadrotor's RCI set has 28.7k facets, yet per state only a
handful shape S(s): (1) rows that hold on the whole box are dropped exactly
(``box_cutting_rows``: a test at the box corners' next-state centres, over groups of
near-parallel rows first); (2) for m = 2 the rest are tested against a polygon O ⊇ S(s) clipped
from a few of them (``polygon_cutting_rows``), dropping those that cut into O by less than a
quarter of the feasibility tolerance (near-duplicate facets). Only the kept rows are built
with gradients (float32 rollouts: 1.5 RCI rows per state on average, ≤ 14); the safe set,
projections and gradients are the full polytope's to tolerance
(``tests/test_safeguards.py::test_reduced_polytope_is_the_full_one``).

Safeguards (all map a policy action a ∈ [−1, 1]^m into S(s)):

* Boundary projection (eq 11): a_safe = argmin ‖a' − a‖² s.t. P a' ≤ p.
  ``project_polytope``: m = 1 → a clamp to the interval [lo(s), hi(s)] (closed form);
  m ≥ 2 → an exact batched dual active-set method (Goldfarb–Idnani style): start at a, add the
  most violated constraint q, solve the sub-QP over the working set W ∪ {q} (≤ m + 1 rows) exactly
  by enumerating the projections onto the affine hulls of its linearly independent subsets of
  ≤ m rows and keeping the feasible one closest to a; repeat until no row is violated. The sub-QP
  value strictly increases, so it terminates, and the final point is the exact QP solution. The
  returned action is recomputed in closed form from the final active set,
  a* = a − P_Aᵀ(P_A P_Aᵀ)⁻¹(P_A a − p_A), so autograd gives the exact (KKT / implicit-function)
  Jacobians w.r.t. a and s wherever strict complementarity holds.
  ``project_cvxpylayers`` is the paper's reference (cvxpylayers); the tests use it as oracle.
* Ray mask (eq 46): centre c(s), λ_a = ‖a − c‖, r = (a − c)/λ_a, λ_s = max{t ≥ 0 : c + t r ∈ S}
  and λ_f = max{t ≥ 0 : c + t r ∈ [−1, 1]^m}; linear a_safe = c + r λ_a λ_s/λ_f, hyperbolic
  a_safe = c + r λ_s tanh(λ_a/λ_s)/tanh(λ_f/λ_s). The paper computes λ_s with an LP (eq 47);
  for a polytope it is the exact closed form λ_s = min_{i : (P r)_i > 0} (p − P c)_i / (P r)_i
  (``ray_boundary``), λ_f likewise for the box (``box_boundary``). With the zonotopic centre,
  λ_s is by default measured to the inner zonotope ⟨c, D diag(ℓ)⟩ ⊆ S the centre comes from
  (``zonotope_ray_boundary``, closed form from its facets), as the reference code does by
  default ("reuse the safe set"); ``ray_boundary_to="polytope"`` measures it to S itself. The
  inner zonotope's λ_s is never larger, so its mapped actions lie closer to the centre.
  Safe centre:
  - ``"orthogonal"`` (eq 54): b₁ = boundary projection of a, n = (b₁ − a)/‖b₁ − a‖, b₂ = b₁ + t n
    with t = ray_boundary(b₁, n) the second boundary point, c = (b₁ + b₂)/2. Defined for unsafe
    actions only: safe actions pass unchanged (as in the paper, §6.4).
  - ``"zonotopic"`` (eq 52-53): the centre of the inner zonotope ⟨c, D diag(ℓ)⟩ ⊆ S(s)
    maximising the geometric mean of ℓ ≥ 0 over k = 1 (m = 1) or 2m random unit directions D
    (``SafeguardedEnv`` resamples them at every step, as the reference does: entries U[−1, 1],
    columns normalised; ``directions="fixed"`` keeps one draw). Containment of a zonotope in
    the polytope is again exact and linear:
    P c + |P D| ℓ ≤ p. For m = 1 the optimum is the whole interval, so c = (lo + hi)/2 in
    closed form; for m ≥ 2 a differentiable cvxpylayers conic program over the pruned rows
    (``prune_polytope``), slow (one conic solve per state).
* Linearisation point: the current state (``linearise="state"``, the default; paper eq 13-14):
  for these control-affine tasks with additive noise it gives the exact next-state set
  (``next_set_at_state``), so the guarantee holds for the real step. ``linearise="origin"``
  linearises once at the fixed equilibrium (x̄, ū, w̄) = 0, as the reference code's wrappers are
  configured (``env.next_set_affine``); it guarantees safety of the linearised dynamics only,
  and near the RCI boundary the true (nonlinear) step can leave the RCI set.
* Solver failures (issue #9): a cvxpylayers solve that raises or returns NaN/Inf, or an
  active-set projection that does not converge, falls back per state and is counted in
  ``SOLVER_FAILURES`` (per process, by call site; ``SafeguardedEnv.solver_failures``), with one
  warning per call site: the zonotopic centre falls back to the orthogonal centre (eq 54) of the
  box centre 0 (solver-free, in S, so the ray mask stays safe); the cvxpylayers projection to
  the exact active-set projection, and a non-converged active set to the cvxpylayers QP (a
  RuntimeError only if that fails too). States whose P, p or action are NaN/Inf (a diverged
  simulator) give NaN, not an exception: there is no safe set to map into, and the learners'
  guards skip the NaN gradient that follows.
* Passthrough gradient: a_safe = a + (safe(a) − a).detach() (identity Jacobian).
* Regulariser (eq 45): c_reg · MSE(a_safe, a) (``regulariser``), a term of the policy loss.

``SafeguardedEnv`` wraps a SafeGBPO task as a ``DiffEnv``: step(s, a) clamps a to the box,
applies the safeguard and steps the task with a_safe; rewards and costs are the task's. The
regulariser is exposed per step as ``last_loss_term`` (c_reg · mean_j (a_safe − a)_j² per
sample), which the analytic-gradient rollout adds to the policy loss — the reference's
L_π + c_reg·MSE(a_safe, a) — and which never enters a reward, a critic target or a return.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
from collections import Counter

import torch

from saferl.envs.diff import DiffEnv, PicklableGenerators

KINDS = ("boundary_projection", "ray_mask_linear", "ray_mask_hyperbolic")
CENTRES = ("orthogonal", "zonotopic")
RAY_BOUNDARIES = ("zonotope", "polytope")  # what the zonotopic ray mask's λ_s is measured to

log = logging.getLogger(__name__)
# States whose solve failed and took the fallback (module docstring), per process, by call site:
# "zonotopic_centre", "cvxpylayers_projection", "active_set".
SOLVER_FAILURES: Counter = Counter()


def _solver_failed(site: str, n: int, why: str, fallback: str) -> None:
    """Count ``n`` failed states at ``site``; the first failure at a site is logged once."""
    first = SOLVER_FAILURES[site] == 0
    SOLVER_FAILURES[site] += n
    (log.warning if first else log.debug)("safeguard solver failure at %s (%d state(s): %s); fallback: %s "
                                          "(counted in safeguards.SOLVER_FAILURES)", site, n, why, fallback)


def _finite_rows(*tensors) -> torch.Tensor:
    """[N] bool: row i of every tensor (leading dim N) is finite."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.reshape(t.shape[0], -1)).all(-1)
    return ok


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-5


@functools.cache
def _ctrl_halfspaces(task: str):
    from saferl.envs.zonotope import load_sets
    return load_sets(task).ctrl.halfspaces()  # float64 CPU, once per process


def _ctrl_hs(env):
    task = getattr(env, "task", None)
    if task is not None:
        return _ctrl_halfspaces(task)
    return env.ctrl.halfspaces()


# --------------------------------------------------------------------------------------------
# the safe action polytope
# --------------------------------------------------------------------------------------------
def next_set_at_state(env, state: torch.Tensor):
    """(d, B, G) of the next-state set linearised at the current state (x̄ = s, ū = 0, w̄ = 0):
    d = f(s, 0, 0) + E c_w, B = ∂f/∂a (s), G = E G_w, batched [..., n], [..., n, m], [..., n, q].
    Both SafeGBPO tasks are affine in (a, w) for fixed s (control-affine, additive noise), so
    this set is the EXACT next-state set (up to the angle wrap), unlike the origin
    linearisation, which ignores the nonlinearity in s (e.g. sin θ)."""
    s = env.physical(state)
    zeros_a = s.new_zeros(*s.shape[:-1], env.act_dim)
    zeros_w = s.new_zeros(*s.shape[:-1], env.noise_dim)
    _, B, E = env.jacobians(s, zeros_a, zeros_w)
    d = env.f(s, zeros_a, zeros_w) + E @ env.noise_set.center.to(s)
    return d, B, E @ env.noise_set.generators.to(s)


def _rci_rows(H, h, d, B, G):
    """(H B, h − H d − |H G| 1): ⟨d + B a, G⟩ ⊆ {Hx ≤ h} row-wise (support function, eq 4).
    H [K, n] shared, or [..., K, n] per state (the reduced rows)."""
    Hd = d @ H.mT if H.dim() == 2 else (H @ d.unsqueeze(-1)).squeeze(-1)
    return H @ B, h - Hd - (H @ G).abs().sum(-1)


def _noise_margin(H, G):
    """|H G| 1 [K] when G is the same for every state (the tasks' additive noise), else the
    upper bound |H| Σ_j max_s |G(s)_{:, j}| (a smaller offset: keeps more rows, still exact)."""
    Gf = G.reshape(-1, *G.shape[-2:])
    if bool((Gf == Gf[:1]).all()):
        return (H @ Gf[0]).abs().sum(-1)
    return H.abs() @ Gf.abs().amax(0).sum(-1)


def row_groups(H: torch.Tensor, res: float = 0.05):
    """Rows of H grouped by their direction rounded to a ``res`` grid (for ``box_cutting_rows``):
    (order [K]: row ids sorted by group, count [G], rep [G, n]: the mean row, radius [G]:
    max ‖H_i − rep‖, gid [K]: each row's group). res = 0.05 puts the quadrotor's 28.7k RCI rows
    in 2.4k groups of radius ≤ 0.04: few groups, yet a bound tight enough to skip nearly all."""
    H = H.double()
    _, gid = torch.unique((H / res).round(), dim=0, return_inverse=True)
    count = torch.bincount(gid)
    rep = H.new_zeros(count.shape[0], H.shape[1]).index_add_(0, gid, H) / count.unsqueeze(-1)
    radius = H.new_zeros(count.shape[0]).scatter_reduce(0, gid, (H - rep[gid]).norm(dim=-1), "amax")
    return gid.argsort(stable=True), count, rep, radius, gid


@functools.cache
def _rci_groups(task: str):
    from saferl.envs.safegbpo_tasks import _rci_halfspaces
    return row_groups(_rci_halfspaces(task)[0])  # once per process


def _groups(env, H):
    """``row_groups`` of the RCI rows (cached per task), on H's dtype/device."""
    task = getattr(env, "task", None)
    grp = _rci_groups(task) if task is not None else row_groups(H)
    if grp[0].shape[0] != H.shape[0]:
        grp = row_groups(H)
    return tuple(t.to(H.device) if t.dtype == torch.long else t.to(H) for t in grp)


def _expand(sel_rows, sel_groups, order, count):
    """(row, group) pairs → (row, member) pairs over the groups' members (CSR via order)."""
    n = count[sel_groups]
    start = (count.cumsum(0) - count)[sel_groups]
    local = torch.arange(int(n.sum()), device=n.device) - (n.cumsum(0) - n).repeat_interleave(n)
    return sel_rows.repeat_interleave(n), order[start.repeat_interleave(n) + local]


def box_cutting_rows(H, h, d, B, G, groups, tol: float = 0.0):
    """(state, row) index pairs, grouped by state, of the RCI rows that may cut the action box
    (d [N, n], B [N or 1, n, m]; ``groups`` from ``row_groups(H)``).

    On [−1, 1]^m row i's left side minus offset is largest at a corner v: max_v H_i(d + B v)
    − h_i + |H_i G| 1; where that is ≤ −tol the row holds on the whole box, so dropping it
    leaves S(s) unchanged (exact). A group is skipped where the bound H̄ x + r ‖x‖ ≥ H_i x
    (‖H_i − H̄‖ ≤ r) shows none of its rows can cut; only the rows of the others are tested
    (the quadrotor: ~2 of 2.4k groups per state, instead of 28.7k rows)."""
    corners = torch.tensor(list(itertools.product((1.0, -1.0), repeat=B.shape[-1])),
                           dtype=d.dtype, device=d.device)
    X = d.unsqueeze(-2) + corners @ B.mT  # [N, 2^m, n]: next-state centres of the box corners
    limit = h - _noise_margin(H, G) - tol
    order, count, rep, radius, gid = groups
    low = torch.full_like(radius, math.inf).scatter_reduce(0, gid, limit, "amin")
    bound = (X @ rep.mT + radius * X.norm(dim=-1, keepdim=True)).amax(-2) > low
    rows, cols = _expand(*bound.nonzero(as_tuple=True), order, count)
    keep = (X[rows] @ H[cols].unsqueeze(-1)).squeeze(-1).amax(-1) > limit[cols]
    return rows[keep], cols[keep]


def _pack(rows: torch.Tensor, cols: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    """Ragged (row, col) pairs, grouped by row, → [n, k] column indices (k = the largest
    count), padded with ``pad``."""
    count = torch.bincount(rows, minlength=n)
    pos = torch.arange(rows.numel(), device=rows.device) - (count.cumsum(0) - count)[rows]
    idx = torch.full((n, int(count.max()) if n else 0), pad, dtype=torch.long, device=rows.device)
    idx[rows, pos] = cols
    return idx


_SQUARE = ((1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0))


def _clip_polygon(V, u, o):
    """Sutherland–Hodgman: convex polygon V [N, L, 2] (cyclic, repeats allowed) ∩ {u·a ≤ o},
    as [N, L + 1, 2] (padded by repeating a vertex), and where it is empty. Where it is empty,
    or round-off gives more than L + 1 vertices, V itself is returned (a superset)."""
    N, L, _ = V.shape
    f = (V @ u.unsqueeze(-1)).squeeze(-1) - o.unsqueeze(-1)
    Vn, fn = V.roll(-1, 1), f.roll(-1, 1)
    inside = f <= 0
    cross = inside != (fn <= 0)  # edge V → Vn crosses the line: add the intersection point
    t = f / torch.where(cross, f - fn, torch.ones_like(f))
    pts = torch.stack([V, V + t.unsqueeze(-1) * (Vn - V)], 2).reshape(N, 2 * L, 2)
    ok = torch.stack([inside, cross], 2).reshape(N, 2 * L)
    order = (~ok).to(torch.uint8).argsort(dim=1, stable=True)[:, :L + 1]  # valid ones first
    out = pts.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    out = torch.where(ok.gather(1, order).unsqueeze(-1), out, out[:, :1])
    count = ok.sum(1)
    empty = count == 0
    old = torch.cat([V, V[:, :1]], 1)
    return torch.where(((count > L + 1) | empty)[:, None, None], old, out), empty


def _depth(u, o, V):
    """max_{v ∈ V} u·v − o [R]: how far each row u·a ≤ o (u [R, 2]) cuts into its polygon
    V [R, L, 2]."""
    return (V[..., 0] * u[:, :1] + V[..., 1] * u[:, 1:]).amax(-1) - o


def polygon_cutting_rows(P, p, seg, n: int, eps: float, passes: int = 4) -> torch.Tensor:
    """m = 2: which rows to keep, [R] bool, of ragged rows P [R, 2], p [R] of states seg [R].

    Builds per state O = box ∩ {a few rows} ⊇ S: per pass, per octant of row directions, the
    row cutting deepest into the current O (clipped in, Sutherland–Hodgman); up to ``passes``
    passes, until no row cuts deeper than ``eps``. Keeps those rows and every row cutting
    more than eps (row-normalised) into the final O; the dropped ones hold on O ⊇ S' up to
    eps, so S ⊆ S' ⊆ {P a ≤ p + eps ‖P‖}: S itself for eps ≪ the feasibility tolerance (the
    quadrotor's RCI set has ~10³ near-duplicate facets, from its ~1e-7 generators, that only
    an eps > 0 merges). O only shrinks, so each pass looks only at the rows still cutting
    deeper than eps. Where O comes out empty nothing is dropped."""
    R, dev = p.shape[0], p.device
    norm = P.norm(dim=-1)
    scale = torch.where(norm > 1e-12, norm, torch.ones_like(norm))
    u, o = P / scale.unsqueeze(-1), p / scale
    key = seg * 8 + ((u[:, 0] < 0) * 4 + (u[:, 1] < 0) * 2 + (u[:, 0].abs() < u[:, 1].abs()))
    V = torch.tensor(_SQUARE, dtype=P.dtype, device=dev).expand(n, 4, 2)
    keep = torch.zeros(R, dtype=torch.bool, device=dev)
    empty = torch.zeros(n, dtype=torch.bool, device=dev)
    live = torch.arange(R, device=dev)
    for i in range(passes + 1):
        depth = _depth(u[live], o[live], V[seg[live]])
        live, depth = live[depth > eps], depth[depth > eps]
        if i == passes or not live.numel():
            break
        best = depth.new_full((n * 8,), -math.inf).scatter_reduce(0, key[live], depth, "amax")
        is_best = depth == best[key[live]]
        pick = live.new_full((n * 8,), R).scatter_reduce(0, key[live], torch.where(is_best, live, R),
                                                         "amin")
        cut = pick < R
        keep[pick[cut]] = True
        pick, cut = pick.clamp_max(R - 1).view(n, 8), cut.view(n, 8)
        for j in range(8):  # (no cut: o = inf leaves V as it is)
            oj = torch.where(cut[:, j], o[pick[:, j]], o.new_full((n,), math.inf))
            V, e = _clip_polygon(V, u[pick[:, j]], oj)
            empty |= e
    keep[live] = True
    return keep | empty[seg]


def _reduced_rci_rows(H, h, d, B, G, groups, tol):
    """The rows of ``_rci_rows`` that may shape S(s), per state, padded with the trivial row
    0·a ≤ 1: [..., k, m], [..., k]. Selection without gradients: ``box_cutting_rows`` (exact),
    then for m = 2 ``polygon_cutting_rows`` (eps = tol/4) on the ragged survivors; only the k
    kept rows are rebuilt with gradients, so every active row's gradient is the full
    polytope's."""
    batch = torch.broadcast_shapes(d.shape[:-1], B.shape[:-2], G.shape[:-2])
    K, n, m = H.shape[0], H.shape[1], B.shape[-1]
    with torch.no_grad():
        Bf, Gf = (t.detach().expand(*batch, *t.shape[-2:]).reshape(-1, *t.shape[-2:])
                  for t in (B, G))
        df = d.detach().expand(*batch, n).reshape(-1, n)
        rows, cols = box_cutting_rows(H, h, df, Bf, Gf, groups, tol)
        if m == 2 and rows.numel():
            P1, p1 = _rci_rows(H[cols, None], h[cols, None], df[rows], Bf[rows], Gf[rows])
            keep = polygon_cutting_rows(P1[:, 0], p1[:, 0], rows, df.shape[0], tol / 4)
            rows, cols = rows[keep], cols[keep]
        idx = _pack(rows, cols, df.shape[0], K).reshape(*batch, -1)
    Hx = torch.cat([H, H.new_zeros(1, n)])  # the padding row: 0·x ≤ 1
    hx = torch.cat([h, h.new_ones(1)])
    return _rci_rows(Hx[idx], hx[idx], d, B, G)


def safe_action_polytope(env, state: torch.Tensor, lin=None, normalise: bool = True,
                         linearise: str = "state", reduce: bool = False):
    """(P [..., k, m], p [..., k]) with S(s) = {a : P a ≤ p}: box, CTRL, next-state-in-RCI rows.

    Exact for the linearised dynamics (paper eq 7 with eq 12-13/48): the next-state zonotope
    ⟨d + B a, G⟩ ⊆ {Hx ≤ h} ⟺ H B a ≤ h − H d − |H G| 1 row-wise (support function, eq 4).
    Rows: [box (2m); CTRL; RCI]. P is an expanded (zero-copy) view when it does not depend on s.
    Differentiable w.r.t. ``state`` through p (and P if the linearisation is state-dependent).
    ``linearise``: "state" (default, paper eq 13: at the current state, ``next_set_at_state``;
    exact for these control-affine tasks; P depends on s) or "origin" (a fixed point, as the
    reference code's wrappers: ``env.next_set_affine(state, lin)``).
    ``reduce``: keep, per state, only the RCI rows that shape S(s) (``_reduced_rci_rows``; the
    same set to tolerance), padded with 0·a ≤ 1 to the batch's largest count: of the
    quadrotor's 28.7k RCI rows ≤ ~14 per state remain, which is what makes its safeguards
    affordable (every step of them is linear in the row count).
    """
    if linearise == "state":
        d, B, G = next_set_at_state(env, state)
    elif linearise == "origin":
        d, B, G = env.next_set_affine(state, lin)
    else:
        raise ValueError("linearise must be 'origin' or 'state'")
    kw = dict(dtype=d.dtype, device=d.device)
    H, h = env.rci_H.to(**kw), env.rci_h.to(**kw)
    m = B.shape[-1]
    eye = torch.eye(m, **kw)
    Hc, hc = (t.to(**kw) for t in _ctrl_hs(env))
    if reduce:
        P_rci, p_rci = _reduced_rci_rows(H, h, d, B, G, _groups(env, H), _tol(d.dtype))
    else:
        P_rci, p_rci = _rci_rows(H, h, d, B, G)  # P_rci: [(B's batch), K, m]
    pre = P_rci.shape[:-2]
    P = torch.cat([eye.expand(*pre, m, m), (-eye).expand(*pre, m, m), Hc.expand(*pre, *Hc.shape),
                   P_rci], -2)
    batch = torch.broadcast_shapes(p_rci.shape[:-1], pre)
    p = torch.cat([torch.ones(2 * m, **kw).expand(*batch, 2 * m), hc.expand(*batch, hc.shape[0]),
                   p_rci.expand(*batch, p_rci.shape[-1])], -1)
    if normalise:  # on the (usually unbatched) P, before expanding
        norm = P.norm(dim=-1)
        scale = torch.where(norm > 1e-12, norm, torch.ones_like(norm))
        P, p = P / scale.unsqueeze(-1), p / scale
    P = P.expand(*batch, *P.shape[-2:])
    return P, p


def prune_polytope(P: torch.Tensor, p: torch.Tensor, k: int):
    """Keep the k rows that are tightest relative to the box (smallest p − ‖P_i‖₁; the box rows
    come first and are always kept). Returns (P_k, p_k, exact): ``exact`` [...] is True where
    every dropped row satisfies p_i ≥ ‖P_i‖₁, i.e. is redundant on the box, so
    {P_k a ≤ p_k} = {P a ≤ p} exactly. Used for the cvxpylayers programs (fixed k)."""
    m = P.shape[-1]
    nbox = 2 * m
    slack = (p - P.abs().sum(-1))[..., nbox:]
    k_rest = min(k - nbox, slack.shape[-1])
    order = slack.argsort(-1)
    keep = order[..., :k_rest] + nbox
    exact = torch.ones(slack.shape[:-1], dtype=torch.bool, device=P.device)
    if k_rest < slack.shape[-1]:
        exact = torch.gather(slack, -1, order[..., k_rest:k_rest + 1]).squeeze(-1) >= 0
    idx = torch.cat([torch.arange(nbox, device=P.device).expand(*keep.shape[:-1], nbox), keep], -1)
    Pk = torch.gather(P, -2, idx.unsqueeze(-1).expand(*idx.shape, m))
    return Pk, torch.gather(p, -1, idx), exact


def is_feasible(P, p, a, tol=None) -> torch.Tensor:
    """a ∈ {P a ≤ p} with tolerance (rows normalised): [...] bool."""
    tol = _tol(a.dtype) if tol is None else tol
    return ((P @ a.unsqueeze(-1)).squeeze(-1) - p <= tol).all(-1)


# --------------------------------------------------------------------------------------------
# boundary projection
# --------------------------------------------------------------------------------------------
def interval_bounds(P: torch.Tensor, p: torch.Tensor):
    """m = 1: S = [lo, hi] with lo = max_{P_i<0} p_i/P_i, hi = min_{P_i>0} p_i/P_i (and
    lo = +inf if a state-only row (P_i = 0) has p_i < 0): differentiable, [...] each."""
    c = P[..., 0]
    ratio = p / torch.where(c.abs() > 1e-12, c, torch.ones_like(c))
    inf = torch.full_like(p, math.inf)
    hi = torch.where(c > 1e-12, ratio, inf).amin(-1)
    lo = torch.where(c < -1e-12, ratio, -inf).amax(-1)
    bad = ((c.abs() <= 1e-12) & (p < 0)).any(-1)
    return torch.where(bad, torch.full_like(lo, math.inf), lo), hi


def _affine_projection(P_W, p_W, mask, z):
    """z − P_Wᵀ (P_W P_Wᵀ)⁻¹ (P_W z − p_W), masked rows ignored. P_W [N, w, m]."""
    Pm = P_W * mask.unsqueeze(-1)
    gram = Pm @ Pm.mT + torch.diag_embed((~mask).to(P_W.dtype))
    rhs = ((Pm @ z.unsqueeze(-1)).squeeze(-1) - p_W) * mask
    det = torch.linalg.det(gram)
    ok = det > 1e-10  # (rows normalised: det = Π sin² of the angles) singular → identity
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram_ok = torch.where(ok[..., None, None], gram, eye)
    mu = torch.linalg.solve(gram_ok, rhs.unsqueeze(-1))
    return z - (Pm.mT @ mu).squeeze(-1), ok


def _active_set(P, p, z, tol, max_iter):
    """No-grad dual active set; returns (W [N, m] indices, W mask, converged, infeasible)."""
    N, _K, m = P.shape
    dev = P.device
    a = z.clone()
    W = torch.zeros(N, m, dtype=torch.long, device=dev)
    Wm = torch.zeros(N, m, dtype=torch.bool, device=dev)
    done = ~_finite_rows(P, p, z)  # NaN/Inf input: nothing to solve (``project_polytope`` returns NaN)
    infeasible = torch.zeros_like(done)
    subsets = [s for r in range(1, m + 1) for s in itertools.combinations(range(m + 1), r)]
    for _ in range(max_iter):
        viol = (P @ a.unsqueeze(-1)).squeeze(-1) - p
        vmax, q = viol.max(-1)
        done = done | (vmax <= tol)
        if bool(done.all()):
            break
        act = (~done).nonzero().squeeze(-1)
        slots = torch.cat([W[act], q[act, None]], -1)  # [n, m+1]
        smask = torch.cat([Wm[act], torch.ones_like(q[act, None], dtype=torch.bool)], -1)
        Ps, ps = P[act.unsqueeze(-1), slots], p[act.unsqueeze(-1), slots]  # [n, m+1, m], [n, m+1]
        za = z[act]
        best = torch.full((act.numel(),), math.inf, dtype=P.dtype, device=dev)
        best_a = a[act].clone()
        best_W = torch.zeros(act.numel(), m, dtype=torch.long, device=dev)
        best_Wm = torch.zeros(act.numel(), m, dtype=torch.bool, device=dev)
        for sub in subsets:
            sub_t = torch.tensor(sub, device=dev)
            pad = torch.cat([sub_t, sub_t.new_zeros(m - len(sub))])
            pm = torch.arange(m, device=dev) < len(sub)
            P_W, p_W = Ps[:, pad], ps[:, pad]
            valid = smask[:, sub_t].all(-1)
            mask = pm.expand(act.numel(), m)
            cand, ok = _affine_projection(P_W, p_W, mask, za)
            valid &= ok
            feas = ((Ps @ cand.unsqueeze(-1)).squeeze(-1) - ps <= tol) | ~smask
            valid &= feas.all(-1) & torch.isfinite(cand).all(-1)
            dist = torch.where(valid, (cand - za).pow(2).sum(-1), torch.full_like(best, math.inf))
            better = dist < best
            best = torch.where(better, dist, best)
            best_a = torch.where(better.unsqueeze(-1), cand, best_a)
            best_W = torch.where(better.unsqueeze(-1), slots[:, pad], best_W)
            best_Wm = torch.where(better.unsqueeze(-1), mask, best_Wm)
        none = ~torch.isfinite(best)  # the sub-QP (≤ m+1 rows) is infeasible ⇒ S is empty
        infeasible[act[none]] = True
        done[act[none]] = True
        ok = act[~none]
        a[ok], W[ok], Wm[ok] = best_a[~none], best_W[~none], best_Wm[~none]
    else:
        viol = (P @ a.unsqueeze(-1)).squeeze(-1) - p
        done = done | (viol.amax(-1) <= tol)
    return W, Wm, done & ~infeasible, infeasible


def project_polytope(P: torch.Tensor, p: torch.Tensor, z: torch.Tensor, tol: float | None = None,
                     max_iter: int = 100, return_info: bool = False):
    """Exact batched Euclidean projection of z [..., m] onto {P a ≤ p} (boundary projection).

    m = 1: clamp to [lo, hi]; m ≥ 2: dual active set (module docstring); the result is the
    closed form of the final active set, so gradients w.r.t. z, P and p are exact.
    ``return_info`` adds a dict with ``feasible`` (S non-empty) and ``active`` (a ≠ z)."""
    tol = _tol(z.dtype) if tol is None else tol
    batch, m = z.shape[:-1], z.shape[-1]
    P = P.expand(*batch, *P.shape[-2:])
    p = p.expand(*batch, p.shape[-1])
    if m == 1:
        lo, hi = interval_bounds(P, p)
        a = torch.minimum(torch.maximum(z[..., 0], lo), hi).unsqueeze(-1)
        feasible = lo <= hi + tol
        active = (z[..., 0] < lo) | (z[..., 0] > hi)
    else:
        Pf, pf, zf = P.reshape(-1, *P.shape[-2:]), p.reshape(-1, p.shape[-1]), z.reshape(-1, m)
        finite = _finite_rows(Pf.detach(), pf.detach(), zf.detach())
        with torch.no_grad():
            W, Wm, conv, infeasible = _active_set(Pf.detach(), pf.detach(), zf.detach(), tol, max_iter)
        ar = torch.arange(zf.shape[0], device=z.device).unsqueeze(-1)
        a, _ = _affine_projection(Pf[ar, W], pf[ar, W], Wm, zf)
        failed = finite & ~conv & ~infeasible
        if bool(failed.any()):  # numerically stuck: the cvxpylayers QP for those states
            idx = failed.nonzero().squeeze(-1)
            alt, ok = _cvxpylayers_projection(Pf[idx], pf[idx], zf[idx])
            if not bool(ok.all()):
                raise RuntimeError("active-set projection did not converge (and the cvxpylayers fallback failed)")
            _solver_failed("active_set", idx.numel(), "no convergence", "cvxpylayers QP")
            a = a.index_put((idx,), alt.to(a))
        if not bool(finite.all()):  # no safe set to map into: NaN, not a crash
            a = torch.where(finite.unsqueeze(-1), a, torch.full_like(a, math.nan))
            infeasible = infeasible | ~finite
        a = a.reshape(*batch, m)
        feasible = (~infeasible).reshape(batch)
        active = Wm.any(-1).reshape(batch)
    if return_info:
        return a, {"feasible": feasible, "active": active}
    return a


@functools.cache
def _projection_layer(k: int, m: int):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer
    a = cp.Variable(m)
    z, P, p = cp.Parameter(m), cp.Parameter((k, m)), cp.Parameter(k)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(a - z)), [P @ a <= p])
    return CvxpyLayer(prob, parameters=[z, P, p], variables=[a])


def _cvxpylayers_projection(Pf, pf, zf, **solver_args):
    """The layer's solve over a flat batch [N, k, m], [N, k], [N, m] (float64): (a [N, m], ok [N]);
    ok is False for the states where the solver raised (all of them) or returned NaN/Inf."""
    k, m = Pf.shape[-2:]
    try:
        (a,) = _projection_layer(k, m)(zf, Pf, pf, solver_args=solver_args or {"eps": 1e-10})
    except Exception:  # noqa: BLE001 (the conic solver's failure: diffcp/SCS raise their own types)
        return zf.new_full(zf.shape, math.nan), torch.zeros(zf.shape[0], dtype=torch.bool, device=zf.device)
    return a, torch.isfinite(a).all(-1)


def project_cvxpylayers(P: torch.Tensor, p: torch.Tensor, z: torch.Tensor, **solver_args):
    """The paper's boundary projection: the QP as a differentiable cvxpylayers layer (batched
    over the leading dim; differentiable w.r.t. z, P, p). Slow: use with pruned rows. Where the
    solve fails (exception or NaN/Inf), the exact ``project_polytope`` of those states is used
    and the failure counted (``SOLVER_FAILURES["cvxpylayers_projection"]``)."""
    batch, (k, m) = z.shape[:-1], P.shape[-2:]
    Pf = P.expand(*batch, k, m).reshape(-1, k, m)
    pf = p.expand(*batch, k).reshape(-1, k)
    zf = z.reshape(-1, m)
    a, ok = _cvxpylayers_projection(Pf, pf, zf, **solver_args)
    bad = ok.logical_not() & _finite_rows(Pf.detach(), pf.detach(), zf.detach())
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        _solver_failed("cvxpylayers_projection", idx.numel(), "exception or NaN/Inf", "exact active-set projection")
        a = a.index_put((idx,), project_polytope(Pf[idx], pf[idx], zf[idx]).to(a))
    return a.reshape(*batch, m)


# --------------------------------------------------------------------------------------------
# ray mask
# --------------------------------------------------------------------------------------------
def ray_boundary(P, p, c, r, eps: float = 1e-12):
    """max{t ≥ 0 : c + t r ∈ {P a ≤ p}} = min_{(P r)_i > 0} (p − P c)_i / (P r)_i (exact for a
    polytope; the paper's LP eq 47 gives the same value). Clamped at 0. [...]"""
    Pr = (P @ r.unsqueeze(-1)).squeeze(-1)
    slack = p - (P @ c.unsqueeze(-1)).squeeze(-1)
    pos = Pr > eps
    t = torch.where(pos, slack / torch.where(pos, Pr, torch.ones_like(Pr)), torch.full_like(Pr, math.inf))
    return t.amin(-1).clamp_min(0)


def box_boundary(c, r, low: float = -1.0, high: float = 1.0, eps: float = 1e-12):
    """max{t ≥ 0 : c + t r ∈ [low, high]^m} in closed form. [...]"""
    ones = torch.ones_like(r)
    t = torch.where(r > eps, (high - c) / torch.where(r > eps, r, ones),
                    torch.where(r < -eps, (low - c) / torch.where(r < -eps, r, ones),
                                torch.full_like(r, math.inf)))
    return t.amin(-1).clamp_min(0)


def zonotope_ray_boundary(G: torch.Tensor, r: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """max{t ≥ 0 : c + t r ∈ ⟨c, G⟩} (G [..., m, k], r [..., m]) in closed form: the zonotope's
    halfspace form |N x| ≤ h has a normal per (m − 1)-subset of generators (their generalised
    cross product; m = 2: each generator turned by 90°) and h_i = Σ_j |N_i g_j| (eq 4), so
    t = min_{|N_i r| > 0} h_i / |N_i r| — the value of the reference's LP (eq 47 with the inner
    zonotope's point containment). Zero generators give zero normals, which are skipped.
    Differentiable in G and r. [...]"""
    m, k = G.shape[-2], G.shape[-1]
    if m == 1:
        return G.abs().sum(-1)[..., 0] / r[..., 0].abs().clamp_min(eps)
    subsets = list(itertools.combinations(range(k), m - 1))
    rows = torch.arange(m, device=G.device)
    sub = torch.stack([G[..., list(ids)] for ids in subsets], -3)  # [..., S, m, m − 1]
    # the generalised cross product: cofactor i = (−1)^i det(sub without row i)
    N = torch.stack([(-1) ** i * torch.linalg.det(sub[..., rows != i, :]) for i in range(m)], -1)  # [..., S, m]
    h = (N @ G).abs().sum(-1)  # [..., S]
    Nr = (N @ r.unsqueeze(-1)).squeeze(-1).abs()
    pos = Nr > eps * N.norm(dim=-1).clamp_min(eps)
    t = torch.where(pos, h / torch.where(pos, Nr, torch.ones_like(Nr)), torch.full_like(Nr, math.inf))
    return t.amin(-1)


def ray_map(P, p, a, c, hyperbolic: bool = False, generators: torch.Tensor | None = None):
    """Ray mask (eq 46) of a [..., m] about the centre c [..., m] (c ∈ S, a in the box).

    λ_s is measured to the polytope S = {P a ≤ p}, or, with ``generators`` G [..., m, k] of an
    inner zonotope ⟨c, G⟩ ⊆ S (the zonotopic centre's, eq 52-53), to that zonotope — the
    reference code's default ("reuse the safe set"); min(λ_s inner, λ_s polytope) there, so
    solver round-off in the inner zonotope cannot leave S. States whose G is not finite (a
    centre that fell back, ``zonotopic_centre``) use the polytope."""
    diff = a - c
    lam_a = diff.norm(dim=-1)
    zero = lam_a <= 1e-12
    lam_a_safe = torch.where(zero, torch.ones_like(lam_a), lam_a)
    # a = c: any unit direction keeps λ_s finite (the box rows bound every ray), so the unused
    # branch of the final `where` has finite gradients instead of 0·inf = NaN
    e1 = torch.zeros_like(diff)
    e1[..., 0] = 1.0
    r = torch.where(zero.unsqueeze(-1), e1, diff / lam_a_safe.unsqueeze(-1))
    lam_s = ray_boundary(P, p, c, r)
    if generators is not None:
        finite = torch.isfinite(generators).flatten(-2).all(-1)
        G = torch.where(finite[..., None, None], generators, torch.zeros_like(generators))
        inner = torch.where(finite, zonotope_ray_boundary(G, r), torch.full_like(lam_s, math.inf))
        lam_s = torch.minimum(lam_s, inner)
    lam_f = box_boundary(c, r)
    lam_f = torch.maximum(lam_f, lam_a)  # a outside the box (numerically) stays in S
    if hyperbolic:
        ls = lam_s.clamp_min(1e-12)
        dist = ls * torch.tanh(lam_a / ls) / torch.tanh(lam_f / ls)
    else:
        dist = lam_a * lam_s / lam_f.clamp_min(1e-12)
    out = c + r * dist.unsqueeze(-1)
    return torch.where(zero.unsqueeze(-1), c, out)


def orthogonal_centre(P, p, a, tol=None):
    """Safe centre by orthogonal approximation (eq 54): (b₁ + b₂)/2 with b₁ the projection of a,
    b₂ the second boundary point along n = (b₁ − a)/‖b₁ − a‖. Returns (c, b₁, unsafe); c is
    meaningless where a is safe (``unsafe`` False)."""
    tol = _tol(a.dtype) if tol is None else tol
    b1 = project_polytope(P, p, a, tol=tol)
    step = b1 - a
    dist = step.norm(dim=-1)
    unsafe = dist > tol
    n = step / torch.where(unsafe, dist, torch.ones_like(dist)).unsqueeze(-1)
    # where a is safe any unit n keeps t finite, so the unused c has finite gradients (no 0·inf)
    e1 = torch.zeros_like(n)
    e1[..., 0] = 1.0
    n = torch.where(unsafe.unsqueeze(-1), n, e1)
    # rows active at b₁ with (P n)_i ≈ 0⁺ must not stop the ray at t = 0 spuriously
    t = ray_boundary(P, p, b1, n, eps=1e-9 if a.dtype == torch.float64 else 1e-5)
    c = b1 + 0.5 * t.unsqueeze(-1) * n
    return c, b1, unsafe


def _rand_directions(m: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(m, k, generator=g, dtype=torch.float64)
    return d / d.norm(dim=0, keepdim=True)


def random_directions(n: int, m: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k generator directions per state, [n, m, k] float64 CPU, sampled as the reference code does
    for every call of its zonotopic ray mask: entries U[−1, 1], each column scaled to unit length."""
    d = torch.rand(n, m, k, generator=generator, dtype=torch.float64) * 2 - 1
    return d / d.norm(dim=-2, keepdim=True).clamp_min(1e-12)


@functools.cache
def _zonotope_layer(k: int, m: int, ng: int):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer
    c, ell = cp.Variable(m), cp.Variable(ng, nonneg=True)
    P, PD, p = cp.Parameter((k, m)), cp.Parameter((k, ng), nonneg=True), cp.Parameter(k)
    prob = cp.Problem(cp.Maximize(cp.geo_mean(ell)), [P @ c + PD @ ell <= p])
    return CvxpyLayer(prob, parameters=[P, PD, p], variables=[c, ell])


def zonotopic_centre(P, p, k_rows: int = 64, seed: int = 0, directions: torch.Tensor | None = None,
                     return_generators: bool = False, **solver_args):
    """Safe centre by zonotopic approximation (eq 52-53). m = 1: the interval midpoint (exact,
    the 1-generator zonotope is the whole interval). m ≥ 2: centre of the inner zonotope
    ⟨c, D diag(ℓ)⟩ ⊆ S maximising geo_mean(ℓ) over 2m unit directions D — ``directions``
    [..., m, 2m] (per state, e.g. ``random_directions`` as the reference resamples them per
    call), else fixed ones drawn from ``seed``; the containment P c + |P D| ℓ ≤ p is exact.
    cvxpylayers (differentiable), rows pruned to those that may cut the box (exact), rounded up
    to a multiple of 16 (few compiled layers), at most ``k_rows`` (raises if more are needed).
    ``return_generators``: (c, G = D diag(ℓ) [..., m, 2m]); G is NaN where the solve failed and
    the centre fell back (no inner zonotope there; m = 1: G = the half-width)."""
    m = P.shape[-1]
    if m == 1:
        lo, hi = interval_bounds(P, p)
        c = (0.5 * (lo + hi)).unsqueeze(-1)
        return (c, (0.5 * (hi - lo))[..., None, None]) if return_generators else c
    need = 2 * m + int(((p - P.abs().sum(-1))[..., 2 * m:] < 0).sum(-1).max())  # box-cutting rows
    Pk, pk, exact = prune_polytope(P, p, min(k_rows, -(-need // 16) * 16))  # (cost grows with k)
    finite = torch.isfinite(P).all(-1).all(-1) & torch.isfinite(p).all(-1)
    if not bool((exact | ~finite).all()):  # (NaN/Inf states: NaN centre, below)
        raise ValueError(f"k_rows={k_rows} does not keep every non-redundant row; raise it")
    pad = -Pk.shape[-2] % 16  # fewer rows than asked for: pad with 0·a ≤ 1 (one layer per k)
    if pad > 0:
        Pk = torch.cat([Pk, Pk.new_zeros(*Pk.shape[:-2], pad, m)], -2)
        pk = torch.cat([pk, pk.new_ones(*pk.shape[:-1], pad)], -1)
    batch = pk.shape[:-1]
    k = 2 * m
    D = _rand_directions(m, k, seed) if directions is None else directions
    D = D.to(P).expand(*batch, m, k).reshape(-1, m, k)
    layer = _zonotope_layer(Pk.shape[-2], m, k)
    Pf, pf = Pk.reshape(-1, *Pk.shape[-2:]), pk.reshape(-1, pk.shape[-1])
    try:
        c, ell = layer(Pf, (Pf @ D).abs(), pf, solver_args=solver_args or {"eps": 1e-9})
        c, ell = c.to(P.dtype), ell.to(P.dtype)  # (the layer solves in float64)
        ok = torch.isfinite(c).all(-1) & torch.isfinite(ell).all(-1)
    except Exception:  # noqa: BLE001 (the conic solver's failure: diffcp/SCS raise their own types)
        c = Pf.new_full((Pf.shape[0], m), math.nan)
        ell = Pf.new_full((Pf.shape[0], k), math.nan)
        ok = torch.zeros(Pf.shape[0], dtype=torch.bool, device=P.device)
    bad = ok.logical_not() & _finite_rows(Pf.detach(), pf.detach())
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        _solver_failed("zonotopic_centre", idx.numel(), "exception or NaN/Inf", "orthogonal centre of the box centre")
        c = c.index_put((idx,), fallback_centre(Pf[idx], pf[idx]).to(c))
        ell = ell.index_put((idx,), ell.new_full((idx.numel(), k), math.nan))
    c = c.reshape(*batch, m)
    if return_generators:
        return c, (D * ell.clamp_min(0).unsqueeze(-2)).reshape(*batch, m, k)
    return c


def fallback_centre(P, p):
    """A safe centre without a conic solve: the orthogonal centre (eq 54) of the box centre 0,
    or 0 itself where it is safe. In S wherever S is non-empty (differentiable: closed forms)."""
    zero = p.new_zeros(*p.shape[:-1], P.shape[-1])
    c, _, unsafe = orthogonal_centre(P, p, zero)
    return torch.where(unsafe.unsqueeze(-1), c, zero)


# --------------------------------------------------------------------------------------------
# composition: passthrough, regulariser, the wrapper
# --------------------------------------------------------------------------------------------
def passthrough(a: torch.Tensor, a_safe: torch.Tensor) -> torch.Tensor:
    """Value a_safe, Jacobian identity w.r.t. a: a + (a_safe − a).detach()."""
    return a + (a_safe - a).detach()


def regulariser(a_safe: torch.Tensor, a: torch.Tensor, c_reg: float = 0.1,
                reduction: str = "mean") -> torch.Tensor:
    """c_reg · MSE(a_safe, a) (eq 45). reduction 'mean' (scalar, the paper's loss term) or
    'none' (per sample: c_reg · mean over action dims)."""
    per = (a_safe - a).pow(2).mean(-1)
    return c_reg * (per.mean() if reduction == "mean" else per)


def safeguard(env, state, action, kind: str = "boundary_projection", centre: str = "orthogonal",
              lin=None, linearise: str = "state", ray_boundary_to: str = "zonotope",
              directions: torch.Tensor | None = None) -> torch.Tensor:
    """Map a policy action [..., m] (in the box) into S(state); differentiable in both.
    ``ray_boundary_to`` (zonotopic ray mask): λ_s to the inner zonotope ("zonotope", the
    reference's default) or to the polytope S ("polytope"); ``directions`` [..., m, 2m]: the
    inner zonotope's generator directions (None: fixed ones, ``zonotopic_centre``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {CENTRES}")
    if ray_boundary_to not in RAY_BOUNDARIES:
        raise ValueError(f"ray_boundary_to must be one of {RAY_BOUNDARIES}")
    reduce = env.rci_H.shape[0] > 256  # (a few rows, as the pendulum's 12: not worth it)
    P, p = safe_action_polytope(env, state, lin, linearise=linearise, reduce=reduce)
    a = action.to(p.dtype)
    if kind == "boundary_projection":
        return project_polytope(P, p, a)
    hyper = kind == "ray_mask_hyperbolic"
    if centre == "orthogonal":
        c, _, unsafe = orthogonal_centre(P, p, a)
        unsafe = unsafe.unsqueeze(-1)
        # safe actions pass through; they enter the ray map as a = c so its (unused) value and
        # gradient stay finite, and `where` then passes no NaN back
        c = torch.where(unsafe, c, a)
        return torch.where(unsafe, ray_map(P, p, a, c, hyper), a)
    if ray_boundary_to == "polytope":
        return ray_map(P, p, a, zonotopic_centre(P, p, directions=directions), hyper)
    c, G = zonotopic_centre(P, p, directions=directions, return_generators=True)
    return ray_map(P, p, a, c, hyper, generators=G)


class SafeguardedEnv(PicklableGenerators, DiffEnv):
    """A SafeGBPO task whose actions pass through a safeguard (paper §5).

    step(s, a): a ← clamp(a, −1, 1); a_safe = safeguard(s, a) (with ``passthrough``, its
    Jacobian is the identity); the task steps with a_safe and its reward and cost are returned
    unchanged. The safe set is built from the next-state set linearised at the current state
    s (paper eq 13-14; ``linearise="origin"``: at the fixed origin, as the reference code's
    wrappers are configured).

    Regulariser (eq 45): with c_reg > 0, ``last_loss_term`` holds c_reg · mean_j (safe(a) − a)_j²
    per sample after each step (the true safeguard map, also under passthrough, so its gradient
    is not zeroed by the detach). It is a policy-loss term, not a reward: the analytic-gradient
    rollout (``learners/analytic.rollout_window``) adds it, undiscounted and never bootstrapped,
    to the window loss, so the per-step loss is the reference's L_π + c_reg·MSE(a_safe, a); the
    rewards — hence critic targets, logged and evaluated returns — never contain it. PPO and SAC
    (through env hosts) ignore it: the reference applies the regulariser in SHAC's loss only,
    and the paper post-processes their actions without informing the learner (§6.1.1).

    Zonotopic ray mask: λ_s is measured to the inner zonotope by default (``ray_boundary_to``),
    and its 2m generator directions are resampled for every step (``directions="resample"``,
    as the reference does; drawn from a generator reseeded from the task's noise seed at every
    ``initial_state``, so episodes are reproducible) or fixed (``"fixed"``)."""

    accepts_device = True  # forwarded to the wrapped task
    rng_attrs = ("_dir_gen",)
    transient_attrs = ("last_loss_term",)  # (in the last step's graph: torch will not pickle it)

    def __init__(self, env=None, kind: str = "boundary_projection", centre: str = "orthogonal",
                 passthrough: bool = False, c_reg: float = 0.0, task: str | None = None,
                 linearise: str = "state", ray_boundary_to: str = "zonotope", directions: str = "resample",
                 **env_kwargs):
        if env is None:
            from saferl.envs import safegbpo_tasks
            cls = {"pendulum": safegbpo_tasks.SafeGBPOPendulum,
                   "quadrotor": safegbpo_tasks.SafeGBPOQuadrotor}[task or "pendulum"]
            env = cls(**env_kwargs)
        if kind not in KINDS or centre not in CENTRES:
            raise ValueError(f"kind ∈ {KINDS}, centre ∈ {CENTRES}")
        if ray_boundary_to not in RAY_BOUNDARIES:
            raise ValueError(f"ray_boundary_to must be one of {RAY_BOUNDARIES}, got {ray_boundary_to!r}")
        if directions not in ("resample", "fixed"):
            raise ValueError(f"directions must be 'resample' or 'fixed', got {directions!r}")
        if linearise not in ("state", "origin"):
            raise ValueError(f"linearise must be 'state' or 'origin', got {linearise!r}")
        if not c_reg >= 0:
            raise ValueError(f"c_reg must be ≥ 0, got {c_reg!r}")
        self.env, self.kind, self.centre = env, kind, centre
        self.passthrough, self.c_reg, self.linearise = passthrough, float(c_reg), linearise
        self.ray_boundary_to, self.directions = ray_boundary_to, directions
        self._dir_gen = torch.Generator().manual_seed(0)
        self.last_loss_term: torch.Tensor | None = None
        self.obs_dim, self.act_dim = env.obs_dim, env.act_dim
        self.max_episode_steps = env.max_episode_steps
        self.act_low, self.act_high = env.act_low, env.act_high

    @property
    def solver_failures(self) -> int:
        """States whose safeguard solve failed and fell back, in this process (``SOLVER_FAILURES``)."""
        return sum(SOLVER_FAILURES.values())

    def initial_state(self, n, generator):
        out = self.env.initial_state(n, generator)
        noise_gen = getattr(self.env, "_noise_gen", None)  # (reseeded from the caller's generator)
        if noise_gen is not None:
            self._dir_gen.manual_seed(int(noise_gen.initial_seed()) ^ 0x5A5A5A5A)
        return out

    def observe(self, state):
        return self.env.observe(state)

    def safeguard(self, state, action):
        """(a_used, a_safe, a): the action given to the task, the raw safeguard output, the
        clamped policy action."""
        a = action.to(state.dtype).clamp(self.act_low, self.act_high)
        directions = None
        m = self.act_dim
        if self.kind != "boundary_projection" and self.centre == "zonotopic" and m > 1 \
                and self.directions == "resample":
            n = a.reshape(-1, m).shape[0]
            directions = random_directions(n, m, 2 * m, self._dir_gen).reshape(*a.shape[:-1], m, 2 * m)
        a_safe = safeguard(self.env, state, a, self.kind, self.centre, linearise=self.linearise,
                           ray_boundary_to=self.ray_boundary_to, directions=directions).to(state.dtype)
        return (passthrough(a, a_safe) if self.passthrough else a_safe), a_safe, a

    def step(self, state, action):
        a_used, a_safe, a = self.safeguard(state, action)
        nxt, reward, cost = self.env.step(state, a_used)
        self.last_loss_term = regulariser(a_safe, a, self.c_reg, reduction="none") if self.c_reg else None
        return nxt, reward, cost

    def __getattr__(self, name):  # rci, ctrl, violations, ... of the wrapped task
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)
