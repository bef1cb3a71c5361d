"""SAC (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications", eq 5-7, 17-18)
and SAC-Lag (SAC with a cost critic and a Lagrange multiplier, as in FSRL and OmniSafe).

Per minibatch of n-step transitions (``actors/replay.py``: r and c are n-step sums, ``discount``
is γⁿ, 0 after a terminal state), a = tanh(u) from the stored pre-squash sample u:

    y_R = r + discount · [min_j Q̄_Rj(s', a') − α log π(a'|s')],   a' ~ π(·|s')      (eq 5)
    y_C = c + discount · Q̄_C(s', a'),  or at a' = tanh(μ(s')) with ``cost_target: mean``
    L_Q = Σ_j E (Q_Rj(s, a) − y_R)² + E (Q_C(s, a) − y_C)²
    L_π = E [α log π(ã|s) − min_j Q_Rj(s, ã) + λ Q_C(s, ã)] / (1 + λ),  ã ~ π reparameterised (eq 7)
    L_α = −E [log α · (log π(ã|s) + H̄)],  H̄ = −dim(A)                             (eq 18)
    Q̄ ← τ Q + (1 − τ) Q̄                                                       (polyak)

λ is ``learners/lagrange.py``'s multiplier, stepped by the coordinator's ``dual`` phase; by
default OmniSafe 0.5's SACLag rule (``omnisafe/configs/off-policy/SACLag.yaml``,
``algorithms/off_policy/sac_lag.py``): Adam on −λ (J_C − b) at lr 1e-5 from λ₀ = 0.001, one Adam
step per gradient step (taken at the dual phase, on the same J_C, for the gradient steps since the
previous one), J_C the mean cost of the last 50 ended episodes, no step during the first 100
epochs' dual phases (``warmup``). ``lagrange.kind: pid | lagrange`` name the alternatives. Plain
SAC has no phase and λ stays at its initial value (its cost critic is still trained, so its cost
value is logged). ``policy_delay`` k > 1 updates the actor, α and the targets every k-th step
(OmniSafe's SAC inherits its DDPG loop's policy_delay: 2). The coordinator owns the update-to-data ratio and the
uniform warm-up through ``offpolicy_setup``.

``cost_target``: the cost critic bootstraps at the sampled a' (``sample``: SAC's soft target without
the entropy term, as FSRL's SAC-Lag) or at the mean action tanh(μ(s')) (``mean``: OmniSafe's SACLag,
whose cost critic step is inherited from its DDPG). The configs that follow OmniSafe take its; with it,
``saferl benchmark reference --check-update`` finds OmniSafe's update functions reach the same
parameters from the same weights, minibatches and noise.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.lagrange import LagrangeParams, LagrangianLearner, OmniSafeOffPolicyLagrangeParams
from saferl.learners.networks import TanhGaussianPolicy, polyak
from saferl.learners.offpolicy_base import OffPolicyLearner, OffPolicyParams, cost_normalize_field


class SACLagParams(OffPolicyParams):
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    policy_lr: float = Field(3e-4, gt=0)
    critic_lr: float = Field(3e-4, gt=0)
    alpha_lr: float = Field(3e-4, gt=0)
    init_alpha: float = Field(1.0, gt=0)
    auto_alpha: bool = True
    tau: float = Field(0.005, gt=0, le=1, description="polyak rate of the target critics")
    max_grad_norm: float = Field(40.0, gt=0)
    policy_delay: int = Field(1, ge=1, description="critic steps per actor/α/target update (OmniSafe: 2)")
    cost_normalize: bool = cost_normalize_field()
    cost_target: Literal["sample", "mean"] = Field(
        "sample", description="the cost critic's bootstrap action: the sampled a' (FSRL) or tanh(μ(s')) (OmniSafe)")
    lagrange: OmniSafeOffPolicyLagrangeParams = Field(default_factory=OmniSafeOffPolicyLagrangeParams)


class SACLag(LagrangianLearner, OffPolicyLearner):
    Params = SACLagParams

    def __init__(self, params: SACLagParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        p, d, a = params, env.obs_dim, env.act_dim
        self.policy = TanhGaussianPolicy(d, a, p.hidden, init=p.init).to(device)
        self.build_critics(2)
        self.log_alpha = torch.tensor(float(np.log(p.init_alpha)), device=device, requires_grad=True)
        self.pi_opt = torch.optim.Adam(self.policy.parameters(), lr=p.policy_lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=p.alpha_lr)
        self.init_multiplier(p.lagrange)
        self.target_entropy = -float(a)
        self.steps = 0  # gradient steps taken: the actor, α and targets move when it is a multiple of policy_delay

    def step(self, b: dict) -> dict:
        p, alpha, lam = self.p, self.log_alpha.exp().detach(), self.multiplier.value
        with torch.no_grad():
            dist = self.policy.dist(b["next_obs"])
            a2, logp2 = self.policy.sample_of(dist)
            y_c = None
            if p.cost_target == "mean":
                y_c = b["cost"] + b["discount"] * self.q_c_target(b["next_obs"], torch.tanh(dist.mean))[0]
        loss_q = self.critic_step(b, a2, -alpha * logp2, y_c)
        self.steps += 1
        if self.steps % p.policy_delay:
            return {"loss_q": loss_q}

        a_new, logp = self.policy.sample(b["obs"])
        q_r, q_c = self.q_r(b["obs"], a_new).min(0).values, self.q_c(b["obs"], a_new)[0]
        loss_pi = ((alpha * logp - q_r + lam * q_c) / (1 + lam)).mean()
        self._descend(self.pi_opt, loss_pi, list(self.policy.parameters()))
        if p.auto_alpha:
            loss_alpha = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
            self.descend(self.alpha_opt, loss_alpha, [self.log_alpha])
        polyak(self.q_r_target, self.q_r, p.tau)
        polyak(self.q_c_target, self.q_c, p.tau)
        return {"loss_q": loss_q, "loss_pi": loss_pi.item(), "alpha": alpha.item(),
                "entropy": -logp.mean().item(), "q_r": q_r.mean().item(), "q_c": q_c.mean().item()}

    MODULES = ("policy", "q_r", "q_c", "q_r_target", "q_c_target", "pi_opt", "q_opt", "alpha_opt")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_alpha": self.log_alpha.detach().clone(), "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        with torch.no_grad():
            self.log_alpha.copy_(sd["log_alpha"])
        self.steps = int(sd.get("steps", 0))


class SACParams(SACLagParams):
    lagrange: LagrangeParams = Field(default_factory=LagrangeParams)  # λ₀ = 0, never stepped


class SAC(SACLag):
    """Unconstrained SAC: SAC-Lag without a dual phase (λ stays at its initial value, 0)."""

    Params = SACParams
