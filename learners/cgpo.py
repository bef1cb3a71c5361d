"""CGPO: Constrained Gradient-based Policy Optimization (seed 000, Algorithm 1).

Per iteration k, from the gradient workers' short windows (eq 19-20, ``learners/analytic.py``):

    Ĵ_R(θ_k + δ) = J_R(θ_k) + gᵀδ,   Ĵ_C(θ_k + δ) = J_C(θ_k) + qᵀδ          (GBE, eq 6-7)
    δ* = argmax gᵀδ  s.t.  c + qᵀδ ≤ 0,  δᵀδ ≤ δ̂,   c = J_C(θ_k) − b       (eq 10)

solved exactly by ``learners/cgpo_math.solve_subproblem``: recovery step (Theorem 5.1, case a),
pure ascent (Corollary 5.2, case b), or the dual solution of Algorithm 2 (case c); θ_{k+1} =
θ_k + δ*. The radius δ̂ adapts by eq 18 from the reduction ratio ρ (actual / predicted change of
J_R) and the toleration ratio ζ, measured once the next iteration has estimated J(θ_{k+1}).
Critics V_R(s, t), V_C(s, t) are trained with finite-horizon TD(λ) (eq 65-68), as in SHAC-Lag.

g and q are not clipped (Table 4's max grad norm is 1e9): the trust region bounds the step, and
rescaling q would change the linearised constraint. Choices not fixed by the paper: J(θ) is
estimated per window as realised episode prefix + window
sum + critic tail (the windows of one iteration all start at the same t0); η1 = 0.25, η2 = 0.75.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from saferl.learners.cgpo_math import (RadiusParams, adapt_radius, reduction_ratio, solve_subproblem,
                                       toleration_ratio)
from saferl.learners.networks import flat_params, set_flat_params
from saferl.learners.shac_lag import WindowLearner, WindowParams
from saferl.learners.world_model import WorldModelParams


class CGPOParams(WindowParams):
    radius: RadiusParams = Field(default_factory=RadiusParams, description="δ̂ bounds ‖δ‖² (eq 10, 18)")


class CGPO(WindowLearner):
    Params = CGPOParams

    def __init__(self, params: CGPOParams, env, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.radius_sq = params.radius.init
        self.prediction: dict | None = None  # J(θ_k), Ĵ(θ_{k+1}) from the previous step

    def policy_step(self, est: dict) -> dict:
        out = {}
        if self.prediction is not None:  # eq 18, now that J(θ_{k+1}) has been estimated
            prev = self.prediction
            rho = reduction_ratio(prev["j_r"], est["j_r"], prev["pred_r"])
            zeta = toleration_ratio(est["j_c"], prev["pred_c"], self.cost_limit)
            self.radius_sq = adapt_radius(self.radius_sq, rho, zeta, self.p.radius)
            out.update(reduction_ratio=rho, toleration_ratio=zeta)
        g, q = np.asarray(est["g"], np.float64), np.asarray(est["q"], np.float64)
        delta, info = solve_subproblem(g, q, est["j_c"] - self.cost_limit, self.radius_sq)
        if not np.isfinite(delta).all():  # never for finite inputs (cgpo_math); kept as the last guard
            self.skipped_updates += 1
            return {**out, **self.skip_policy_step(est)}
        theta = flat_params(self.policy)
        set_flat_params(self.policy, theta + torch.as_tensor(delta, dtype=theta.dtype, device=theta.device))
        self.prediction = {"j_r": est["j_r"], "pred_r": est["j_r"] + float(g @ delta),
                           "pred_c": est["j_c"] + float(q @ delta)}
        out.update(radius_sq=self.radius_sq, step_norm=float(np.linalg.norm(delta)),
                   case={"a": 0, "b": 1, "c": 2}[info["case"]], dual_lambda=info["lam"] or 0.0,
                   dual_nu=info["nu"] or 0.0)
        return out

    def skip_policy_step(self, est: dict) -> dict:
        """Non-finite g, q or Ĵ (``WindowLearner.update`` counts it): no step, so θ_{k+1} = θ_k and
        there is no prediction to test at the next iteration; δ̂ is kept."""
        self.prediction = None
        return {"radius_sq": self.radius_sq, "step_norm": 0.0}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "radius_sq": self.radius_sq, "prediction": self.prediction}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.radius_sq, self.prediction = sd["radius_sq"], sd["prediction"]


class MBCGPOParams(CGPOParams):
    world_model: WorldModelParams = Field(default_factory=WorldModelParams)


class MBCGPO(CGPO):
    """MB-CGPO (Algorithm 3): CGPO's update on gradients taken through a world model fitted to
    real transitions (eq 85; ``learners/world_model.py``, ``actors/world_model.py``)."""
    Params = MBCGPOParams
