"""Projection-Based Constrained Policy Optimization (Yang, Rosca, Narasimhan & Ramadge 2020, ICLR).

Two steps per update, both linearised around θ_k (x = θ − θ_k):

  reward improvement (TRPO):  x_½ = argmax_x gᵀx   s.t.  ½ xᵀHx ≤ δ
                                  = √(2δ / gᵀH⁻¹g) H⁻¹g
  projection:                 x* = argmin_x ½ (x − x_½)ᵀ L (x − x_½)   s.t.  aᵀx + c ≤ 0
                                  = x_½ − max(0, (aᵀx_½ + c) / aᵀL⁻¹a) L⁻¹a

with g = ∇E[ρ Â_R] (reward surrogate, Â_R z-scored), a = ∇E[ρ Â_C] (cost surrogate, Â_C centred),
H the Fisher matrix (Hessian of the mean KL), c = J_C(π_k) − d the constraint value, and the
projection metric L = H (KL projection) or L = I (L2 projection). Substituting x_½ gives the
paper's closed-form update

    θ_{k+1} = θ_k + √(2δ/gᵀH⁻¹g) H⁻¹g − max(0, (√(2δ/gᵀH⁻¹g) aᵀH⁻¹g + c) / aᵀL⁻¹a) L⁻¹a.

H⁻¹g and H⁻¹a come from conjugate gradient with Fisher-vector products, gᵀH⁻¹g is measured as
xᵀHx (``learners/trust_region.py``, shared with TRPO and CPO). The paper takes the step as is;
``line_search: false`` gives that. As OmniSafe's PCPO does, a backtracking line search (on by
default) accepts the first fraction 1, β, β², … with D̄_KL ≤ δ(1 + tol) and a cost-surrogate
increase ≤ max(−c, 0); OmniSafe calls CPO's search with up to 200 fractions and without CPO's
requirement that a feasible step improve the reward surrogate (``improvement_required`` adds it).
The constraint value c is CPO's (``learners/cpo.py``): (J_C − d)/L on the per-step scale, or J_C − d
over a 50-episode window as OmniSafe's (``constraint_scale``, ``cost_window``). H and D̄_KL are of
the joint action distribution, or averaged over action dimensions with ``kl_action_dims: mean``
(OmniSafe's measure; ``learners/trpo_lag.py``). No dual variable: the constraint enters each
step, so no ``dual`` phase.

One difference from OmniSafe 0.5 is kept on purpose: its reward step is √(2δ/q)·F(H⁻¹g), the
Fisher-vector product of the CG solution, which is g up to the CG residual, not the
natural-gradient step √(2δ/q)·H⁻¹g that the paper (and OmniSafe's own projection coefficient)
is written for; saferl takes the paper's.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from saferl.learners.cpo import COST_GRAD_EPS, CPO, CPOParams
from saferl.learners.trust_region import conjugate_gradient, max_step


class PCPOParams(CPOParams):
    metric: Literal["kl", "l2"] = Field("kl", description="projection metric L: H (KL, the paper's "
                                        "choice in its experiments and OmniSafe's) or I (L2)")
    line_search: bool = Field(True, description="backtrack the projected step (OmniSafe); false: the paper's step")
    improvement_required: bool = Field(False, description="the line search also requires a reward-surrogate "
                                       "improvement when θ_k is feasible (CPO's rule; not OmniSafe's PCPO)")


def project_to_halfspace(x: torch.Tensor, a: torch.Tensor, l_inv_a: torch.Tensor, c: float
                         ) -> tuple[torch.Tensor, float]:
    """argmin_y ½ (y − x)ᵀL(y − x) s.t. aᵀy + c ≤ 0, given L⁻¹a: (y, ν) with y = x − ν L⁻¹a,
    ν = max(0, (aᵀx + c) / aᵀL⁻¹a) (the projection's KKT multiplier)."""
    s = float(a @ l_inv_a)
    nu = max(0.0, (float(a @ x) + c) / s) if s > 0 else 0.0
    return x - nu * l_inv_a, nu


def pcpo_step(x_g: torch.Tensor, q: float, a: torch.Tensor | None, l_inv_a: torch.Tensor | None, c: float,
              delta: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x*, x_½, ν): the TRPO step from x_g = H⁻¹g (q = gᵀH⁻¹g), projected onto aᵀx + c ≤ 0 in the
    metric L (given as L⁻¹a); no projection when ``a`` is None (no cost gradient)."""
    half = max_step(x_g, q, delta)
    if a is None:
        return half, half, 0.0
    step, nu = project_to_halfspace(half, a, l_inv_a, c)
    return step, half, nu


class PCPO(CPO):
    """CPO's learner (critics, constraint value, checkpoints) with PCPO's step."""

    Params = PCPOParams

    def policy_step(self, prep: dict, batches: list[dict]) -> dict:
        p = self.p
        c, adv_r, adv_c, k, g, a, loss_before, cost_before, stats = self.linearise(prep, batches, "pcpo")
        cg_g = conjugate_gradient(k.fvp, g, p.cg_iters)
        failed = cg_g.failed
        if a @ a <= COST_GRAD_EPS:
            a = l_inv_a = None  # no direction changes the cost surrogate: the TRPO step
        elif p.metric == "kl":
            cg_a = conjugate_gradient(k.fvp, a, p.cg_iters)
            failed, l_inv_a = failed or cg_a.failed, cg_a.x
        else:
            l_inv_a = a
        stats.update(cg_iters=cg_g.iterations, cg_residual=cg_g.residual, cg_failed=float(failed))
        step, res = torch.zeros_like(g), None
        if not failed:
            q = (cg_g.x @ k.fvp(cg_g.x)).item()
            step, half, nu = pcpo_step(cg_g.x, q, a, l_inv_a, c, p.target_kl)
            stats.update({"pcpo/nu": nu, "pcpo/q": q, "pcpo/projected": float(nu > 0),
                          "pcpo/reward_step_norm": half.norm().item()})
            if p.line_search:
                res = self.search(k, step, adv_r, adv_c, loss_before, cost_before, c,
                                  require_improvement=p.improvement_required and c < 0)
        fraction = 0.0 if failed else res.fraction if res is not None else 1.0  # 1.0: no line search
        k.move(step, fraction)
        loss, kl, cost = k.measure(adv_r, adv_c)
        return {**stats, "loss_pi": loss, "loss_pi_before": loss_before, "loss_cost": cost,
                "loss_cost_before": cost_before, "kl": kl, "step_fraction": fraction,
                "search_tries": res.tries if res is not None else 0,
                "step_accepted": float(fraction > 0),
                "step_norm": (fraction * step).norm().item()}
