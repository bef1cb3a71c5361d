"""Constrained Update Projection (Yang, Ji, Dai, Zhang, Zhou, Li, Yang & Pan 2022, NeurIPS,
"Constrained Update Projection Approach to Safe Policy Optimization").

Each update is two steps on the same batch, sampled by π_θk:

1. Performance improvement: θ_{k+½} maximises the reward surrogate inside a trust region, as PPO
   does it (the paper's practical algorithm; OmniSafe's CUP runs its PPO step):

       L₁ = −E[min(ρ z(Â_R), clip(ρ, 1 ± ε) z(Â_R))],   ρ = π_θ(a|s)/π_θk(a|s),

   epochs stopped early by the sampled KL (PPO-Lag's loop, with λ = 0 in its advantage).

2. Projection: θ_{k+1} minimises E_s[D_KL(π_θ ‖ π_θ{k+½})[s]] subject to the paper's surrogate
   bound on the cost, J_C(π_θk) + c_γ E[ρ Â_C] (+ its √KL term) ≤ b, solved through the
   Lagrangian with the multiplier ν ≥ 0 of the constraint (terms free of θ dropped):

       L₂(θ) = E_s[D_KL(π_θ ‖ π_θ{k+½})[s]] + ν c_γ E[ρ (Â_C − mean Â_C)],

   c_γ = (1 − γλ_GAE)/(1 − γ), minimised by minibatch Adam over ``projection_epochs`` passes,
   stopped once E_s[D_KL(π_θ{k+½} ‖ π_θ)[s]] > ``target_kl`` (OmniSafe's coefficient, centring
   and stopping rule). Both steps share the policy's Adam optimiser, as in OmniSafe, so step 2
   starts with step 1's moments; from fresh moments, ν = 0 would leave π_θ{k+½} unchanged (the KL
   term's gradient vanishes there).

ν is ``learners/lagrange.py``'s multiplier, by default ν ← max(0, ν + η(J_C − b)) on the mean
episode cost (``lagrange.kind: lagrange``), stepped by the coordinator's ``dual`` phase. OmniSafe's
CUP (``omnisafe/configs/on-policy/CUP.yaml``) steps ν with PPO-Lag's Adam rule instead (lr 0.035,
ν₀ 0.001, ν ≤ 2, 50-episode window): ``lagrange: {kind: adam, lr: 0.035, init: 0.001, upper: 2,
window: 50}``; the plain step stays the default so the shipped CUP configs keep their meaning.
The critics are fitted during step 1 (PPO-Lag's loop);
the advantages of both steps are computed once, before either step, from the critics at θ_k.
The minimiser of L₂ over all policies is π ∝ π_θ{k+½} exp(−ν c_γ Â_C)
(``tests/test_onpolicy_baselines.py`` checks the loss against it).
"""
from __future__ import annotations

import torch
from pydantic import Field

from saferl.learners.lagrange import LagrangeParams
from saferl.learners.onpolicy_base import advantages, lagrangian_advantage, shuffled_minibatches, to_floats
from saferl.learners.ppo_lag import PPOLag, PPOLagParams
from saferl.learners.trust_region import detached, mean_kl


class CUPParams(PPOLagParams):
    """PPO-Lag's parameters for step 1 (clip 0.2, 10 epochs, target KL 0.02, Adam 3e-4: OmniSafe's
    CUP); ``lagrange`` is ν (init 0, plain ascent at 0.01; OmniSafe steps it with Adam at 0.035,
    ``kind: adam``)."""
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(lr=0.01))
    projection_epochs: int = Field(10, gt=0, description="step 2's passes over the batch "
                                   "(OmniSafe: update_iters, as step 1)")


def cup_projection_loss(dist: torch.distributions.Normal, half: torch.distributions.Normal, logp: torch.Tensor,
                        logp_old: torch.Tensor, adv_c: torch.Tensor, weight: float) -> torch.Tensor:
    """E[D_KL(π_θ ‖ π_θ{k+½})[s]] + weight · E[ρ Â_C], weight = ν (1 − γλ)/(1 − γ), ρ = π_θ/π_θk."""
    kl = torch.distributions.kl_divergence(dist, half).sum(-1)
    return (kl + weight * torch.exp(logp - logp_old) * adv_c).mean()


class CUP(PPOLag):
    Params = CUPParams
    _adv_c: torch.Tensor | None = None  # step 2's centred Â_C, from ``policy_advantages`` to ``project``

    def policy_advantages(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 1's advantage z(Â_R) (λ = 0 in PPO-Lag's combination); keeps the centred Â_C for step 2."""
        p, norm = self.p, self.policy.normalised
        adv_r, ret_r = advantages(self.v_r, norm, batch, "reward", p.gamma, p.lam)
        adv_c, ret_c = advantages(self.v_c, norm, batch, "cost", p.cost_gamma, p.cost_lam)
        self._adv_c = adv_c - adv_c.mean()
        return lagrangian_advantage(adv_r, adv_c, 0.0), ret_r, ret_c

    def after_policy_epochs(self, obs: torch.Tensor, act: torch.Tensor, logp_old: torch.Tensor) -> dict:
        adv_c, self._adv_c = self._adv_c, None
        return self.project(obs, act, logp_old, adv_c)

    def project(self, obs: torch.Tensor, act: torch.Tensor, logp_old: torch.Tensor, adv_c: torch.Tensor) -> dict:
        """Step 2 from the current policy π_θ{k+½}; ``logp_old`` are π_θk's log-probabilities of ``act``."""
        p, dev = self.p, self.device
        weight = self.multiplier.value * (1 - p.gamma * p.lam) / (1 - p.gamma)
        with torch.no_grad():
            half = detached(self.policy.dist(obs))
            cost_before = (torch.exp(half.log_prob(act).sum(-1) - logp_old) * adv_c).mean().item()
        data = {"z": self.policy.normalised(obs), "act": act, "logp_old": logp_old, "adv_c": adv_c,
                "half_loc": half.loc, "half_scale": half.scale}
        losses, kl, epochs_run = [], 0.0, 0
        for _ in range(p.projection_epochs):
            epochs_run += 1
            for mb in shuffled_minibatches(data, p.minibatch_size, dev):
                dist = torch.distributions.Normal(*self.policy.mean_std(mb["z"]))
                half_i = torch.distributions.Normal(mb["half_loc"], mb["half_scale"])
                loss = cup_projection_loss(dist, half_i, dist.log_prob(mb["act"]).sum(-1), mb["logp_old"],
                                           mb["adv_c"], weight)
                self.descend(self.pi_opt, loss, self.policy.parameters(), p.max_grad_norm)  # NaN: skipped, counted
                losses.append(loss.detach())
            with torch.no_grad():
                kl = mean_kl(half, self.policy.dist(obs)).item()
            if kl > p.target_kl:
                break
        with torch.no_grad():
            cost_after = (torch.exp(self.policy.log_prob(obs, act) - logp_old) * adv_c).mean().item()
        return {"cup/loss_projection": float(sum(to_floats(losses)) / len(losses)), "cup/kl_projection": kl,
                "cup/projection_epochs": epochs_run, "cup/cost_surrogate_before": cost_before,
                "cup/cost_surrogate_after": cost_after}
