"""Reward Constrained Policy Optimization (Tessler, Mankowitz & Mannor 2019, ICLR), on PPO.

RCPO folds the constraint into the reward: with the paper's penalised reward (Algorithm 1)

    r̂(λ, s, a) = r(s, a) − λ c(s, a)

the actor and a single critic V̂(λ, s) are trained on r̂ alone, and λ moves on the slowest time
scale, λ ← max(0, λ + η (J_C − b)) (Algorithm 1's Γ_λ step). Here, per update:

    δ̂_t = r̂_t + γ V̂(λ, s'_t) − V̂(λ, s_t),     Â_t = Σ_l (γλ_GAE)^l δ̂_{t+l}   (one GAE, ``gae.py``)
    L_π = −E[min(ρ z(Â), clip(ρ, 1 ± ε) z(Â))]                       (PPO's clipped surrogate)
    L_V = E[(V̂(λ, s) − (Â + V̂(λ, s)))²] + E[(V_C(s) − Ĉ)²]

with z the per-batch z-score. This differs from PPO-Lag, which combines separately estimated
reward and cost advantages as (z(Â_R) − λ(Â_C − mean))/(1 + λ): RCPO's advantage comes from one
critic of the penalised return, which must track λ as it moves (the paper's time-scale
separation: λ's step size is the smallest). Tessler et al. run PPO as the actor-critic in their
MuJoCo experiments; so does this learner (the PPO-Lag machinery with ``policy_advantages``
replaced). λ is the Lagrange multiplier of ``learners/lagrange.py``, stepped on the mean episode
cost by the coordinator's ``dual`` phase.

The learner's ``v_r`` is the penalised critic V̂(λ, ·); ``v_c`` is still fitted to the cost (GAE
value targets Ĉ) for diagnostics and so the checkpoint layout is PPO-Lag's.
"""
from __future__ import annotations

import torch
from pydantic import Field

from saferl.learners.lagrange import LagrangeParams
from saferl.learners.onpolicy_base import advantages, standardise
from saferl.learners.ppo_lag import PPOLag, PPOLagParams


class RCPOParams(PPOLagParams):
    """PPO-Lag's parameters; ``gamma``/``lam`` are the penalised return's discount and GAE λ (the
    paper uses one discount for the penalised reward), ``cost_gamma``/``cost_lam`` only the
    diagnostic cost critic's. ``lagrange.lr``: λ's step (slowest time scale; plain projected ascent
    at 0.01 by default, as the paper's gradient step on λ: not PPO-Lag's OmniSafe Adam rule)."""
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(lr=0.01))


def penalised_advantages(critic: torch.nn.Module, norm, batch: dict, lam: float, gamma: float,
                         gae_lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE of the penalised reward r − λc with the penalised critic V̂(λ, ·): (Â, value targets), flat [M]."""
    return advantages(critic, norm, {**batch, "penalised": batch["reward"] - lam * batch["cost"]},
                      "penalised", gamma, gae_lam)


class RCPO(PPOLag):
    Params = RCPOParams

    def policy_advantages(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, norm = self.p, self.policy.normalised
        adv, ret = penalised_advantages(self.v_r, norm, batch, self.multiplier.value, p.gamma, p.lam)
        _, ret_c = advantages(self.v_c, norm, batch, "cost", p.cost_gamma, p.cost_lam)
        return standardise(adv), ret, ret_c
