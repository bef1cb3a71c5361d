"""The trust-region family's base (TRPO, TRPO-Lag, CPO, PCPO, sTRPO): its parameters, the
policy at θ_k and the natural-gradient step with its line search (the math in
``learners/trust_region.py``), and the learner that fits the critics beside the policy step
(on the targets computed before it)."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.networks import (
    GaussianPolicy,
    flat_grad,
    flat_params,
    init_field,
    obs_clip_field,
    obs_norm_per_step_field,
    set_flat_params,
)
from saferl.learners.onpolicy_base import (
    ActorCritic,
    CriticLane,
    ParallelCritics,
    advantages,
    assemble,
    clip_critic_grad_field,
    critic_norm_coef_field,
    flat,
    parallel_critics_field,
    to_floats,
)
from saferl.learners.trust_region import (
    SearchResult,
    backtracking_line_search,
    conjugate_gradient,
    detached,
    fisher_vector_product,
    max_step,
    mean_kl,
)
from saferl.metric_keys import SKIPPED_UPDATES


class TrustRegionParams(base.Params):
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    critic_lr: float = Field(1e-3, gt=0, description="Adam step size of both critics (OmniSafe: 1e-3)")
    gamma: float = Field(0.99, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cost_gamma: float = Field(0.99, gt=0, le=1)
    cost_lam: float = Field(0.95, ge=0, le=1)
    target_kl: float = Field(0.01, gt=0, description="δ, the trust-region radius in mean KL")
    kl_action_dims: Literal["sum", "mean"] = Field(
        "sum", description="the KL of the trust region, the Fisher-vector product and the line search: of the "
        "joint action distribution (sum, the paper's) or averaged over action dimensions (mean, OmniSafe 0.5's)")
    kl_tolerance: float = Field(0.5, ge=0, description="accept a step while KL ≤ δ(1 + tol); OpenAI baselines' "
                                "TRPO 1.5δ, OmniSafe's δ")
    cg_iters: int = Field(15, gt=0)
    cg_damping: float = Field(0.1, ge=0, description="d in (H + d·I) x = g")
    fvp_subsample: int = Field(1, gt=0, description="use every k-th state in Fisher-vector products")
    backtrack_coef: float = Field(0.8, gt=0, lt=1)
    max_backtracks: int = Field(15, gt=0, description="candidate steps tried: 1, β, …, β^(n−1)")
    critic_epochs: int = Field(10, gt=0)
    minibatch_size: int = Field(128, gt=0, description="critic minibatch")
    critic_norm_coef: float = critic_norm_coef_field()
    clip_critic_grad: bool = clip_critic_grad_field()
    parallel_critics: ParallelCritics = parallel_critics_field("thread")
    max_grad_norm: float = Field(40.0, gt=0, description="with clip_critic_grad (OmniSafe: 40)")
    init_log_std: float = -0.5
    normalise_obs: bool = True
    obs_clip: float = obs_clip_field()
    obs_norm_per_step: bool = obs_norm_per_step_field()
    init: str = init_field()


class PolicyAtK:
    """The policy π_k on a flat batch: its parameters θ_k, the fixed π_k (distributions and
    log-probabilities), ratio surrogates E[ρ A] and their gradients at θ_k, the Fisher-vector
    product, and moving the policy to θ_k + step."""

    def __init__(self, policy: GaussianPolicy, obs: torch.Tensor, act: torch.Tensor, damping: float,
                 fvp_subsample: int = 1, kl_action_dims: str = "sum"):
        self.policy, self.obs, self.act, self.kl_action_dims = policy, obs, act, kl_action_dims
        self.params = list(policy.parameters())
        self.theta = flat_params(policy)
        with torch.no_grad():
            dist = policy.dist(obs)
            self.old, self.logp = detached(dist), dist.log_prob(act).sum(-1)
        self.fvp = fisher_vector_product(policy, obs[::fvp_subsample], damping, kl_action_dims)

    def surrogate(self, adv: torch.Tensor) -> torch.Tensor:
        """E[ρ A] at the policy's current parameters (differentiable)."""
        return (torch.exp(self.policy.log_prob(self.obs, self.act) - self.logp) * adv).mean()

    def gradient(self, adv: torch.Tensor) -> torch.Tensor:
        """∇_θ E[ρ A] at the current parameters, flat."""
        return flat_grad(self.surrogate(adv), self.params)

    def move(self, step: torch.Tensor, fraction: float = 1.0) -> None:
        set_flat_params(self.policy, self.theta + fraction * step)

    @torch.no_grad()
    def measure(self, adv: torch.Tensor, adv_c: torch.Tensor | None = None) -> tuple[float, float, float | None]:
        """(−E[ρ Â], D̄_KL(π_k ‖ π), E[ρ Â_C] or None) at the current parameters."""
        loss = -self.surrogate(adv).item()
        kl = mean_kl(self.old, self.policy.dist(self.obs), self.kl_action_dims).item()
        return loss, kl, (self.surrogate(adv_c).item() if adv_c is not None else None)


def natural_gradient_step(k: PolicyAtK, adv: torch.Tensor, p: TrustRegionParams) -> dict:
    """One TRPO step on E[ρ Â] (Schulman et al. 2015, §6 and Appendix C); leaves the policy at
    the accepted parameters (θ_k when CG failed or no candidate passed the search)."""
    g = k.gradient(adv)
    cg = conjugate_gradient(k.fvp, g, p.cg_iters)
    stats = {"cg_iters": cg.iterations, "cg_residual": cg.residual, "cg_failed": float(cg.failed)}
    loss_before = k.measure(adv)[0]
    if cg.failed:
        res = SearchResult(False, 0.0, 0, loss_before, 0.0, None)
        step = torch.zeros_like(g)
    else:
        step = max_step(cg.x, cg.x @ k.fvp(cg.x), p.target_kl)

        def evaluate(fraction: float):
            k.move(step, fraction)
            return k.measure(adv)

        res = backtracking_line_search(evaluate, loss_before, p.target_kl, kl_tolerance=p.kl_tolerance,
                                       backtrack_coef=p.backtrack_coef, max_tries=p.max_backtracks)
    k.move(step, res.fraction)
    loss, kl, _ = k.measure(adv)
    return {**stats, "loss_pi": loss, "loss_pi_before": loss_before, "kl": kl,
            "step_fraction": res.fraction, "search_tries": res.tries, "step_accepted": float(res.accepted),
            "step_norm": (res.fraction * step).norm().item()}


class TrustRegionLearner(ActorCritic):
    """What TRPO, TRPO-Lag and CPO share: ``onpolicy_base.ActorCritic``'s networks, batch preparation,
    critic fitting beside the policy step (``CriticLane``), and checkpointing. Subclasses implement
    ``policy_step(prepared) -> metrics``."""
    Params = TrustRegionParams
    MODULES = ("policy", "v_r", "v_c", "v_opt")

    def fit_critics(self, lane: CriticLane, z: torch.Tensor, ret_r: torch.Tensor, ret_c: torch.Tensor) -> None:
        """Hand ``critic_epochs`` shuffled passes of minibatch critic steps to ``lane``."""
        for _ in range(self.p.critic_epochs):
            for idx in torch.randperm(z.shape[0], device=z.device).split(self.p.minibatch_size):
                lane.submit(z[idx], ret_r[idx], ret_c[idx])

    def prepare(self, batches: list[dict]) -> dict:
        """Assembled batch with flat obs/act, raw reward and cost GAE advantages and value targets."""
        p = self.p
        batch = assemble(batches, self.device)
        norm = self.policy.normalised
        adv_r, ret_r = advantages(self.v_r, norm, batch, "reward", p.gamma, p.lam)
        adv_c, ret_c = advantages(self.v_c, norm, batch, "cost", p.cost_gamma, p.cost_lam)
        return {"batch": batch, "obs": flat(batch, batch["obs"]), "act": flat(batch, batch["act"]),
                "adv_r": adv_r, "adv_c": adv_c, "ret_r": ret_r, "ret_c": ret_c}

    def policy_at_k(self, prep: dict) -> PolicyAtK:
        return PolicyAtK(self.policy, prep["obs"], prep["act"], self.p.cg_damping, self.p.fvp_subsample,
                         self.p.kl_action_dims)

    def train_on(self, batches: list[dict]) -> dict:
        skipped = self.skipped_updates
        prep = self.prepare(batches)
        with self.critic_lane() as lane:  # the critics' fit, beside the policy's step on a CPU
            self.fit_critics(lane, self.policy.normalised(prep["obs"]), prep["ret_r"], prep["ret_c"])
            out = self.policy_step(prep, batches)
            losses_v, refused_v = lane.drain()
        out["loss_v"] = float(np.mean(to_floats(losses_v)))
        self.skipped_updates += refused_v
        out[SKIPPED_UPDATES] = self.skipped_updates - skipped  # critic steps refused for NaN/Inf
        if self.policy.norm is not None:  # statistics for the next rollout, after this update
            self.policy.norm.update(prep["obs"])
        out["std"] = self.policy.log_std.exp().mean().item()
        return out

    def policy_step(self, prep: dict, batches: list[dict]) -> dict:
        raise NotImplementedError
