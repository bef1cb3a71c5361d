"""CGPO trust-region step and adaptive radius (Safe RL using Finite-Horizon Gradient-based
Estimation, ICML 2024: §5.1-5.2, Appendix A.2, Algorithm 2).

With g = ∇J_R(θ_k), q = ∇J_C(θ_k), c = J_C(θ_k) − b and δ = θ − θ_k, the sub-problem (eq 10) is

    max_δ gᵀδ   s.t.   c + qᵀδ ≤ 0,   δᵀδ ≤ δ̂.

δ̂ is a *squared* radius everywhere here (the paper also writes √δ̂ for step lengths, consistent
with this). Theorem 5.1 / Corollary 5.2 split it by c²/qᵀq vs δ̂:

    (a) c²/qᵀq ≥ δ̂, c > 0: infeasible; recovery δ = −√δ̂ q/‖q‖                 (eq 33)
    (b) c²/qᵀq ≥ δ̂, c ≤ 0: the ball is feasible; δ = √δ̂ g/‖g‖                  (eq 34)
    (c) otherwise: KKT (eq 36-39) of L = −gᵀδ + ν(c + qᵀδ) + λ/2 (δᵀδ − δ̂)     (eq 35)
        i.e. g − νq = λδ; λ*, ν* from Algorithm 2 (eq 42-46); δ = (g − ν*q)/λ*  (eq 47)

Algorithm 1 uses ≥ where Theorem 5.1 has >: at c² = δ̂ qᵀq with c > 0 the feasible set is the
single point −√δ̂ q/‖q‖, which is exactly the recovery step, and with c < 0 the closed ball is
still feasible, so ≥ is exact and keeps δ̂ − c²/t > 0 strictly inside case (c). Case (b) takes
c ≤ 0 (Corollary 5.2; Algorithm 1's "c < 0" leaves c = 0 to no branch), and §5.1's
"g_k ≜ ∇J_C(θ_k)" is read as q_k.

Numerics: case (c) is solved after scaling to ‖g‖ = ‖q‖ = δ̂ = 1 (δ is invariant to g → αg and
(q, c) → α(q, c), α > 0), and the Cauchy-Schwarz gap r − s²/t is evaluated as ‖g − (s/t)q‖²
rather than by subtraction. Degenerate inputs return the minimum-norm optimal δ (never NaN):
q = 0 and c > 0 → δ = 0 (no direction lowers the linearised cost; reported infeasible);
q = 0 and c ≤ 0 → case (b); g = 0 → δ = 0, or in case (c) with c > 0, the closest feasible
point −c q/qᵀq; g = νq with ν > 0 (λ* = 0: the ball is inactive and the optimum not unique;
"parallel" means ‖g⊥‖ ≤ 8ε‖g‖, costing at most that in gᵀδ) → −c q/qᵀq, the nearest point
of the plane.

The paper mentions several constraints "via corresponding matrix operations" without giving
them; no closed form like Algorithm 2 exists for m > 1, so only the single constraint is here.

Adaptive radius (eq 18): ρ_k = (J_R(θ_{k+1}) − J_R(θ_k)) / (Ĵ_R(θ_{k+1}) − J_R(θ_k)) and
ζ_k = |b − J_C(θ_{k+1})| / |J_C(θ_{k+1}) − Ĵ_C(θ_{k+1})| with Ĵ(θ_k + δ) = J(θ_k) + δᵀ∇J (eq 6-7).
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

INF = math.inf
PARALLEL_TOL = 8 * np.finfo(np.float64).eps   # ‖g⊥‖/‖g‖ below this counts as g ∥ q


# ---------------------------------------------------------------- sub-problem (eq 10)

def _norm(x: np.ndarray) -> float:
    """2-norm without overflow/underflow of xᵀx."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    return 0.0 if m == 0.0 else m * float(np.sqrt(np.dot(x / m, x / m)))


Interval = tuple[float, float] | None


def lambda_sets(s: float, c: float) -> tuple[Interval, Interval]:
    """Closures of Λa = {λ ≥ 0 | λc + s > 0}, Λb = {λ ≥ 0 | λc + s ≤ 0} as (lo, hi); None if empty.

    The paper's intervals (after eq 43) omit the intersection with λ ≥ 0, empty sets and c = 0.
    """
    if c == 0.0:
        return ((0.0, INF), None) if s > 0 else (None, (0.0, INF))
    x = -s / c
    if c > 0:
        return (max(x, 0.0), INF), ((0.0, x) if x >= 0 else None)
    return ((0.0, x) if x > 0 else None), (max(x, 0.0), INF)


def _proj(x: float, interval: Interval) -> float | None:
    return None if interval is None else min(max(x, interval[0]), interval[1])


def _over(num: float, lam: float) -> float:
    """num/λ with num/0 = +inf for num > 0 and 0/0 = 0 (the λ → 0 limits of La, Lb)."""
    return num / lam if lam > 0 else (INF if num > 0 else 0.0)


def dual_variables(r: float, s: float, t: float, c: float, radius_sq: float,
                   gap: float | None = None) -> tuple[float, float]:
    """Algorithm 2 (eq 42-46) for case (c), i.e. t > 0 and c² < δ̂ t; returns (λ*, ν*).

    r = gᵀg, s = gᵀq, t = qᵀq; gap = r − s²/t ≥ 0 (pass ‖g − (s/t)q‖² for accuracy).
        La(λ) = −gap/(2λ) − λ/2 (δ̂ − c²/t) + sc/t,   λ ∈ Λa   (ν = (λc + s)/t)
        Lb(λ) = −(r/λ + λδ̂)/2,                        λ ∈ Λb   (ν = 0)
    Both are concave, so projecting their stationary points √(gap/(δ̂ − c²/t)) and √(r/δ̂) onto
    the intervals maximises each piece; the larger piece wins (ties → λb, as in Algorithm 2).
    Λa is open: a λa projected onto its end −s/c (where ν = 0) has La(λa) = Lb(λa) ≤ Lb(λb), so
    it is dropped rather than compared, which would only let rounding pick it.
    """
    gap = max(r - s * s / t, 0.0) if gap is None else gap
    slack = (radius_sq * t - c * c) / t
    set_a, set_b = lambda_sets(s, c)
    lam_a = _proj(math.sqrt(gap / slack), set_a)
    if lam_a is not None and c != 0 and lam_a == -s / c:
        lam_a = None
    lam_b = _proj(math.sqrt(r / radius_sq), set_b)
    la = -INF if lam_a is None else -0.5 * _over(gap, lam_a) - 0.5 * lam_a * slack + s * c / t
    lb = -INF if lam_b is None else -0.5 * (_over(r, lam_b) + lam_b * radius_sq)
    lam = lam_a if la > lb else lam_b
    return lam, max((lam * c + s) / t, 0.0)


def _case_c_unit(gn: np.ndarray, qn: np.ndarray, cn: float):
    """Case (c) with ‖g‖ = ‖q‖ = δ̂ = 1, |c| < 1: (δ, λ, ν, degenerate reason or None)."""
    s = float(np.dot(gn, qn))
    g_perp = gn - s * qn
    g_perp -= float(np.dot(qn, g_perp)) * qn          # re-orthogonalise ("twice is enough")
    gap = float(np.dot(g_perp, g_perp))
    if gap <= PARALLEL_TOL ** 2:                        # g ∥ q up to rounding: g⊥ is noise
        g_perp, gap = np.zeros_like(g_perp), 0.0
    lam, nu = dual_variables(1.0, s, 1.0, cn, 1.0, gap=gap)
    if lam == 0.0:                                      # g = νq, ν > 0: ball inactive
        return -cn * qn, 0.0, nu, "g parallel to q: minimum-norm point of the plane"
    if nu > 0.0:                                        # eq 47 with ν = λc + s (eq 42)
        return g_perp / lam - cn * qn, lam, nu, None
    return gn / lam, lam, 0.0, None                     # eq 47 with ν = 0


def _check(g, q, c, radius_sq):
    g = np.asarray(g, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if g.ndim != 1 or g.shape != q.shape:
        raise ValueError(f"g and q must be 1-D of equal length, got {g.shape} and {q.shape}")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(q)) and math.isfinite(c)):
        raise ValueError("g, q and c must be finite")
    if not (math.isfinite(radius_sq) and radius_sq > 0):
        raise ValueError(f"radius_sq must be positive and finite, got {radius_sq}")
    return g, q, float(c), float(radius_sq)


def solve_subproblem(g, q, c: float, radius_sq: float) -> tuple[np.ndarray, dict]:
    """The step δ of eq 10 (cases a-c above). ``info``: case ('a'|'b'|'c'), lam, nu (the paper's
    scaling, g − νq = λδ; None in the infeasible case a), gain gᵀδ, constraint c + qᵀδ,
    feasible (constraint ≤ 1e-10 (|c| + ‖q‖√δ̂)) and degenerate (None or the fallback used)."""
    g, q, c, radius_sq = _check(g, q, c, radius_sq)
    gnorm, qnorm, rad = _norm(g), _norm(q), math.sqrt(radius_sq)
    cn = c / (qnorm * rad) if qnorm > 0 else (INF if c > 0 else -INF)
    lam = nu = degenerate = None
    if cn * cn >= 1.0 and c > 0:                       # (a) eq 33
        case = "a"
        if qnorm > 0:
            delta = -rad * (q / qnorm)
        else:
            delta, degenerate = np.zeros_like(g), "q = 0 and c > 0: no descent direction"
    elif cn * cn >= 1.0:                               # (b) eq 34
        case, nu = "b", 0.0
        lam = gnorm / rad
        delta = rad * (g / gnorm) if gnorm > 0 else np.zeros_like(g)
        degenerate = None if gnorm > 0 else "g = 0: zero step"
    else:                                              # (c) Algorithm 2, eq 47
        case, qn = "c", q / qnorm
        if gnorm == 0.0:
            delta, lam, nu = -max(cn, 0.0) * rad * qn, 0.0, 0.0
            degenerate = "g = 0: minimum-norm feasible point"
        else:
            d, lam_n, nu_n, degenerate = _case_c_unit(g / gnorm, qn, cn)
            delta, lam, nu = rad * d, gnorm * lam_n / rad, gnorm * nu_n / qnorm
    dn = _norm(delta)
    if dn > rad:                                       # rounding only: pull back onto the ball
        delta = delta * (rad / dn)
    constraint = c + float(np.dot(q, delta))
    return delta, {"case": case, "lam": lam, "nu": nu, "gain": float(np.dot(g, delta)),
                   "constraint": constraint,
                   "feasible": bool(constraint <= 1e-10 * (abs(c) + qnorm * rad)),
                   "degenerate": degenerate}


# ---------------------------------------------------------------- adaptive radius (eq 18)

class RadiusParams(BaseModel):
    """δ̂ schedule of eq 18; defaults from Table 4 (CartPole/HalfCheetah/Ant; Reacher uses
    init 1e-2, upper 1e-1). The table's "delta" values are read as δ̂, the squared radius.
    η1, η2 are not given in the paper."""
    model_config = ConfigDict(extra="forbid")
    init: float = Field(1e-3, gt=0)
    lower: float = Field(1e-4, gt=0)
    upper: float = Field(1e-2, gt=0)
    beta1: float = Field(0.8, gt=0, lt=1, description="shrink factor")
    beta2: float = Field(1.25, gt=1, description="growth factor")
    eta1: float = Field(0.25, gt=0, lt=1, description="shrink if ρ or ζ below")
    eta2: float = Field(0.75, gt=0, lt=1, description="grow if ρ and ζ at least")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.lower <= self.init <= self.upper:
            raise ValueError("need lower ≤ init ≤ upper")
        if not self.eta1 < self.eta2:
            raise ValueError("need eta1 < eta2")
        return self


def _ratio(num: float, den: float) -> float:
    """num/den with x/0 = ±inf by the sign of x and 0/0 = 1 (no evidence against the model)."""
    if den != 0.0:
        return num / den
    return 1.0 if num == 0.0 else math.copysign(INF, num)


def reduction_ratio(j_r_old: float, j_r_new: float, j_r_pred: float) -> float:
    """ρ_k = (J_R(θ_k) − J_R(θ_{k+1})) / (Ĵ_R(θ_k) − Ĵ_R(θ_{k+1})), Ĵ_R(θ_k) = J_R(θ_k),
    j_r_pred = Ĵ_R(θ_{k+1}) = J_R(θ_k) + gᵀδ: actual over predicted change of J_R. Taken as
    written also when gᵀδ < 0 (case a); a zero prediction gives ±inf (1 if nothing changed)."""
    return _ratio(j_r_new - j_r_old, j_r_pred - j_r_old)


def toleration_ratio(j_c_new: float, j_c_pred: float, limit: float) -> float:
    """ζ_k = |b − J_C(θ_{k+1})| / |J_C(θ_{k+1}) − Ĵ_C(θ_{k+1})|, j_c_pred = J_C(θ_k) + qᵀδ: the
    distance to the limit (either side, as written) in units of the constraint model's error.
    An exact prediction gives +inf."""
    err = abs(j_c_new - j_c_pred)
    return abs(limit - j_c_new) / err if err > 0 else INF


def adapt_radius(radius_sq: float, rho: float, zeta: float, p: RadiusParams) -> float:
    """Eq 18: β1 δ̂ if ρ < η1 or ζ < η1 (NaN counts as below), β2 δ̂ if ρ ≥ η2 and ζ ≥ η2,
    else δ̂; the result is clipped to [lower, upper] (eq 18 clips the changed branches only,
    the same whenever δ̂ starts inside the range)."""
    if not (rho >= p.eta1 and zeta >= p.eta1):
        radius_sq *= p.beta1
    elif rho >= p.eta2 and zeta >= p.eta2:
        radius_sq *= p.beta2
    return float(min(max(radius_sq, p.lower), p.upper))
