"""PDO, the primal-dual policy-gradient method (Chow, Ghavamzadeh, Janson & Pavone 2018, "Risk-
Constrained Reinforcement Learning with Percentile Risk Criteria", the Lagrangian actor-critic of
§5 with the expected-cost constraint), as the CGPO paper's PDO baseline runs it.

For  max J_R  s.t.  J_C ≤ b  the primal-dual method takes gradient steps on the Lagrangian

    L(θ, λ) = J_R(θ) − λ (J_C(θ) − b)

ascending in θ (the policy step) and descending in λ (the dual step, projected to λ ≥ 0):

    θ ← θ + α ∇_θ L(θ, λ),            λ ← max(0, λ + β (J_C − b)).

The policy step uses the likelihood-ratio gradient of L at θ_k in its importance-weighted form,

    L_π(θ) = −E[ρ Â],     ρ = π_θ(u|s) / π_θk(u|s),     Â = (z(Â_R) − λ (Â_C − mean Â_C)) / (1 + λ),

whose gradient at θ = θ_k is −∇_θ L(θ_k, λ) / (1 + λ) (up to the per-batch scaling of the
advantages): the objective has no clipping and no trust region, which is what sets PDO apart
from PPO-Lag. Reward and cost GAE come from separate critics; λ is ``learners/lagrange.py``'s
multiplier, stepped on the mean episode cost by the coordinator's ``dual`` phase: by default
Chow et al.'s projected ascent with β = ``lagrange.lr`` (``kind: lagrange``, λ₀ = 0; OmniSafe's
PDO steps λ with Adam instead, ``kind: adam``).

Choices not fixed by the paper (Chow et al. analyse a single-sample stochastic-approximation
scheme; the CGPO paper says only that its baselines follow the original papers and the
Safety-Gym / OmniSafe benchmarks), taken from OmniSafe's PDO (policy gradient + Lagrange):
* the step: ``epochs`` passes of minibatch Adam on L_π over the batch (OmniSafe: 10 passes at
  3e-4), stopped early once the batch's mean KL(π_θk ‖ π_θ) exceeds ``target_kl`` (0.02); the
  gradient norm clipped at ``max_grad_norm`` (40). With ``epochs: 1`` and one minibatch it is a
  single policy-gradient step, Chow et al.'s scheme;
* the advantage scaling (z-scored Â_R, centred Â_C, division by 1 + λ) is PPO-Lag's, i.e.
  OmniSafe's ``(A_R − λ A_C)/(1 + λ)``;
* ``clip`` is inherited from PPO-Lag's parameters and unused.
"""
from __future__ import annotations

import torch
from pydantic import Field

from saferl.learners.lagrange import LagrangeParams
from saferl.learners.ppo_lag import PPOLag, PPOLagParams


class PDOParams(PPOLagParams):
    """PPO-Lag's parameters (``clip`` unused); ``lagrange`` is λ's dual step (plain projected
    ascent at 0.01 from λ₀ = 0 unless a config says otherwise)."""
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(kind="lagrange", lr=0.01))


def pdo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_π = −E[ρ Â], ρ = exp(log π_θ − log π_θk); returns (loss, ρ)."""
    ratio = torch.exp(logp - logp_old)
    return -(ratio * adv).mean(), ratio


class PDO(PPOLag):
    """PPO-Lag's networks, advantages, epochs, multiplier and checkpoints; the unclipped surrogate."""

    Params = PDOParams

    def surrogate_loss(self, logp: torch.Tensor, logp_old: torch.Tensor,
                       adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, ratio = pdo_loss(logp, logp_old, adv)
        return loss, {"ratio_max": ratio.detach().max()}
