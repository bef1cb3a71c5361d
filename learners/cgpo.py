"""CGPO: Constrained Gradient-based Policy Optimization (Safe RL using Finite-Horizon
Gradient-based Estimation, ICML 2024: Algorithm 1).

Per iteration k, from the gradient workers' short windows (eq 19-20, ``learners/analytic.py``):

    Ĵ_R(θ_k + δ) = J_R(θ_k) + gᵀδ,   Ĵ_C(θ_k + δ) = J_C(θ_k) + qᵀδ          (GBE, eq 6-7)
    δ* = argmax gᵀδ  s.t.  c + qᵀδ ≤ 0,  δᵀδ ≤ δ̂,   c = J_C(θ_k) − b       (eq 10)

solved exactly by ``learners/cgpo_math.solve_subproblem``: recovery step (Theorem 5.1, case a),
pure ascent (Corollary 5.2, case b), or the dual solution of Algorithm 2 (case c); θ_{k+1} =
θ_k + δ*. Critics V_R(s, t), V_C(s, t) are trained with finite-horizon TD(λ) (eq 65-68), as in
SHAC-Lag.

**Ratio test on the same window (eq 18).** The reduction ratio ρ_k (actual / predicted change of
J_R) and toleration ratio ζ_k compare J(θ_{k+1}) with the prediction made from (g, q) at θ_k. Both
are measured on the window that produced g and q: ``propose`` returns θ_k + δ* without taking the
step, every gradient worker re-rolls its last window forward only with it (same start states,
time steps, action noise ε, critics and observation normaliser; ``GradientWorker.evaluate``), and
``update`` then takes the step, reads

    ΔL = L(θ_{k+1}) − L(θ_k)  on that window,   J(θ_{k+1}) = J(θ_k) + ΔL,

and adapts δ̂ for the next iteration by eq 18. With γ = 1 (the paper's finite horizon) J(θ_{k+1})
is exactly the window estimate (realised episode prefix + window sum + critic tail) of θ_{k+1};
with γ < 1 the change is that of the discounted window objective whose gradients g, q are. A
J(θ_{k+1}) read off the *next* window instead (new start states, time steps and critics) differs
from the prediction mostly by that window's noise, which is not what eq 18 measures. Without
evaluations (a learner driven without workers) there is no test and δ̂ is kept.

**Observation normaliser.** θ and δ* are parameters of the policy *under the normaliser of θ_k*;
the running statistics are only updated after the step and its ratio test, and the update keeps
what the policy and critics compute: the first layer is re-expressed for the new statistics
(W' = W diag(s'/s), b' = b + W (μ' − μ)/s with s = √(var + 1e-8)), so the policy executed at
k+1 is exactly θ_k + δ* under the old statistics, inside the trust region (up to float rounding,
and exactly only where no normalised coordinate hits the normaliser's clip at ±10). Without it a
statistics update would move the executed policy by an amount no trust region bounds.

**Gradient estimator (Fig 10).** ``gradient_estimator: fobg`` (the default, CGPO-FoBG) takes g
and q by back-propagating the window objectives through the simulator (eq 19-20). ``zobg``
(CGPO-ZoBG) estimates them on the same rolled window by the score function of eq 69: per
trajectory the window return (reward / cost sum plus the critic's bootstrap at the window's end,
the target FoBG differentiates) times Σ_t ∇log π of its sampled actions, averaged over the batch;
no baseline, as eq 69 is written (``analytic.window_gradients``). Everything else (J estimates,
sub-problem, ratio test on the re-rolled window, radius) is unchanged. ZoBG needs no simulator
gradient, so CGPO-ZoBG also runs on a non-differentiable torch task (FunctionEnvFloor-v0); it
needs a stochastic policy.

g and q are not clipped (Table 4's max grad norm is 1e9): the trust region bounds the step, and
rescaling q would change the linearised constraint. Choices not fixed by the paper: J(θ) is
estimated per window as realised episode prefix + window sum + critic tail (the windows of one
iteration all start at the same t0); η1 = 0.25, η2 = 0.75; the ratio test's forward window is
simulator work, not new samples (it is not counted in env steps).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from saferl.learners.cgpo_math import RadiusParams, adapt_radius, reduction_ratio, solve_subproblem, toleration_ratio
from saferl.learners.networks import flat_params, set_flat_params
from saferl.learners.window_base import WindowLearner, WindowParams, combine
from saferl.learners.world_model import WorldModelParams

CASES = {"a": 0, "b": 1, "c": 2}


class CGPOParams(WindowParams):
    radius: RadiusParams = Field(default_factory=RadiusParams, description="δ̂ bounds ‖δ‖² (eq 10, 18)")
    gradient_estimator: Literal["fobg", "zobg"] = Field(
        "fobg", description="g, q by back-propagation through the simulator (fobg) or by the score "
        "function of eq 69 on the same window, no baseline (zobg: CGPO-ZoBG, Fig 10)")

    @model_validator(mode="after")
    def _zobg_needs_noise(self) -> CGPOParams:
        if self.gradient_estimator == "zobg" and not self.stochastic:
            raise ValueError("gradient_estimator: zobg needs stochastic: true (a deterministic policy has no "
                             "score function)")
        return self


@torch.no_grad()
def reexpress_first_layer(layer: torch.nn.Linear, old: tuple, new: tuple, dims: int) -> None:
    """Change the first ``dims`` inputs of ``layer`` from normalised by ``old`` = (mean, var) to
    normalised by ``new`` without changing its output: z_old = (μ' − μ)/s + (s'/s) z_new."""
    (mu0, var0), (mu1, var1) = old, new
    s0, s1 = torch.sqrt(var0 + 1e-8), torch.sqrt(var1 + 1e-8)
    w = layer.weight.double()
    shift = ((mu1 - mu0) / s0).to(w.device)
    layer.bias.copy_((layer.bias.double() + w[:, :dims] @ shift).to(layer.bias.dtype))
    w[:, :dims] *= (s1 / s0).to(w.device)
    layer.weight.copy_(w.to(layer.weight.dtype))


class CGPO(WindowLearner):
    Params = CGPOParams

    def __init__(self, params: CGPOParams, env, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.arch["gradient_estimator"] = params.gradient_estimator  # read by the gradient workers
        self.radius_sq = params.radius.init
        self.prediction: dict | None = None  # this update's J(θ_k), L(θ_k), gᵀδ, qᵀδ until its ratio test

    # -- the step --------------------------------------------------------------------------------
    def _solve(self, est: dict):
        g, q = np.asarray(est["g"], np.float64), np.asarray(est["q"], np.float64)
        delta, info = solve_subproblem(g, q, est["j_c"] - self.cost_limit, self.radius_sq)
        return g, q, delta, info

    @staticmethod
    def _finite(est: dict) -> bool:
        return all(bool(np.isfinite(est[k]).all()) for k in ("g", "q", "j_r", "j_c"))

    def propose(self, results: list[dict]) -> dict | None:
        """θ_k + δ* (under θ_k's normaliser) as workers load it, for the ratio test's re-roll;
        nothing changes here. None when ``update`` would skip the step (non-finite g, q or Ĵ)."""
        est = combine(results)
        if not self._finite(est):
            return None
        _, _, delta, _ = self._solve(est)
        if not np.isfinite(delta).all():
            return None
        theta = flat_params(self.policy)
        set_flat_params(self.policy, theta + torch.as_tensor(delta, dtype=theta.dtype, device=theta.device))
        trial = {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}
        set_flat_params(self.policy, theta)
        return {"policy": trial}

    def policy_step(self, est: dict) -> dict:
        g, q, delta, info = self._solve(est)
        if not np.isfinite(delta).all():  # never for finite inputs (cgpo_math); kept as the last guard
            self.skipped_updates += 1
            return self.skip_policy_step(est)
        theta = flat_params(self.policy)
        set_flat_params(self.policy, theta + torch.as_tensor(delta, dtype=theta.dtype, device=theta.device))
        gain_r, gain_c = float(g @ delta), float(q @ delta)
        self.prediction = {"j_r": est["j_r"], "j_c": est["j_c"], "l_r": est["l_r"], "l_c": est["l_c"],
                           "gain_r": gain_r, "gain_c": gain_c}
        return {"cgpo/radius": self.radius_sq, "step_norm": float(np.linalg.norm(delta)),
                "cgpo/case": CASES[info["case"]], "cgpo/dual_lambda": info["lam"] or 0.0,
                "cgpo/dual_nu": info["nu"] or 0.0, "cgpo/predicted_change_r": gain_r,
                "cgpo/predicted_change_c": gain_c}

    def skip_policy_step(self, est: dict) -> dict:
        """Non-finite g, q or Ĵ (``WindowLearner.update`` counts it): no step, so θ_{k+1} = θ_k and
        there is no prediction to test; δ̂ is kept."""
        self.prediction = None
        return {"cgpo/radius": self.radius_sq, "step_norm": 0.0}

    # -- the update: step, ratio test, critics, normaliser ---------------------------------------
    def update(self, results: list[dict], evaluations: list[dict | None] | None = None) -> dict:
        """``results``: the workers' windows at θ_k; ``evaluations``: their forward re-rolls of the
        same windows at ``propose``'s θ_k + δ* (``GradientWorker.evaluate``)."""
        norm = self.policy.norm
        before = (norm.mean.clone(), norm.var.clone()) if norm is not None else None
        self.prediction = None
        out = super().update(results)  # the step (policy_step), critic fit, new normaliser moments
        if self.prediction is not None:
            out.update(self.ratio_test(evaluations))
        self.prediction = None
        if before is not None and not (torch.equal(before[0], norm.mean) and torch.equal(before[1], norm.var)):
            self.keep_outputs(before, (norm.mean.clone(), norm.var.clone()))
        return out

    def ratio_test(self, evaluations: list[dict | None] | None) -> dict:
        """ρ_k, ζ_k on the window of θ_k (module docstring) and δ̂_{k+1} by eq 18."""
        if not evaluations or any(e is None for e in evaluations):
            return {}
        pred = self.prediction
        w = np.array([e["n"] for e in evaluations], np.float64)
        w /= w.sum()
        l_r = float(sum(wi * e["l_r"] for wi, e in zip(w, evaluations)))
        l_c = float(sum(wi * e["l_c"] for wi, e in zip(w, evaluations)))
        d_r, d_c = l_r - pred["l_r"], l_c - pred["l_c"]
        rho = reduction_ratio(pred["j_r"], pred["j_r"] + d_r, pred["j_r"] + pred["gain_r"])
        zeta = toleration_ratio(pred["j_c"] + d_c, pred["j_c"] + pred["gain_c"], self.cost_limit)
        self.radius_sq = adapt_radius(self.radius_sq, rho, zeta, self.p.radius)
        out = {"cgpo/reduction_ratio": rho, "cgpo/toleration_ratio": zeta, "cgpo/actual_change_r": d_r,
               "cgpo/actual_change_c": d_c, "cgpo/radius_next": self.radius_sq}
        seconds = [e.get("seconds") for e in evaluations]
        if all(s is not None for s in seconds):
            out["time/ratio_test_s"] = float(max(seconds))
            out["time/gradient_window_s"] = float(max(e.get("window_seconds", 0.0) for e in evaluations))
        return out

    def keep_outputs(self, old: tuple, new: tuple) -> None:
        """The normaliser moved from ``old`` to ``new`` (mean, var): re-express the first layer of
        the policy and of the critics (their observation inputs; not the time input) so that
        each computes the same function of raw observations as before."""
        d = self.env.obs_dim
        layers = [self.policy.net[0]]
        for group in (self.critics, self.targets):
            if group is not None:
                layers += [c.net[0] for c in group]
        for layer in layers:
            reexpress_first_layer(layer, old, new, d)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "radius_sq": self.radius_sq}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.radius_sq, self.prediction = sd["radius_sq"], None


class MBCGPOParams(CGPOParams):
    world_model: WorldModelParams = Field(default_factory=WorldModelParams)
    gradient_estimator: Literal["fobg"] = Field(
        "fobg", description="MB-CGPO back-propagates through its world model; there is no ZoBG variant")


class MBCGPO(CGPO):
    """MB-CGPO (Algorithm 3): CGPO's update on gradients taken through a world model fitted to
    real transitions (eq 85; ``learners/world_model.py``, ``actors/world_model.py``). Its ratio
    test re-rolls the window through the same world model from the same real start
    observations (``ModelGradientWorker.evaluate``): ρ and ζ test the linear prediction of the
    objective whose gradients g, q are, and J(θ_{k+1}) = J(θ_k) (from real data) + that change."""
    Params = MBCGPOParams
