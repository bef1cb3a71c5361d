"""The analytic-gradient family's base (SHAC-Lag, BPTT-Lag, CGPO, MB-CGPO): window parameters,
the gradient workers' shard results combined, and the learner that owns the policy and the time
critics and steps with the gradients the workers back-propagated through the simulator."""
from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.analytic import TimeValue, td_lambda_targets
from saferl.learners.networks import GaussianPolicy, polyak
from saferl.metric_keys import SKIPPED_UPDATES


class WindowParams(base.Params):
    """What every short-horizon analytic-gradient learner shares (windows, critics, policy)."""
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    critic_hidden: list[int] | None = Field(default_factory=lambda: [64, 64],
                                            description="None = no critics (BPTT over whole episodes)")
    horizon: int | None = Field(10, gt=0, description="window h; None = the task's episode length T")
    critic_lr: float = Field(1e-3, gt=0)
    critic_lr_end: float | None = Field(None, gt=0, description="None = constant; else decayed linearly "
                                        "from critic_lr over critic_lr_decay_fits critic fits (SHAC's schedule)")
    critic_lr_decay_fits: int = Field(1000, gt=0, description="fits (policy updates) the decay takes")
    critic_iterations: int = Field(16, gt=0)
    critic_minibatch: int = Field(64, gt=0)
    td_lambda: float = Field(0.95, ge=0, le=1)
    gamma: float = Field(1.0, gt=0, le=1, description="1 = the finite-horizon objective of the CGPO paper; "
                         "SHAC's own tasks (SafeGBPO) discount")
    init_log_std: float = -1.0
    activation: Literal["tanh", "relu", "elu"] = Field("tanh", description="the policy's hidden activation")
    critic_betas: tuple[float, float] = Field((0.9, 0.999), description="the critics' Adam betas")
    critic_max_grad_norm: float | None = Field(None, gt=0, description="None = critic gradients not clipped")
    stochastic: bool = Field(True, description="reparameterised exploration noise in rollouts")
    normalise_obs: bool = True
    target_critic_alpha: float | None = Field(None, ge=0, lt=1, description="None = no target critics; "
                                              "α: V̄ ← α V̄ + (1 − α) V after each critic fit (SHAC)")


def combine(results: list[dict]) -> dict:
    """Average shard results weighted by their env counts."""
    w = np.array([r["n"] for r in results], dtype=np.float64)
    w /= w.sum()
    return {k: sum(wi * r[k] for wi, r in zip(w, results)) for k in ("l_r", "l_c", "j_r", "j_c", "g", "q")}


class WindowLearner(base.Learner):
    """Policy, time critics and the update skeleton; subclasses define ``policy_step``."""
    Params = WindowParams
    MODULES = ("policy", "critics", "critic_opt", "targets")  # the critics: None without them

    def __init__(self, params: WindowParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        p = params
        self.horizon = min(p.horizon or env.max_episode_steps, env.max_episode_steps)
        use_critics = p.critic_hidden is not None and self.horizon < env.max_episode_steps
        self.arch = {"policy": dict(obs_dim=env.obs_dim, act_dim=env.act_dim, hidden=p.hidden,
                                    init_log_std=p.init_log_std, squash=True, normalise_obs=p.normalise_obs,
                                    activation=p.activation),
                     "critic_hidden": p.critic_hidden if use_critics else None, "gamma": p.gamma}
        self.policy = GaussianPolicy(**self.arch["policy"]).to(device)
        self.critics, self.critic_opt = None, None
        if use_critics:
            self.critics = torch.nn.ModuleList(
                TimeValue(env.obs_dim, p.critic_hidden, env.max_episode_steps) for _ in range(2)).to(device)
            self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=p.critic_lr, betas=p.critic_betas)
        self.targets = copy.deepcopy(self.critics) if use_critics and p.target_critic_alpha is not None else None
        self.critic_fits = 0
        self.last_j_c: float | None = None

    # -- what gradient workers receive -------------------------------------------------------
    def gradient_setup(self) -> dict:
        """Network shapes, window length h, exploration noise on/off, and whether updates wait
        for a ratio test (a learner with ``propose``: CGPO)."""
        return {"arch": self.arch, "horizon": self.horizon, "stochastic": self.p.stochastic,
                "ratio_test": hasattr(self, "propose")}

    def policy_state(self) -> dict:
        cpu = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731
        out = {"policy": cpu(self.policy)}
        if self.critics is not None:
            out["v_r"], out["v_c"] = cpu(self.bootstrap[0]), cpu(self.bootstrap[1])
        return out

    @property
    def bootstrap(self) -> torch.nn.ModuleList:
        """The critics window tails and TD(λ) targets bootstrap from: the targets when kept."""
        return self.targets if self.targets is not None else self.critics

    # -- the update --------------------------------------------------------------------------
    def update(self, results: list[dict]) -> dict:
        """Policy step, critic fit, observation statistics. Guarded (issue #9): a NaN/Inf combined
        gradient or estimate skips the policy step (counted in ``health/skipped_updates``, the
        policy untouched), non-finite shard moments leave the normaliser as it was, and a
        non-finite Ĵ_C is not handed to the dual phase (the last finite one is kept)."""
        skipped = self.skipped_updates
        est = combine(results)
        est["h"] = int(results[0]["traj"]["reward"].shape[0])  # this window's length
        finite = all(bool(np.isfinite(est[k]).all()) for k in ("g", "q", "j_r", "j_c"))
        if finite:
            metrics = self.policy_step(est)
        else:
            self.skipped_updates += 1
            metrics = self.skip_policy_step(est)
        if self.critics is not None:
            metrics.update(self.fit_critics(results))
        moments_finite = all(np.isfinite(r["obs_mean"]).all() and np.isfinite(r["obs_var"]).all() for r in results)
        if self.policy.norm is not None and moments_finite:
            for r in results:
                self.policy.norm.update_moments(r["obs_count"], r["obs_mean"], r["obs_var"])
        if np.isfinite(est["j_c"]):
            self.last_j_c = float(est["j_c"])
        return {"l_r": float(est["l_r"]), "l_c": float(est["l_c"]), "j_r": float(est["j_r"]),
                "j_c": float(est["j_c"]), **metrics, SKIPPED_UPDATES: self.skipped_updates - skipped}

    def skip_policy_step(self, est: dict) -> dict:
        """What a policy step refused for non-finite g, q or Ĵ reports (the policy is untouched)."""
        return {}

    def fit_critics(self, results: list[dict]) -> dict:
        """Minibatch regression of V(s, t) on TD(λ) targets of the window just rolled."""
        trajs = [r["traj"] for r in results]
        t0, dev, p = trajs[0]["t0"], self.device, self.p
        obs = torch.cat([t["obs"] for t in trajs], 1).to(dev)  # [h+1, N, d]
        with torch.no_grad():
            z = self.policy.normalised(obs)
        h, n = obs.shape[0] - 1, obs.shape[1]
        data = []
        for critic, key in zip(self.bootstrap, ("reward", "cost")):
            signal = torch.cat([t[key] for t in trajs], 1).to(dev)
            data.append(td_lambda_targets(critic, z, signal, t0, self.env.max_episode_steps, p.td_lambda, p.gamma))
        times = torch.arange(t0, t0 + h, device=dev, dtype=z.dtype)[:, None].expand(h, n).reshape(-1)
        z, targets = z[:-1].reshape(h * n, -1), [d.reshape(-1) for d in data]
        for group in self.critic_opt.param_groups:
            group["lr"] = self.critic_lr()
        self.critic_fits += 1
        losses = []
        for _ in range(p.critic_iterations):
            for idx in torch.randperm(h * n, device=dev).split(p.critic_minibatch):
                loss = sum(((c(z[idx], times[idx]) - tgt[idx]) ** 2).mean() for c, tgt in zip(self.critics, targets))
                self.descend(self.critic_opt, loss, self.critics.parameters(),  # NaN: skipped, counted
                             p.critic_max_grad_norm)
                losses.append(loss.item())
        if self.targets is not None:
            polyak(self.targets, self.critics, 1.0 - p.target_critic_alpha)
        return {"critic_loss": float(np.mean(losses)), "critic_lr": self.critic_opt.param_groups[0]["lr"]}

    def critic_lr(self) -> float:
        """critic_lr, or its linear decay to critic_lr_end over critic_lr_decay_fits fits."""
        p = self.p
        if p.critic_lr_end is None:
            return p.critic_lr
        frac = min(1.0, self.critic_fits / p.critic_lr_decay_fits)
        return p.critic_lr + frac * (p.critic_lr_end - p.critic_lr)

    def policy_step(self, est: dict) -> dict:
        raise NotImplementedError  # abstract

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_j_c": self.last_j_c, "critic_fits": self.critic_fits}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.last_j_c, self.critic_fits = sd["last_j_c"], sd.get("critic_fits", 0)
