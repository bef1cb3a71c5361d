"""APPO, Augmented Proximal Policy Optimization (Dai, Ji, Yang, Zheng & Pan 2023, AAAI, "Augmented
Proximal Policy Optimization for Safe Reinforcement Learning").

APPO replaces the Lagrangian of  max J_R  s.t.  J_C ≤ b  by the augmented Lagrangian with the
multiplier-penalty function of an inequality constraint (Powell-Hestenes-Rockafellar; Nocedal &
Wright, Numerical Optimization, eq 17.65), t = J_C − b:

    ψ_σ(t, λ) = λ t + (σ/2) t²     if λ + σ t ≥ 0
              = −λ² / (2σ)         otherwise            = (max(0, λ + σt)² − λ²) / (2σ),

    min_θ  −J_R(θ) + ψ_σ(J_C(θ) − b, λ_k),      λ_{k+1} = max(0, λ_k + σ (J_C(θ_{k+1}) − b)).

The quadratic deviation term (σ/2)t² damps the oscillation of the plain Lagrangian, and the
augmented problem has the primal problem's solutions for any σ > 0. ∂ψ/∂t = max(0, λ + σt) =: w,
so the policy gradient of the augmented Lagrangian is −∇J_R + w ∇J_C. The practical algorithm
estimates both objectives with PPO's clipped surrogates (the optimistic min for the reward,
the pessimistic max for the cost), per update k on the batch of π_θk:

    t̂_k  = Ĵ_C − b,   Ĵ_C the mean undiscounted cost of the batch's finished episodes
    w_k  = max(0, λ_k + σ t̂_k)                                        (∂ψ/∂t at t̂_k, fixed in the update)
    S_R(θ) = E[min(ρ Â_R, clip(ρ, 1 ± ε) Â_R)],   S_C(θ) = E[max(ρ Â_C, clip(ρ, 1 ± ε) Â_C)]
    L_π(θ) = (−S_R(θ) + w_k S_C(θ)) / (1 + w_k) − c_H H[π_θ],        ρ = π_θ(u|s)/π_θk(u|s)

i.e. ψ_σ linearised around θ_k with S_C as the first-order model of J_C(θ) − J_C(θ_k), so that
∇L_π(θ_k) ∝ −∇J_R + w_k ∇J_C, the gradient of the augmented Lagrangian. The multiplier takes the
method-of-multipliers step λ ← min(max(0, λ + σ (J_C − b)), λ_max) on the coordinator's ``dual``
phase (J_C = the mean cost of the episodes ended since the last dual phase). The policy epochs,
KL early stop, critics and observation statistics are PPO-Lag's.

Choices not fixed by the paper, from the authors' reference implementation (read, not copied)
unless said otherwise:
* the surrogate's normalisation by 1 + w_k, the max-clipped cost surrogate, and w_k computed
  from the current batch's mean episode cost with the multiplier of this update;
* σ default 0.1 (the authors' default at their cost limit 25; the shipped configs scale it as
  2.5 / |b|); λ₀ = ``lagrange.init`` (0), capped at ``lagrange.upper``;
* the multiplier step is the augmented-Lagrangian one above, λ ← max(0, λ + σ t), as the
  method of multipliers prescribes; the reference code instead steps λ by Adam at rate 0.2 on
  −λ t, independently of σ;
* ``sigma_growth`` ρ: after each dual step σ ← min((1 + ρ) σ, ``sigma_max``), the increasing
  penalty of the augmented-Lagrangian method; the reference code defines this growth but its
  training loop never calls it, so the default is ρ = 0 (fixed σ);
* advantages as in PPO-Lag: Â_R z-scored per batch, Â_C centred (OmniSafe's convention);
* no episode ended in the batch: Ĵ_C = mean per-step cost × max_episode_steps (CPO's fallback).
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, model_validator

from saferl.batch import ended_episodes, mean_step_cost
from saferl.learners.lagrange import LagrangeParams
from saferl.learners.onpolicy_base import advantages, standardise
from saferl.learners.ppo_lag import PPOLag, PPOLagParams
from saferl.metric_keys import LAGRANGE_MULTIPLIER


class APPOParams(PPOLagParams):
    """PPO-Lag's parameters plus the penalty σ; ``lagrange`` gives only λ₀ (``init``) and the cap
    (``upper``): λ's step is σ."""
    sigma: float = Field(0.1, gt=0, description="σ: the quadratic penalty's weight and the multiplier's "
                         "step (authors' default 0.1 at cost limit 25)")
    sigma_growth: float = Field(0.0, ge=0, description="ρ: σ ← min((1 + ρ)σ, sigma_max) after each dual step")
    sigma_max: float = Field(1e3, gt=0, description="cap on σ when it grows")
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(kind="lagrange", init=0.0))

    @model_validator(mode="after")
    def _augmented_multiplier(self) -> APPOParams:
        if self.lagrange.kind != "lagrange":
            raise ValueError(f"lagrange.kind: APPO's multiplier takes the augmented-Lagrangian step "
                             f"λ ← max(0, λ + σ(J_C − b)); only kind 'lagrange' applies (got {self.lagrange.kind!r})")
        extra = sorted(set(self.lagrange.model_fields_set) - {"kind", "init", "upper"})
        if extra:
            raise ValueError(f"lagrange.{extra[0]}: APPO's multiplier uses only lagrange.init and "
                             "lagrange.upper; its step is the penalty sigma")
        return self


def multiplier_penalty(t: float, lam: float, sigma: float) -> float:
    """ψ_σ(t, λ) = λt + σt²/2 if λ + σt ≥ 0, else −λ²/(2σ)."""
    return lam * t + 0.5 * sigma * t * t if lam + sigma * t >= 0 else -lam * lam / (2 * sigma)


def penalty_weight(t: float, lam: float, sigma: float) -> float:
    """w = ∂ψ_σ/∂t (t, λ) = max(0, λ + σt): the cost surrogate's weight in the policy loss."""
    return max(0.0, lam + sigma * t)


def augmented_multiplier_step(lam: float, t: float, sigma: float, upper: float = float("inf")) -> float:
    """The method of multipliers' step λ ← min(max(0, λ + σt), upper), t = J_C − b."""
    return min(max(0.0, lam + sigma * t), upper)


def appo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv_r: torch.Tensor, adv_c: torch.Tensor,
              clip: float, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_π = (−E[min(ρÂ_R, clip(ρ)Â_R)] + w E[max(ρÂ_C, clip(ρ)Â_C)]) / (1 + w); returns
    (L_π, ρ, S_R, S_C)."""
    ratio = torch.exp(logp - logp_old)
    clipped = ratio.clamp(1 - clip, 1 + clip)
    s_r = torch.min(ratio * adv_r, clipped * adv_r).mean()
    s_c = torch.max(ratio * adv_c, clipped * adv_c).mean()
    return (-s_r + weight * s_c) / (1 + weight), ratio, s_r, s_c


class APPO(PPOLag):
    """PPO-Lag's networks, epochs and critics; the augmented-Lagrangian loss and multiplier step."""

    Params = APPOParams

    def __init__(self, params: APPOParams, env, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.sigma = params.sigma
        self.weight = 0.0  # w_k of the update in progress

    def batch_cost(self, batches: list[dict]) -> float:
        """Ĵ_C: the mean undiscounted cost of the episodes that end in ``batches`` (whole, as the hosts
        counted them); none ended: mean per-step cost × max_episode_steps."""
        costs, _ = ended_episodes(batches)
        if costs:
            return float(np.mean(costs))
        return mean_step_cost(batches) * self.env.max_episode_steps

    def update(self, batches: list[dict]) -> dict:
        lam, sigma = self.multiplier.value, self.sigma
        j_c = self.batch_cost(batches)
        t = j_c - self.cost_limit
        self.weight = penalty_weight(t, lam, sigma)
        out = super().update(batches)
        out.update({"appo/j_c": j_c, "appo/weight": self.weight, "appo/sigma": sigma,
                    "appo/psi": multiplier_penalty(t, lam, sigma)})
        return out

    def policy_advantages(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[M, 2]: (z(Â_R), Â_C − mean Â_C) per step, split again in ``surrogate_loss``."""
        p, norm = self.p, self.policy.normalised
        adv_r, ret_r = advantages(self.v_r, norm, batch, "reward", p.gamma, p.lam)
        adv_c, ret_c = advantages(self.v_c, norm, batch, "cost", p.cost_gamma, p.cost_lam)
        return torch.stack([standardise(adv_r), adv_c - adv_c.mean()], -1), ret_r, ret_c

    def surrogate_loss(self, logp: torch.Tensor, logp_old: torch.Tensor,
                       adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, ratio, s_r, s_c = appo_loss(logp, logp_old, adv[:, 0], adv[:, 1], self.p.clip, self.weight)
        return loss, {"clip_frac": ((ratio.detach() - 1).abs() > self.p.clip).float().mean(),
                      "appo/surrogate_reward": s_r.detach(), "appo/surrogate_cost": s_c.detach()}

    def phase_dual(self, signals: dict) -> dict:
        """λ ← min(max(0, λ + σ(J_C − b)), upper) on the mean episode cost since the last dual step
        (skipped if none ended), then σ ← min((1 + ρ)σ, sigma_max)."""
        if signals.get("episode_cost") is None:
            return {}
        p = self.p
        self.multiplier.value = augmented_multiplier_step(self.multiplier.value,
                                                          signals["episode_cost"] - self.cost_limit,
                                                          self.sigma, p.lagrange.upper)
        self.sigma = min(self.sigma * (1 + p.sigma_growth), p.sigma_max)
        return {LAGRANGE_MULTIPLIER: self.multiplier.value, "appo/sigma": self.sigma}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sigma": self.sigma}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.sigma = sd["sigma"]
