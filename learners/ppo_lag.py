"""PPO-Lagrangian (Ray, Achiam & Amodei 2019, "Benchmarking Safe Exploration in Deep RL";
clipped PPO from Schulman et al. 2017).

Per update, with reward and cost GAE from separate critics (``learners/gae.py``):

    Â = (z(Â_R) − λ (Â_C − mean Â_C)) / (1 + λ)                       (OmniSafe's scaling)
    L_π = −E[min(ρ Â, clip(ρ, 1 ± ε) Â)] − c_H H[π],    ρ = π_θ(u|s) / π_old(u|s)
    L_V = E[(V_R(s) − R̂)²] + E[(V_C(s) − Ĉ)²]

and the multiplier λ of ``learners/lagrange.py`` is stepped by the coordinator's ``dual`` phase
(not here). The default follows OmniSafe 0.5's PPOLag (``omnisafe/configs/on-policy/PPOLag.yaml``,
``common/lagrange.py``): Adam on the loss −λ (J_C − b) at lr 0.035 from λ₀ = 0.001, λ clamped at
0, J_C the mean cost of the last 50 ended episodes; ``lagrange.kind: lagrange`` (plain ascent) and
``pid`` are the named alternatives. OmniSafe steps λ on the epoch's J_C before that epoch's policy
update: the shipped configs schedule the dual phase there (``schedule.dual_before_update``); without
it the phase runs after the update, so an update uses the λ of the previous phase.
Optional OmniSafe features: an L2 penalty ``critic_norm_coef`` Σ‖θ_V‖² added to L_V, the critics'
gradient clipped at ``max_grad_norm`` (``clip_critic_grad``), and the policy's Adam step size
decayed linearly from ``policy_lr`` to 0 over ``lr_decay_updates`` updates (OmniSafe's
``linear_lr_decay``: update k uses policy_lr (1 − k/N)). Early stop of the epochs when the sampled KL
exceeds ``target_kl``. On a GPU each minibatch's policy and critic steps replay as one CUDA graph
(``cuda_graph``; the same floats, ``learners/cuda_graph.py``). The parts (batch assembly, critics,
the clipped surrogate) are functions so TRPO-Lag, CPO and sTRPO can reuse them.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.cuda_graph import GraphedStep, guarded_step_on_device
from saferl.learners.lagrange import LagrangeParams, LagrangianLearner, OmniSafeLagrangeParams
from saferl.learners.networks import (
    init_field,
    normal_entropy,
    normal_log_prob,
    obs_clip_field,
    obs_norm_per_step_field,
)
from saferl.learners.onpolicy_base import (
    ActorCritic,
    CriticLane,
    ParallelCritics,
    adam,
    advantages,
    assemble,
    clip_critic_grad_field,
    clipped_surrogate,
    critic_norm_coef_field,
    flat,
    lagrangian_advantage,
    parallel_critics_field,
    shuffled_minibatches,
    to_floats,
)
from saferl.metric_keys import SKIPPED_UPDATES


class PPOLagParams(base.Params):
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    policy_lr: float = Field(3e-4, gt=0)
    critic_lr: float = Field(3e-4, gt=0)
    gamma: float = Field(0.99, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cost_gamma: float = Field(0.99, gt=0, le=1)
    cost_lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0)
    epochs: int = Field(10, gt=0)
    minibatch_size: int = Field(256, gt=0)
    target_kl: float = Field(0.02, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(40.0, gt=0)
    init_log_std: float = -0.5
    normalise_obs: bool = True
    obs_clip: float = obs_clip_field()
    obs_norm_per_step: bool = obs_norm_per_step_field()
    init: str = init_field()
    critic_norm_coef: float = critic_norm_coef_field()
    clip_critic_grad: bool = clip_critic_grad_field()
    lr_decay_updates: int = Field(0, ge=0, description="decay policy_lr linearly to 0 over this many updates "
                                  "(OmniSafe's linear_lr_decay: total_env_steps / steps_per_iteration); 0: constant")
    lagrange: OmniSafeLagrangeParams = Field(default_factory=OmniSafeLagrangeParams)
    parallel_critics: ParallelCritics = parallel_critics_field("off")
    cuda_graph: bool = Field(True, description="on a GPU, run each minibatch's policy and critic steps as one "
                             "CUDA graph, captured once per update (no effect on the CPU); a subclass whose "
                             "minibatch loss reads the host (.item(), validated distributions) sets it false")


class PPOLag(LagrangianLearner, ActorCritic):
    Params = PPOLagParams
    MODULES = ("policy", "v_r", "v_c", "pi_opt", "v_opt")

    def __init__(self, params: PPOLagParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.pi_opt = adam(self.policy.parameters(), lr=params.policy_lr)
        self.init_multiplier(params.lagrange)
        self.updates = 0  # updates done: the clock of the linear policy-lr decay

    def train_on(self, batches: list[dict]) -> dict:
        p, dev = self.p, self.device
        if p.lr_decay_updates:
            for group in self.pi_opt.param_groups:
                group["lr"] = p.policy_lr * max(0.0, 1.0 - self.updates / p.lr_decay_updates)
        self.updates += 1
        batch = assemble(batches, dev)
        lam = self.multiplier.value
        adv, ret_r, ret_c = self.policy_advantages(batch)
        obs, act, logp_old = flat(batch, batch["obs"]), flat(batch, batch["act"]), flat(batch, batch["logp"])
        z = self.policy.normalised(obs)  # once: the statistics move only after the epochs (norm.update)

        def minibatch_loss(mb):
            mu, std = self.policy.mean_std(mb["z"])
            loss_pi, extra = self.surrogate_loss(normal_log_prob(mu, std, mb["act"]), mb["logp_old"], mb["adv"])
            if p.entropy_coef:  # at 0 the bonus would add exact zeros to the loss and its gradient
                loss_pi = loss_pi - p.entropy_coef * normal_entropy(std).mean()
            return loss_pi, extra

        def epoch_kl():
            return (logp_old - self.policy.log_prob(z, act, normalised=True)).mean().item()

        skipped = self.skipped_updates
        data = {"z": z, "act": act, "logp_old": logp_old, "adv": adv, "ret_r": ret_r, "ret_c": ret_c}
        stats, epochs_run = self.policy_epochs(data, minibatch_loss, epoch_kl)
        extra = self.after_policy_epochs(obs, act, logp_old)
        if self.policy.norm is not None:  # statistics for the next rollout, after this update
            self.policy.norm.update(obs)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update(epochs=epochs_run, std=self.policy.log_std.exp().mean().item(),
                   lagrange_multiplier=lam, policy_lr=self.pi_opt.param_groups[0]["lr"], **extra)
        out[SKIPPED_UPDATES] = self.skipped_updates - skipped
        return out

    def surrogate_loss(self, logp: torch.Tensor, logp_old: torch.Tensor,
                       adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One minibatch's policy loss before the entropy bonus, and its metrics: PPO's clipped
        surrogate of ``adv`` (a row of ``policy_advantages``' first output). PDO and APPO override it."""
        loss, ratio = clipped_surrogate(logp, logp_old, adv, self.p.clip)
        return loss, {"clip_frac": ((ratio.detach() - 1).abs() > self.p.clip).float().mean()}

    def policy_epochs(self, data: dict, minibatch_loss, epoch_kl) -> tuple[dict, int]:
        """Up to ``epochs`` shuffled passes over ``data`` (per-sample tensors, among them the
        normalised observations ``z`` and the value targets ``ret_r``, ``ret_c``): per minibatch
        (the same keys, ``minibatch_size`` rows) a clipped-gradient policy step on
        ``minibatch_loss(mb) -> (loss, extra stats)`` and a critic step (``minibatch_step``); after
        each pass the ``epoch_kl()`` early stop at ``target_kl``. Returns the stats lists (floats)
        and the passes run. Minibatch statistics stay 0-d tensors until the end, so the loop never
        waits on the device; on a CPU the critic steps run beside the policy's (``CriticLane``)."""
        p = self.p
        stats: dict[str, list] = {"loss_pi": [], "loss_v": [], "kl": []}
        with self.critic_lane() as lane:
            step = self.minibatch_step(minibatch_loss, lane)
            for epoch in range(p.epochs):  # noqa: B007  (the epochs run are returned)
                for mb in shuffled_minibatches(data, p.minibatch_size, self.device):
                    for k, v in step(mb).items():
                        stats.setdefault(k, []).append(v)
                with torch.no_grad():
                    stats["kl"].append(epoch_kl())
                if stats["kl"][-1] > p.target_kl:
                    break
            losses_v, refused_v = lane.drain()
        stats["loss_v"] += losses_v
        stats = {k: to_floats(v) for k, v in stats.items()}
        self.skipped_updates += int(sum(stats.pop("skipped", []))) + refused_v
        return stats, epoch + 1

    def minibatch_step(self, minibatch_loss, lane: CriticLane):
        """``mb -> stats`` (0-d tensors): the guarded policy step on ``minibatch_loss(mb)`` and the
        critic step. On a GPU with ``cuda_graph``, ``device_step`` as one CUDA graph captured for
        this update (``learners/cuda_graph.py``); otherwise ``eager_step``, its critic step handed
        to ``lane``."""
        if self.device.type == "cuda" and getattr(self.p, "cuda_graph", False):
            return GraphedStep(partial(self.device_step, minibatch_loss))
        return partial(self.eager_step, minibatch_loss, lane)

    def eager_step(self, minibatch_loss, lane: CriticLane, mb: dict) -> dict:
        lane.submit(mb["z"], mb["ret_r"], mb["ret_c"])  # first, so that a threaded lane runs it beside the policy's
        loss_pi, extra = minibatch_loss(mb)
        self.descend(self.pi_opt, loss_pi, self.policy.parameters(), self.p.max_grad_norm)
        return {"loss_pi": loss_pi.detach(), **extra}

    def device_step(self, minibatch_loss, mb: dict) -> dict:
        """``eager_step`` without host reads (the same floats): the NaN/Inf guard runs on the device
        and its refusals come back as the ``skipped`` statistic."""
        loss_pi, extra = minibatch_loss(mb)
        ok_pi = guarded_step_on_device(self.pi_opt, list(self.policy.parameters()), loss_pi, self.p.max_grad_norm)
        loss_v, params, clip, backward = self.critic_objective(mb["z"], mb["ret_r"], mb["ret_c"])
        ok_v = guarded_step_on_device(self.v_opt, params, loss_v, clip, backward)
        return {"loss_pi": loss_pi.detach(), "loss_v": loss_v.detach(), "skipped": (~ok_pi).int() + (~ok_v).int(),
                **extra}

    def policy_advantages(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Â for the clipped surrogate, reward value targets R̂, cost value targets Ĉ), each flat [M].
        PPO-Lag: Â = ``lagrangian_advantage(Â_R, Â_C, λ)``; RCPO and CUP override this."""
        p, norm = self.p, self.policy.normalised
        adv_r, ret_r = advantages(self.v_r, norm, batch, "reward", p.gamma, p.lam)
        adv_c, ret_c = advantages(self.v_c, norm, batch, "cost", p.cost_gamma, p.cost_lam)
        return lagrangian_advantage(adv_r, adv_c, self.multiplier.value), ret_r, ret_c

    def after_policy_epochs(self, obs: torch.Tensor, act: torch.Tensor, logp_old: torch.Tensor) -> dict:
        """A second policy step on the same flat batch, after the clipped-surrogate epochs and before
        the observation statistics move (CUP's projection); returns metrics. None in PPO-Lag."""
        return {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "updates": self.updates}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.updates = int(sd.get("updates", 0))


class PPOParams(PPOLagParams):
    lagrange: LagrangeParams = Field(default_factory=LagrangeParams)  # λ₀ = 0, never stepped


class PPO(PPOLag):
    """Unconstrained PPO: PPO-Lag without a dual phase (λ stays at its initial value, 0), so
    Â = z(Â_R). Its cost critic is still trained and logged."""

    Params = PPOParams


class CPPOPIDParams(PPOLagParams):
    # Stooke et al. 2020's PID gains as OmniSafe's CPPOPID sets them (K_P 0.1, K_I 0.01, K_D 0.01,
    # λ ≤ 100); the paper tunes them per task.
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(
        kind="pid", kp=0.1, ki=0.01, kd=0.01, upper=100.0))


class CPPOPID(PPOLag):
    """CPPO-PID (Stooke, Achiam & Abbeel 2020, "Responsive Safety in RL by PID Lagrangian Methods"):
    PPO-Lag with the PID-Lagrangian multiplier of ``learners/lagrange.py`` (their Algorithm 2),
    stepped on the coordinator's ``dual`` phase, and the (1 + λ)-normalised objective
    (J_R − λ J_C)/(1 + λ) they use (``lagrangian_advantage``). Only the default of ``lagrange``
    differs from PPO-Lag (kind pid), so a config that leaves it out still gets the PID multiplier."""

    Params = CPPOPIDParams
