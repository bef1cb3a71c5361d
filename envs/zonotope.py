"""Zonotopes for SafeGBPO (SafeGBPO paper, §3 "Preliminaries", eq 1-6), batched torch.

    Z = ⟨c, G⟩ = {c + Gγ : ‖γ‖∞ ≤ 1},   c [..., n],  G [..., n, p]          (eq 1)

Batch dimensions broadcast everywhere. Closed-form operations are differentiable torch
(any device / dtype): Minkowski sum (eq 2), translation, linear map (eq 3), support function
(eq 4), interval hull, sampling, the square-generator point test and the halfspace form. The
linear programs — point containment (eq 5) and the sufficient zonotope-in-zonotope certificate
(eq 6) — are solved with scipy's HiGHS on CPU float64, one problem per batch element (checks
and monitors, not gradients; the safeguards build their own differentiable programs).

``load_sets(task)`` returns the precomputed RCI state set and CTRL action set of the paper's
Pendulum / Quadrotor (reference code TimWalter/SafeGBPO @ 4ef0aec, ``*_generators_4.pt``),
shipped as ``envs/data/safegbpo_zonotopes.json``.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data" / "safegbpo_zonotopes.json"


class Zonotope:
    """⟨c, G⟩ with center [..., n] and generators [..., n, p] (batch shapes broadcast)."""

    def __init__(self, center: torch.Tensor, generators: torch.Tensor):
        if generators.shape[-2] != center.shape[-1]:
            raise ValueError(f"center {tuple(center.shape)} and generators "
                             f"{tuple(generators.shape)} disagree")
        self.center, self.generators = center, generators

    # --- shape / conversion -------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.center.shape[-1]

    @property
    def num_generators(self) -> int:
        return self.generators.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.center.shape[:-1], self.generators.shape[:-2])

    def expand(self, *batch: int) -> Zonotope:
        return Zonotope(self.center.expand(*batch, self.dim),
                        self.generators.expand(*batch, self.dim, self.num_generators))

    def to(self, *args, **kwargs) -> Zonotope:
        return Zonotope(self.center.to(*args, **kwargs), self.generators.to(*args, **kwargs))

    def detach(self) -> Zonotope:
        return Zonotope(self.center.detach(), self.generators.detach())

    def __getitem__(self, idx) -> Zonotope:
        z = self.expand(*self.batch_shape)
        return Zonotope(z.center[idx], z.generators[idx])

    def __repr__(self) -> str:
        return f"Zonotope(batch={tuple(self.batch_shape)}, n={self.dim}, p={self.num_generators})"

    # --- set operations (eq 2-3) --------------------------------------------------------
    def __add__(self, other) -> Zonotope:
        """Minkowski sum ⟨c1 + c2, [G1 G2]⟩ (eq 2) with a zonotope, or a translation by a vector."""
        if isinstance(other, Zonotope):
            batch = torch.broadcast_shapes(self.batch_shape, other.batch_shape)
            g1 = self.generators.expand(*batch, self.dim, self.num_generators)
            g2 = other.generators.expand(*batch, other.dim, other.num_generators)
            return Zonotope(self.center + other.center, torch.cat([g1, g2], -1))
        return Zonotope(self.center + torch.as_tensor(other, dtype=self.center.dtype,
                                                      device=self.center.device), self.generators)

    __radd__ = __add__

    def __sub__(self, vector) -> Zonotope:
        return self + (-torch.as_tensor(vector, dtype=self.center.dtype, device=self.center.device))

    def linear_map(self, matrix: torch.Tensor) -> Zonotope:
        """M Z = ⟨M c, M G⟩ (eq 3); matrix [..., m, n]."""
        return Zonotope((matrix @ self.center.unsqueeze(-1)).squeeze(-1), matrix @ self.generators)

    def __rmatmul__(self, matrix: torch.Tensor) -> Zonotope:
        return self.linear_map(matrix)

    def scale(self, factor) -> Zonotope:
        """Scale about the centre: ⟨c, s G⟩."""
        return Zonotope(self.center, self.generators * factor)

    # --- support, hull, sampling (eq 4) -------------------------------------------------
    def support(self, direction: torch.Tensor) -> torch.Tensor:
        """h_Z(d) = dᵀc + ‖Gᵀd‖₁ (eq 4); direction [..., n] -> [...]."""
        return ((direction * self.center).sum(-1)
                + (direction.unsqueeze(-1) * self.generators).sum(-2).abs().sum(-1))

    def interval_hull(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tightest axis-aligned box (lo, hi) = c ∓ Σ_j |G_ij|."""
        radius = self.generators.abs().sum(-1)
        return self.center - radius, self.center + radius

    def box(self) -> Zonotope:
        """The interval hull as a zonotope ⟨c, diag(radius)⟩."""
        lo, hi = self.interval_hull()
        return Zonotope((lo + hi) / 2, torch.diag_embed((hi - lo) / 2))

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """c + Gγ with γ ~ U[−1, 1]^p (uniform in γ, not in Z): [num, *batch, n].

        γ is drawn on the generator's device (CPU by default) then moved, so samples from a
        seeded CPU generator are identical on every device."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        gamma = torch.rand(num, *self.batch_shape, self.num_generators, generator=generator,
                           dtype=self.center.dtype, device=gen_device).to(self.center.device) * 2 - 1
        return self.center + (self.generators @ gamma.unsqueeze(-1)).squeeze(-1)

    # --- point containment (eq 5) -------------------------------------------------------
    def gauge_square(self, point: torch.Tensor) -> torch.Tensor:
        """Closed form ‖G⁻¹(x − c)‖∞ when G is square and invertible (differentiable, batched)."""
        gamma = torch.linalg.solve(self.generators, (point - self.center).unsqueeze(-1)).squeeze(-1)
        return gamma.abs().amax(-1)

    def gauge(self, point: torch.Tensor) -> torch.Tensor:
        """min ‖γ‖∞ s.t. c + Gγ = x (eq 5 as an LP): ≤ 1 iff x ∈ Z; inf if x − c ∉ range(G).

        Square invertible G uses the closed form; otherwise one HiGHS LP per batch element."""
        n, p = self.dim, self.num_generators
        if n == p and torch.linalg.matrix_rank(self.generators.detach()).min() == n:
            return self.gauge_square(point)
        batch = torch.broadcast_shapes(self.batch_shape, point.shape[:-1])
        c = _np(self.center, batch, (n,))
        g = _np(self.generators, batch, (n, p))
        x = _np(point, batch, (n,))
        out = np.array([_lp_gauge(g[i], x[i] - c[i]) for i in range(c.shape[0])]).reshape(batch)
        return torch.as_tensor(out, dtype=self.center.dtype, device=self.center.device)

    def contains_point(self, point: torch.Tensor, tol: float = 1e-7) -> torch.Tensor:
        """x ∈ Z (exact, eq 5) with tolerance tol on ‖γ‖∞ (an LP per batch element)."""
        return self.gauge(point) <= 1 + tol

    def halfspaces(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact H-representation {x : Hx ≤ h} of a full-dimensional zonotope (rows of H unit).

        Facet normals are the generalised cross products of every (n − 1)-subset of the
        nonzero generators (Althoff, Stursberg & Buss 2010, Thm 7); h_i = h_Z(H_i) (eq 4).
        Cost grows as C(p, n − 1): meant for the fixed RCI/CTRL sets (Quadrotor: C(19, 5)).
        Unbatched only. Computed in float64, returned in Z's dtype/device."""
        if self.center.dim() != 1:
            raise ValueError("halfspaces() takes an unbatched zonotope")
        g = self.generators.detach().double().cpu()
        g = g[:, g.abs().amax(0) > 1e-12]
        n = self.dim
        if torch.linalg.matrix_rank(g) < n:
            raise ValueError("halfspaces() needs a full-dimensional zonotope")
        if n == 1:
            normals = torch.tensor([[1.0]], dtype=torch.float64)
        else:
            subsets = torch.tensor(list(itertools.combinations(range(g.shape[1]), n - 1)))
            m = g[:, subsets].permute(1, 0, 2)  # [k, n, n-1]
            rows = torch.arange(n)
            cof = torch.stack([(-1) ** i * torch.linalg.det(m[:, rows != i, :]) for i in range(n)], -1)
            norm = cof.norm(dim=-1, keepdim=True)
            keep = norm.squeeze(-1) > 1e-10 * norm.max()
            normals = cof[keep] / norm[keep]
            # parallel generator subsets give the same normal: canonical sign, then dedupe
            lead = torch.gather(normals, 1, (normals.abs() > 1e-9).int().argmax(1, keepdim=True))
            normals = torch.unique((normals * lead.sign()).mul(1e9).round().div(1e9), dim=0)
            normals = normals / normals.norm(dim=-1, keepdim=True)
        normals = torch.cat([normals, -normals])
        offsets = Zonotope(self.center.detach().double().cpu(), g).support(normals)
        return normals.to(self.center), offsets.to(self.center)

    # --- zonotope containment (eq 6) ----------------------------------------------------
    def containment_certificate(self, inner: Zonotope) -> torch.Tensor:
        """min ‖[Γ | β]‖∞ (max row sum of |·|) s.t. G_in = G_out Γ, c_out − c_in = G_out β.

        ≤ 1 certifies inner ⊆ self (sufficient, Sadraddini & Tedrake 2019; paper eq 6);
        inf when no (Γ, β) exists. One HiGHS LP per batch element."""
        n, p2, p1 = self.dim, self.num_generators, inner.num_generators
        batch = torch.broadcast_shapes(self.batch_shape, inner.batch_shape)
        c2, g2 = _np(self.center, batch, (n,)), _np(self.generators, batch, (n, p2))
        c1, g1 = _np(inner.center, batch, (n,)), _np(inner.generators, batch, (n, p1))
        out = np.array([_lp_certificate(g2[i], g1[i], c2[i] - c1[i]) for i in range(c2.shape[0])])
        return torch.as_tensor(out.reshape(batch), dtype=self.center.dtype, device=self.center.device)

    def contains_zonotope(self, inner: Zonotope, tol: float = 1e-7) -> torch.Tensor:
        """Sufficient test inner ⊆ self (eq 6): True is a proof, False may be conservative."""
        return self.containment_certificate(inner) <= 1 + tol


def _np(t: torch.Tensor, batch, tail) -> np.ndarray:
    return t.detach().double().cpu().expand(*batch, *tail).reshape(-1, *tail).numpy()


def _lp_gauge(g: np.ndarray, d: np.ndarray) -> float:
    """min t s.t. Gγ = d, −t ≤ γ ≤ t (variables [γ, t])."""
    from scipy.optimize import linprog

    n, p = g.shape
    eye = np.eye(p)
    a_ub = np.block([[eye, -np.ones((p, 1))], [-eye, -np.ones((p, 1))]])
    res = linprog(np.r_[np.zeros(p), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * p),
                  A_eq=np.c_[g, np.zeros(n)], b_eq=d, bounds=[(None, None)] * p + [(0, None)],
                  method="highs")
    return res.fun if res.status == 0 else float("inf")


def _lp_certificate(g2: np.ndarray, g1: np.ndarray, dc: np.ndarray) -> float:
    """min t s.t. G2 Γ = G1, G2 β = dc, U ≥ |[Γ | β]|, Σ_j U_ij ≤ t.

    Variables: M = [Γ | β] (p2 × (p1+1), row-major), U (same shape), t."""
    from scipy.optimize import linprog

    n, p2 = g2.shape
    q = g1.shape[1] + 1  # columns of M
    k = p2 * q
    a_eq = np.c_[np.kron(g2, np.eye(q)), np.zeros((n * q, k + 1))]  # (G2 M)[r, j] = [G1 | dc][r, j]
    b_eq = np.c_[g1, dc].reshape(-1)
    eye = np.eye(k)
    rowsum = np.kron(np.eye(p2), np.ones((1, q)))
    a_ub = np.block([[eye, -eye, np.zeros((k, 1))],
                     [-eye, -eye, np.zeros((k, 1))],
                     [np.zeros((p2, k)), rowsum, -np.ones((p2, 1))]])
    cost = np.zeros(2 * k + 1)
    cost[-1] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * k + p2), A_eq=a_eq, b_eq=b_eq,
                  bounds=[(None, None)] * k + [(0, None)] * (k + 1), method="highs")
    return res.fun if res.status == 0 else float("inf")


class SafeSets(NamedTuple):
    rci: Zonotope  # robust control invariant state set
    ctrl: Zonotope  # control (safe action) set


def load_sets(task: str, dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> SafeSets:
    """RCI and CTRL zonotopes of ``'pendulum'`` (n = 2 / m = 1) or ``'quadrotor'`` (6 / 2)."""
    sets = json.loads(DATA.read_text())["sets"]
    if f"{task}_rci" not in sets:
        raise ValueError(f"no sets for task {task!r}; known: pendulum, quadrotor")

    def make(key):
        s = sets[key]
        return Zonotope(torch.tensor(s["center"], dtype=dtype, device=device),
                        torch.tensor(s["generators"], dtype=dtype, device=device))

    return SafeSets(make(f"{task}_rci"), make(f"{task}_ctrl"))
