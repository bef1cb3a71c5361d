"""BPTT-Lag (seed 000, Appendix F.1, eq 75-80).

The surrogate problem (eq 75-76) at θ_k, with g = ∇J_R(θ_k), q = ∇J_C(θ_k), c = J_C(θ_k) − b:

    max_δ gᵀδ   s.t.   c + qᵀδ ≤ 0

is solved by the primal-dual iteration of eq 77-78 on L(δ, λ) = −gᵀδ + λ(c + qᵀδ): a primal
step along g − λq (Adam on θ, the ascent direction of J_R − λJ_C) every update, and the dual step
λ ← max(0, λ + η_λ c) on the coordinator's ``dual`` schedule. g and q are the BPTT gradients of
eq 79-80, computed by the gradient workers (``learners/analytic.py``).

Choices not fixed by the paper: Adam for the primal step (lr, grad-norm clip in Params), the
dual step size, and reparameterised exploration noise during training.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.lagrange import LagrangeParams, make_multiplier
from saferl.learners.networks import GaussianPolicy


class BPTTLagParams(base.Params):
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    lr: float = Field(1e-3, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    init_log_std: float = -1.0
    stochastic: bool = Field(True, description="reparameterised exploration noise in rollouts")
    normalise_obs: bool = True
    horizon: int | None = Field(None, gt=0, description="None = the task's episode length")
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(lr=0.05))


def combine(results: list[dict]) -> dict:
    """Average shard results weighted by their env counts."""
    n = np.array([r["n"] for r in results], dtype=np.float64)
    w = n / n.sum()
    return {"j_r": float(sum(wi * r["j_r"] for wi, r in zip(w, results))),
            "j_c": float(sum(wi * r["j_c"] for wi, r in zip(w, results))),
            "g": sum(wi * r["g"] for wi, r in zip(w, results)),
            "q": sum(wi * r["q"] for wi, r in zip(w, results))}


class BPTTLag(base.Learner):
    Params = BPTTLagParams

    def __init__(self, params: BPTTLagParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        p = params
        self.arch = dict(obs_dim=env.obs_dim, act_dim=env.act_dim, hidden=p.hidden,
                         init_log_std=p.init_log_std, squash=True, normalise_obs=p.normalise_obs)
        self.policy = GaussianPolicy(**self.arch).to(device)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=p.lr)
        self.multiplier = make_multiplier(p.lagrange)
        self.horizon = p.horizon or env.max_episode_steps
        self.last_j_c: float | None = None

    def policy_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def update(self, results: list[dict]) -> dict:
        est = combine(results)
        lam = self.multiplier.value
        direction = torch.as_tensor(est["g"] - lam * est["q"], dtype=torch.float32, device=self.device)
        self.opt.zero_grad()
        i = 0
        for prm in self.policy.parameters():  # minimise −(J_R − λ J_C)
            prm.grad = -direction[i:i + prm.numel()].view_as(prm).clone()
            i += prm.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.p.max_grad_norm)
        self.opt.step()
        if self.policy.norm is not None:
            for r in results:
                self.policy.norm.update_moments(r["obs_count"], r["obs_mean"], r["obs_var"])
        self.last_j_c = est["j_c"]
        return {"j_r": est["j_r"], "j_c": est["j_c"], "grad_norm": float(grad_norm),
                "lagrange_multiplier": lam}

    def phase_dual(self, signals: dict) -> dict:
        if self.last_j_c is None:
            return {}
        return {"lagrange_multiplier": self.multiplier.update(self.last_j_c, self.cost_limit)}

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "opt": self.opt.state_dict(),
                "multiplier": self.multiplier.state_dict(), "last_j_c": self.last_j_c,
                "rng": self.rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.policy.load_state_dict(sd["policy"])
        self.opt.load_state_dict(sd["opt"])
        self.multiplier.load_state_dict(sd["multiplier"])
        self.last_j_c = sd["last_j_c"]
        self.set_rng_state(sd["rng"])
