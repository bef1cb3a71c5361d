"""TD3 (Fujimoto, van Hoof & Meger 2018, "Addressing Function Approximation Error in Actor-Critic
Methods", Algorithm 1; §4.2, §5.2-5.3) and DDPG (Lillicrap et al. 2016, Algorithm 1), each with a
cost critic and a Lagrange multiplier (TD3-Lag, DDPG-Lag, as in FSRL and OmniSafe).

The actor is deterministic, a = tanh(μ(s)) (``networks.DeterministicTanhPolicy``); env hosts
explore with a = clip(tanh(μ(s)) + N(0, σ²), −1, 1) (σ = 0.1, §6.1) and store u = artanh(a), so the executed
action of a transition is tanh(u). Per minibatch of n-step transitions (``actors/replay.py``:
r and c are n-step sums, ``discount`` is γⁿ, 0 after a terminal state), a = tanh(u):

    ã' = clip(tanh(μ̄(s')) + clip(N(0, σ̃²), −c, c), −1, 1)    target policy smoothing (§5.3)
    y_R = r + discount · min_j Q̄_Rj(s', ã')                   clipped double Q-learning (§4.2)
    y_C = c + discount · Q̄_C(s', ã')
    L_Q = Σ_j E (Q_Rj(s, a) − y_R)² + E (Q_C(s, a) − y_C)²                     every step
    every ``policy_delay`` steps (delayed policy updates, §5.2):
        L_μ = E [−Q_R1(s, ā) + λ Q_C(s, ā)] / (1 + λ),  ā = tanh(μ(s))    deterministic policy gradient
        θ̄ ← τ θ + (1 − τ) θ̄  for μ̄, Q̄_Rj, Q̄_C                            (polyak, Algorithm 1)

DDPG-Lag is the same learner with one reward critic, σ̃ = 0 (ã' = μ̄(s')) and ``policy_delay`` 1.
λ is ``learners/lagrange.py``'s multiplier, stepped by the coordinator's ``dual`` phase, by
default with OmniSafe 0.5's TD3Lag / DDPGLag rule (``omnisafe/configs/off-policy/TD3Lag.yaml``,
``DDPGLag.yaml``; the same as SAC-Lag's, ``sac_lag``): Adam on −λ (J_C − b) at lr 1e-5 from
λ₀ = 0.001, one Adam step per gradient step, J_C the mean cost of the last 50 ended episodes, none
in the first 100 epochs. ``lagrange.kind: pid | lagrange`` name the alternatives. TD3 and DDPG have
no phase and λ stays at its initial value (the cost critic is still trained, so its value is logged).
"""
from __future__ import annotations

import copy

import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.lagrange import LagrangeParams, LagrangianLearner, OmniSafeOffPolicyLagrangeParams
from saferl.learners.networks import DeterministicTanhPolicy, polyak
from saferl.learners.offpolicy_base import OffPolicyLearner, OffPolicyParams, cost_normalize_field


class TD3LagParams(OffPolicyParams):
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    policy_lr: float = Field(3e-4, gt=0)
    critic_lr: float = Field(3e-4, gt=0)
    tau: float = Field(0.005, gt=0, le=1, description="polyak rate of the target networks")
    n_critics: int = Field(2, ge=1, description="reward critics; the target takes their minimum")
    exploration_noise: float = Field(0.1, ge=0, description="σ of the Gaussian added to tanh(μ(s)) in rollouts")
    target_noise: float = Field(0.2, ge=0, description="σ̃ of target policy smoothing (0: none)")
    noise_clip: float = Field(0.5, ge=0, description="c: the smoothing noise is clipped to [−c, c]")
    policy_delay: int = Field(2, ge=1, description="critic steps per actor and target update")
    max_grad_norm: float = Field(40.0, gt=0)
    cost_normalize: bool = cost_normalize_field()
    lagrange: OmniSafeOffPolicyLagrangeParams = Field(default_factory=OmniSafeOffPolicyLagrangeParams)


class DDPGLagParams(TD3LagParams):
    n_critics: int = Field(1, ge=1)
    target_noise: float = Field(0.0, ge=0)
    policy_delay: int = Field(1, ge=1)


class TD3Lag(LagrangianLearner, OffPolicyLearner):
    Params = TD3LagParams
    MODULES = ("policy", "policy_target", "q_r", "q_c", "q_r_target", "q_c_target", "pi_opt", "q_opt")

    def __init__(self, params: TD3LagParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        p = params
        self.policy = DeterministicTanhPolicy(env.obs_dim, env.act_dim, p.hidden, p.exploration_noise,
                                             p.init).to(device)
        self.build_critics(p.n_critics)
        self.policy_target = copy.deepcopy(self.policy)
        self.pi_opt = torch.optim.Adam(self.policy.parameters(), lr=p.policy_lr)
        self.init_multiplier(p.lagrange)
        self.steps = 0  # gradient steps taken: the actor and targets move when it is a multiple of policy_delay

    def target_action(self, next_obs: torch.Tensor) -> torch.Tensor:
        """ã' = clip(tanh(μ̄(s')) + clip(σ̃ ε, −c, c), −1, 1), ε ~ N(0, I) from torch's generator."""
        a2 = self.policy_target(next_obs)
        if self.p.target_noise > 0:
            noise = (self.p.target_noise * torch.randn_like(a2)).clamp(-self.p.noise_clip, self.p.noise_clip)
            a2 = (a2 + noise).clamp(-1.0, 1.0)
        return a2

    def step(self, b: dict) -> dict:
        p, lam = self.p, self.multiplier.value
        with torch.no_grad():
            a2 = self.target_action(b["next_obs"])
        out = {"loss_q": self.critic_step(b, a2)}
        self.steps += 1
        if self.steps % p.policy_delay:
            return out

        a_new = self.policy(b["obs"])
        q_r, q_c = self.q_r(b["obs"], a_new)[0], self.q_c(b["obs"], a_new)[0]
        loss_pi = ((-q_r + lam * q_c) / (1 + lam)).mean()
        self._descend(self.pi_opt, loss_pi, list(self.policy.parameters()))
        polyak(self.policy_target, self.policy, p.tau)
        polyak(self.q_r_target, self.q_r, p.tau)
        polyak(self.q_c_target, self.q_c, p.tau)
        return {**out, "loss_pi": loss_pi.item(), "q_r": q_r.mean().item(), "q_c": q_c.mean().item()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.steps = int(sd["steps"])


class TD3Params(TD3LagParams):
    lagrange: LagrangeParams = Field(default_factory=LagrangeParams)  # λ₀ = 0, never stepped


class DDPGParams(DDPGLagParams):
    lagrange: LagrangeParams = Field(default_factory=LagrangeParams)  # λ₀ = 0, never stepped


class TD3(TD3Lag):
    """Unconstrained TD3: TD3-Lag without a dual phase (λ stays at its initial value, 0)."""

    Params = TD3Params


class DDPGLag(TD3Lag):
    """DDPG-Lag: one reward critic, no target smoothing, actor and targets updated every step."""
    Params = DDPGLagParams


class DDPG(DDPGLag):
    """Unconstrained DDPG: DDPG-Lag without a dual phase."""

    Params = DDPGParams
