"""Constrained Policy Optimization (Achiam, Held, Tamar & Abbeel 2017, §6 and Appendix 10.2).

Each update solves the trust-region problem linearised around θ_k (eq 10, x = θ − θ_k):

    max_x  gᵀx    s.t.   c + bᵀx ≤ 0,    ½ xᵀHx ≤ δ

g = ∇E[ρ Â_R] (reward surrogate), b = ∇E[ρ Â_C] (cost surrogate), H the Fisher matrix (KL
Hessian), c = J_C(π_k) − d the constraint value. With x_g = H⁻¹g, x_b = H⁻¹b (conjugate gradient)
and q = gᵀH⁻¹g, r = gᵀH⁻¹b, s = bᵀH⁻¹b, the dual (eq 12, Appendix 10.2) is

    max_{λ≥0, ν≥0}  −(q − 2νr + ν²s)/(2λ) + νc − λδ,       x* = (x_g − ν* x_b) / λ*       (eq 13)

ν*(λ) = (λc + r)₊ / s, and λ* is the better of the two pieces (A = q − r²/s, B = 2δ − c²/s):

    f_a(λ) = −½(A/λ + Bλ) + rc/s   on Λ_a = {λ ≥ 0: λc + r > 0} (cost constraint active),
             maximiser √(A/B) projected onto Λ_a
    f_b(λ) = −½(q/λ + 2δλ)         on Λ_b = {λ ≥ 0: λc + r ≤ 0},  maximiser √(q/2δ) projected

(this is the paper's eq 14 with g the gradient of the objective being maximised: the paper writes
ν* = (λc − r)₊/s, the sign it has when g is the gradient of the loss, as in Achiam's code). The
cases, numbered as in OmniSafe's CPO:

    4  b ≈ 0 and c ≤ 0: the constraint cannot bind: the TRPO step √(2δ/q) x_g
    3  c < 0, B < 0: the trust region lies inside the constraint half-space: TRPO step
    2  c < 0, B ≥ 0: feasible, the constraint may bind: the dual solution
    1  c ≥ 0, B ≥ 0: infeasible θ_k, but part of the trust region is feasible: the dual solution
    0  c ≥ 0, B < 0: no feasible point in the trust region: the recovery step that purely
       decreases the constraint, x = −√(2δ/s) x_b (paper §6.3, eq 14's "otherwise")
       (b ≈ 0 with c > 0: no direction decreases the constraint; the step is zero)

then a backtracking line search (``trust_region.backtracking_line_search``) accepts the first
fraction with D̄_KL ≤ δ(1 + tol), a cost-surrogate increase ≤ max(−c, 0) and, in the feasible
cases 2-4, a reward-surrogate improvement (OmniSafe's acceptance rule). D̄_KL and the Fisher
matrix H are of the joint action distribution, or averaged over action dimensions with
``kl_action_dims: mean`` (OmniSafe's measure, which the OmniSafe-following configs take with
tol = 0; ``learners/trpo_lag.py`` says what it changes).

The constraint value. ``cost_limit`` d is per episode (undiscounted episode cost), while the
surrogate E[ρ Â_C] is a per-step average. ``constraint_scale: per_step`` (the default) takes
c = (J_C − d) / L with L the mean episode length, which puts both on the per-step scale
(J_C(θ) − J_C(θ_k) ≈ L·E[ρ Â_C]). ``constraint_scale: episode`` takes c = J_C − d against the same
per-step surrogate, as OmniSafe 0.5's CPO and PCPO do, so |c| is up to L times larger: an
infeasible θ_k falls into the recovery case far more often and a feasible one into the plain TRPO
case (docs/results/baselines.md compares the two on a velocity task).
J_C and L are the mean undiscounted cost and length of the episodes that ended in this batch,
as the env hosts counted them from each episode's first step (the batch's ``final_cost`` and
``final_length``: an episode longer than a rollout counts whole), or, with ``cost_window``
n > 0, of the last n episodes that ended, this batch's included (OmniSafe: its 50-episode
``Metrics/EpCost`` window). When none has ended, J_C is estimated from the batch's cost signal
as mean per-step cost × max_episode_steps, with L = max_episode_steps (so the per-step c is the
mean per-step cost minus d / max_episode_steps).
The critics' value targets are discounted and would underestimate the undiscounted J_C, so they
are not used.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from saferl.batch import ended_episodes, mean_step_cost
from saferl.learners import base
from saferl.learners.onpolicy_base import standardise
from saferl.learners.trust_region import backtracking_line_search, conjugate_gradient, max_step
from saferl.learners.trust_region_base import TrustRegionLearner, TrustRegionParams

COST_GRAD_EPS = 1e-6  # ‖b‖² below this counts as "no cost gradient" (OmniSafe's threshold)


class CPOParams(TrustRegionParams):
    constraint_scale: Literal["per_step", "episode"] = Field(
        "per_step", description="c = (J_C − d)/L on the surrogate's per-step scale, or J_C − d (OmniSafe)")
    cost_window: int = Field(0, ge=0, description="J_C over the last n ended episodes (OmniSafe: 50); "
                             "0: the episodes that ended in this batch")


@dataclass
class CPOSolution:
    step: torch.Tensor
    case: int
    lam: float
    nu: float


def _project(value: float, interval: tuple[float, float] | None) -> float | None:
    return None if interval is None else min(max(value, interval[0]), interval[1])


def cpo_step(x_g: torch.Tensor, x_b: torch.Tensor | None, q: float, r: float, s: float, c: float,
             delta: float) -> CPOSolution:
    """The solution of eq 10 from x_g = H⁻¹g, x_b = H⁻¹b (None when b ≈ 0) and the scalars
    q = gᵀH⁻¹g, r = gᵀH⁻¹b, s = bᵀH⁻¹b (module docstring: cases 0-4)."""
    q, r, s, c = float(q), float(r), float(s), float(c)
    if x_b is None:
        if c <= 0:
            return CPOSolution(max_step(x_g, q, delta), 4, math.sqrt(q / (2 * delta)), 0.0)
        return CPOSolution(torch.zeros_like(x_g), 0, 0.0, 0.0)
    A, B = max(q - r * r / s, 0.0), 2 * delta - c * c / s
    if c < 0 and B < 0:
        return CPOSolution(max_step(x_g, q, delta), 3, math.sqrt(q / (2 * delta)), 0.0)
    if c >= 0 and B < 0:
        return CPOSolution(-math.sqrt(2 * delta / s) * x_b, 0, 0.0, math.sqrt(2 * delta / s))
    # Λ_a = {λ ≥ 0 : λc + r > 0} and its complement Λ_b, as intervals (None if empty).
    inf = math.inf
    if c > 0:
        t = -r / c
        set_a, set_b = (max(t, 0.0), inf), ((0.0, t) if t > 0 else None)
    elif c < 0:
        t = -r / c
        set_a, set_b = ((0.0, t) if t > 0 else None), (max(t, 0.0), inf)
    else:
        set_a, set_b = ((0.0, inf), None) if r > 0 else (None, (0.0, inf))
    B = max(B, 1e-12)
    lam_a = _project(math.sqrt(A / B), set_a)
    lam_b = _project(math.sqrt(q / (2 * delta)), set_b)

    def f_a(lam):
        return -0.5 * (A / max(lam, 1e-12) + B * lam) + r * c / s

    def f_b(lam):
        return -0.5 * (q / max(lam, 1e-12) + 2 * delta * lam)

    val_a = f_a(lam_a) if lam_a is not None else -inf
    val_b = f_b(lam_b) if lam_b is not None else -inf
    lam = lam_a if val_a >= val_b else lam_b
    lam = max(lam, 1e-12)
    nu = max(lam * c + r, 0.0) / s
    return CPOSolution((x_g - nu * x_b) / lam, 2 if c < 0 else 1, lam, nu)


class CPO(TrustRegionLearner):
    Params = CPOParams

    def __init__(self, params: CPOParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.recent: deque = deque(maxlen=params.cost_window or None)  # (cost, length) of ended episodes

    def constraint_value(self, batches: list[dict]) -> tuple[float, float, float]:
        """(c, J_C, L): c = (J_C − d) / L, or J_C − d with ``constraint_scale: episode``
        (module docstring)."""
        ended = list(zip(*ended_episodes(batches)))
        if self.p.cost_window:
            self.recent.extend(ended)
            ended = list(self.recent)
        if ended:
            j_c, length = (float(np.mean(x)) for x in zip(*ended))
        else:
            length = float(self.env.max_episode_steps)
            j_c = mean_step_cost(batches) * length
        excess = j_c - self.cost_limit
        return (excess if self.p.constraint_scale == "episode" else excess / length), j_c, length

    def search(self, k, step, adv_r, adv_c, loss_before: float, cost_before: float, c: float,
               require_improvement: bool):
        """Backtracking along ``step`` until the KL is within the trust region and the cost
        surrogate rises by at most max(−c, 0) (and, if required, the reward surrogate improves)."""
        p = self.p

        def evaluate(fraction: float):
            k.move(step, fraction)
            return k.measure(adv_r, adv_c)

        return backtracking_line_search(
            evaluate, loss_before, p.target_kl, kl_tolerance=p.kl_tolerance, backtrack_coef=p.backtrack_coef,
            max_tries=p.max_backtracks, require_improvement=require_improvement, cost_before=cost_before,
            max_cost_increase=max(-c, 0.0))

    def linearise(self, prep: dict, batches: list[dict], tag: str):
        """The quadratic model's ingredients at θ_k: the constraint value c, Â_R z-scored and Â_C centred,
        π_k, the surrogate gradients g = ∇E[ρÂ_R] and b = ∇E[ρÂ_C], the surrogates at θ_k, and the
        constraint value as metrics."""
        c, j_c, length = self.constraint_value(batches)
        adv_r, adv_c = standardise(prep["adv_r"]), prep["adv_c"] - prep["adv_c"].mean()
        k = self.policy_at_k(prep)
        loss_before, _, cost_before = k.measure(adv_r, adv_c)
        stats = {f"{tag}/c": c, f"{tag}/j_c": j_c, f"{tag}/episode_length": length}
        return c, adv_r, adv_c, k, k.gradient(adv_r), k.gradient(adv_c), loss_before, cost_before, stats

    def policy_step(self, prep: dict, batches: list[dict]) -> dict:
        p = self.p
        c, adv_r, adv_c, k, g, b, loss_before, cost_before, stats = self.linearise(prep, batches, "cpo")
        cg_g = conjugate_gradient(k.fvp, g, p.cg_iters)
        # H⁻¹b unless b ≈ 0 while feasible (case 4); s ≤ 0 means b is numerically in H's null space
        cg_b = conjugate_gradient(k.fvp, b, p.cg_iters) if b @ b > COST_GRAD_EPS or c > 0 else None
        failed = cg_g.failed or (cg_b is not None and cg_b.failed)
        stats.update(cg_iters=cg_g.iterations, cg_residual=cg_g.residual, cg_failed=float(failed))
        step, res = torch.zeros_like(g), None
        if not failed:
            x_b = cg_b.x if cg_b is not None else None
            q = (cg_g.x @ k.fvp(cg_g.x)).item()
            r, s = ((g @ x_b).item(), (b @ x_b).item()) if x_b is not None else (0.0, 0.0)
            sol = cpo_step(cg_g.x, x_b if s > 0 else None, q, r, s, c, p.target_kl)
            step = sol.step
            stats.update({"cpo/case": sol.case, "cpo/lambda": sol.lam, "cpo/nu": sol.nu,
                          "cpo/q": q, "cpo/r": r, "cpo/s": s})
            res = self.search(k, step, adv_r, adv_c, loss_before, cost_before, c, require_improvement=sol.case >= 2)
        fraction = res.fraction if res is not None else 0.0
        k.move(step, fraction)
        loss, kl, cost = k.measure(adv_r, adv_c)
        return {**stats, "loss_pi": loss, "loss_pi_before": loss_before, "loss_cost": cost,
                "loss_cost_before": cost_before, "kl": kl, "step_fraction": fraction,
                "search_tries": res.tries if res is not None else 0,
                "step_accepted": float(res is not None and res.accepted),
                "step_norm": (fraction * step).norm().item()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "recent": list(self.recent)}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.recent = deque(sd.get("recent", []), maxlen=self.recent.maxlen)
