"""First Order Constrained Optimization in Policy Space (Zhang, Vuong & Ross 2020, NeurIPS).

FOCOPS solves the trust-region problem of CPO in the space of (non-parametric) policies, where it
has a closed form, then fits the parametric policy to it with first-order steps. For the
Lagrangian with multiplier ν ≥ 0 of the cost constraint and temperature λ > 0 of the KL trust
region, the optimal update policy is (their Theorem 1)

    π*(a|s) = π_θk(a|s) exp((A^R(s, a) − ν A^C(s, a)) / λ) / Z_λ,ν(s),

and θ minimises E_s[D_KL(π_θ ‖ π*)[s]], whose gradient (eq 7-8), up to terms free of θ, is

    ∇L(θ) = E_s[ ∇D_KL(π_θ ‖ π_θk)[s] − (1/λ) E_{a~π_θk}[ ∇π_θ(a|s)/π_θk(a|s) (Â^R − ν Â^C) ] ].

Per minibatch the sampled loss, with the per-state indicator that drops states already too far
from π_θk (the paper's per-state KL indicator, threshold η), is

    L = mean_j [ (D_KL(π_θ ‖ π_θk)[s_j] − ρ_j (Â^R_j − ν Â^C_j) / λ) · 1[D_KL(π_θ ‖ π_θk)[s_j] ≤ η] ],
    ρ_j = π_θ(a_j|s_j) / π_θk(a_j|s_j)

(the KL between the diagonal Gaussians in closed form, the indicator not differentiated), and the
epochs stop early once the batch's mean D_KL(π_θ ‖ π_θk) exceeds δ (``target_kl``). The critics
are fitted on the same minibatches, L_V = E[(V_R − R̂)²] + E[(V_C − Ĉ)²], as in PPO-Lag.

ν follows the paper's dual step, ν ← clip(ν + α (J_C − b), 0, ν_max), on the mean episode cost,
run by the coordinator's ``dual`` phase: it is ``learners/lagrange.py``'s multiplier with the
cap ``lagrange.upper`` = ν_max (so ``lagrange.kind: pid`` gives a PID-controlled ν, also capped).

Choices the paper leaves to its code (Zhang et al.'s reference implementation): both advantages
are z-scored per batch, Â^R = z(Â_R), Â^C = z(Â_C) (OmniSafe centres Â_C only and divides by
1 + ν; with z-scored advantages ν ∈ [0, ν_max] has the same meaning on every task); the
gradient norm is clipped at 40. π_θk's log-probabilities and distribution are recomputed by the
learner, so ρ = 1 and D_KL = 0 exactly at θ_k.

Defaults are the authors' code's: λ 1.5, η 0.02, δ 0.02, ν₀ 0, α 0.01, ν_max 2, minibatch 64,
10 epochs, Adam 3e-4.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.lagrange import LagrangeParams
from saferl.learners.networks import init_field, obs_clip_field, obs_norm_per_step_field
from saferl.learners.onpolicy_base import (
    ParallelCritics,
    advantages,
    assemble,
    clip_critic_grad_field,
    critic_norm_coef_field,
    flat,
    parallel_critics_field,
    standardise,
)
from saferl.learners.ppo_lag import PPOLag
from saferl.learners.trust_region import detached
from saferl.metric_keys import SKIPPED_UPDATES


class FOCOPSParams(base.Params):
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    policy_lr: float = Field(3e-4, gt=0)
    critic_lr: float = Field(3e-4, gt=0)
    gamma: float = Field(0.99, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ (not the temperature)")
    cost_gamma: float = Field(0.99, gt=0, le=1)
    cost_lam: float = Field(0.95, ge=0, le=1)
    temperature: float = Field(1.5, gt=0, description="λ, the temperature of π* ∝ π_θk exp(Â/λ) (paper: 1.5)")
    eta: float = Field(0.02, gt=0, description="η: states with D_KL(π_θ‖π_θk)[s] > η are dropped (paper: 0.02)")
    target_kl: float = Field(0.02, gt=0, description="δ: stop the epochs once the mean KL exceeds it (paper: 0.02)")
    epochs: int = Field(10, gt=0)
    minibatch_size: int = Field(64, gt=0, description="paper: 64")
    max_grad_norm: float = Field(40.0, gt=0)
    critic_norm_coef: float = critic_norm_coef_field()
    clip_critic_grad: bool = clip_critic_grad_field()
    parallel_critics: ParallelCritics = parallel_critics_field("off")
    init_log_std: float = -0.5
    normalise_obs: bool = True
    obs_clip: float = obs_clip_field()
    obs_norm_per_step: bool = obs_norm_per_step_field()
    init: str = init_field()
    # ν: initial 0, step α 0.01, ν_max 2 (the paper's values); ``upper`` is ν_max.
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(init=0.0, lr=0.01, upper=2.0))


def focops_advantage(adv_r: torch.Tensor, adv_c: torch.Tensor, nu: float) -> torch.Tensor:
    """Â^R − ν Â^C with both advantages z-scored per batch (the authors' code)."""
    return standardise(adv_r) - nu * standardise(adv_c)


def focops_loss(dist: torch.distributions.Normal, old: torch.distributions.Normal, logp: torch.Tensor,
                logp_old: torch.Tensor, adv: torch.Tensor, temperature: float, eta: float):
    """mean_j (D_KL(π_θ‖π_θk)[s_j] − ρ_j Â_j / λ) · 1[D_KL[s_j] ≤ η] (eq 7-8 with the per-state
    indicator); returns (loss, per-state KL [N], indicator [N])."""
    kl = torch.distributions.kl_divergence(dist, old).sum(-1)
    ratio = torch.exp(logp - logp_old)
    keep = (kl.detach() <= eta).to(kl.dtype)
    return ((kl - ratio * adv / temperature) * keep).mean(), kl, keep


class FOCOPS(PPOLag):
    """Networks, optimisers, ν (``self.multiplier``), ``phase_dual`` and checkpoints are PPO-Lag's;
    the policy update is FOCOPS's."""

    Params = FOCOPSParams

    def train_on(self, batches: list[dict]) -> dict:
        p, dev = self.p, self.device
        batch = assemble(batches, dev)
        norm = self.policy.normalised
        adv_r, ret_r = advantages(self.v_r, norm, batch, "reward", p.gamma, p.lam)
        adv_c, ret_c = advantages(self.v_c, norm, batch, "cost", p.cost_gamma, p.cost_lam)
        nu = self.multiplier.value
        adv = focops_advantage(adv_r, adv_c, nu)
        obs, act = flat(batch, batch["obs"]), flat(batch, batch["act"])
        z = self.policy.normalised(obs)  # once: the statistics move only after the epochs
        with torch.no_grad():
            old = detached(self.policy.dist(obs))  # π_θk
            logp_old = old.log_prob(act).sum(-1)

        def minibatch_loss(mb):
            dist = torch.distributions.Normal(*self.policy.mean_std(mb["z"]))
            old_i = torch.distributions.Normal(mb["old_loc"], mb["old_scale"])
            loss_pi, _, keep = focops_loss(dist, old_i, dist.log_prob(mb["act"]).sum(-1), mb["logp_old"],
                                           mb["adv"], p.temperature, p.eta)
            return loss_pi, {"kept_frac": keep.mean()}

        def epoch_kl():
            return torch.distributions.kl_divergence(self.policy.dist(obs), old).sum(-1).mean().item()

        skipped = self.skipped_updates
        data = {"z": z, "act": act, "logp_old": logp_old, "adv": adv, "ret_r": ret_r, "ret_c": ret_c,
                "old_loc": old.loc, "old_scale": old.scale}
        stats, epochs_run = self.policy_epochs(data, minibatch_loss, epoch_kl)
        if self.policy.norm is not None:  # statistics for the next rollout, after this update
            self.policy.norm.update(obs)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update(epochs=epochs_run, std=self.policy.log_std.exp().mean().item(), lagrange_multiplier=nu,
                   final_kl=stats["kl"][-1])
        out[SKIPPED_UPDATES] = self.skipped_updates - skipped  # NaN/Inf steps refused by ``descend``
        return out
