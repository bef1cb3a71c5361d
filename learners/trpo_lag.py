"""TRPO (Schulman et al. 2015) and TRPO-Lagrangian (Ray, Achiam & Amodei 2019, "Benchmarking
Safe Exploration in Deep RL"), on the PPO-Lag machinery.

Per update, with reward and cost GAE from separate critics (``onpolicy_base.advantages``):

    Â = (z(Â_R) − λ (Â_C − mean Â_C)) / (1 + λ)            (``onpolicy_base.lagrangian_advantage``)
    g = ∇_θ E[ρ Â]|_θk,   ρ = π_θ(u|s) / π_θk(u|s)
    x ≈ (H + d·I)⁻¹ g by conjugate gradient,  H = ∇² D̄_KL(π_θk ‖ π_θ) (Fisher-vector products)
    θ = θ_k + β^j √(2δ / xᵀHx) x,  the first j with D̄_KL ≤ δ(1 + tol) and E[ρ Â] improved

(``learners/trust_region.py``), then the critics are fitted to the GAE value targets by
minibatch Adam, L_V = E[(V_R − R̂)²] + E[(V_C − Ĉ)²] (+ OmniSafe's ``critic_norm_coef`` Σ‖θ_V‖²,
gradient clipped at ``max_grad_norm`` with ``clip_critic_grad``, as PPO-Lag). λ
(``learners/lagrange.py``) is stepped by the coordinator's ``dual`` phase, as in PPO-Lag, by
default with OmniSafe 0.5's TRPOLag rule (``omnisafe/configs/on-policy/TRPOLag.yaml``): Adam on
−λ (J_C − b) at lr 0.035 from λ₀ = 0.001 on the mean cost of the last 50 ended episodes
(``lagrange.kind: lagrange | pid`` name the alternatives). TRPO is the same learner with no dual
phase (λ stays at its initial value).

D̄_KL is the KL of the joint action distribution (the paper's) unless ``kl_action_dims: mean``
averages it over the n action dimensions as OmniSafe 0.5's TRPO, CPO and PCPO do in their
Fisher-vector product and line search: the same δ then bounds the joint KL by n·δ. The
OmniSafe-following configs take that and tol = 0 (OmniSafe rejects KL > δ); the learner's defaults
are the paper's measure and OpenAI baselines' tol = 0.5.

π_k's log-probabilities are recomputed by the learner (not the hosts' float32 ``logp``), so
ρ = 1 exactly at θ_k and the line search compares like with like.
"""
from __future__ import annotations

from pydantic import Field

from saferl.learners import base
from saferl.learners.lagrange import LagrangeParams, LagrangianLearner, OmniSafeLagrangeParams
from saferl.learners.onpolicy_base import lagrangian_advantage
from saferl.learners.trust_region_base import TrustRegionLearner, TrustRegionParams, natural_gradient_step
from saferl.metric_keys import LAGRANGE_MULTIPLIER


class TRPOLagParams(TrustRegionParams):
    lagrange: OmniSafeLagrangeParams = Field(default_factory=OmniSafeLagrangeParams)


class TRPOLag(LagrangianLearner, TrustRegionLearner):
    Params = TRPOLagParams

    def __init__(self, params: TRPOLagParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.init_multiplier(params.lagrange)

    def policy_step(self, prep: dict, batches: list[dict]) -> dict:
        lam = self.multiplier.value
        adv = lagrangian_advantage(prep["adv_r"], prep["adv_c"], lam)
        return {**natural_gradient_step(self.policy_at_k(prep), adv, self.p), LAGRANGE_MULTIPLIER: lam}



class TRPOParams(TRPOLagParams):
    lagrange: LagrangeParams = Field(default_factory=LagrangeParams)  # λ₀ = 0, never stepped


class TRPO(TRPOLag):
    """Unconstrained TRPO: TRPO-Lag without a dual phase (λ stays at its initial value, 0), so
    Â = z(Â_R). Its cost critic is still trained and logged."""

    Params = TRPOParams
