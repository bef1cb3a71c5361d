"""The off-policy family's base (SAC-Lag, TD3-Lag, DDPG-Lag, CVPO, FAC): the replay and
update-to-data parameters, the twin Q critics with their targets, and the learner that draws the
replay actor's minibatches and steps them (the coordinator owns the schedule: ``offpolicy_setup``)."""
from __future__ import annotations

import copy

import numpy as np
import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.lagrange import LagrangianLearner
from saferl.learners.networks import ACTIVATIONS, init_field, mlp
from saferl.metric_keys import LAGRANGE_MULTIPLIER, SKIPPED_UPDATES


class OffPolicyParams(base.Params):
    """What every off-policy learner shares: the buffer and the update-to-data schedule."""
    buffer_capacity: int = Field(1_000_000, gt=0, description="transitions kept (ring buffer)")
    n_step: int = Field(1, gt=0)
    batch_size: int = Field(256, gt=0)
    utd: float = Field(1.0, gt=0, description="gradient updates per env step (update-to-data ratio)")
    warmup_steps: int = Field(5_000, ge=0, description="env steps with uniform actions before learning")
    gamma: float = Field(0.99, gt=0, le=1)
    init: str = init_field()
    replay_in_checkpoint: bool = Field(True, description="checkpoint the buffer (exact resume; "
                                       "costs capacity × transition size on disk)")


def cost_normalize_field():
    """The ``cost_normalize`` entry of a Lagrangian off-policy learner's params (``replay.CostNormaliser``).
    Not for learners whose constraint is on Q_C itself (CVPO, FAC), which need costs in their units."""
    return Field(False, description="the critics learn from costs normalised per env step as OmniSafe's "
                 "CostNormalize (running mean/std, clip 5); the multiplier still reads raw episode costs")


class Critic(torch.nn.Module):
    """``n`` Q-networks Q(s, a) evaluated together: [n, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], n: int, activation: str = "relu",
                 init: str = "orthogonal"):
        super().__init__()
        self.qs = torch.nn.ModuleList(mlp([obs_dim + act_dim, *hidden, 1], activation=ACTIVATIONS[activation],
                                          init=init)
                                      for _ in range(n))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1)
        return torch.stack([q(x).squeeze(-1) for q in self.qs])


class OffPolicyLearner(base.Learner):
    """What SAC-Lag and TD3/DDPG-Lag share: the coordinator's setup, the minibatch loop over
    ``step``, clipped gradient steps, the count of gradient steps a multiplier's
    ``per_gradient_step`` reads, and checkpoints of ``MODULES``. Subclasses set ``policy`` and
    ``MODULES`` and define ``step``; those with a multiplier λ also derive from
    ``lagrange.LagrangianLearner``, which owns λ's dual phase and state."""

    COUNTS_GRADIENT_STEPS = True  # into a LagrangianLearner's dual_steps_due (per_gradient_step)

    def offpolicy_setup(self) -> dict:
        p = self.p
        return {"capacity": p.buffer_capacity, "n_step": p.n_step, "gamma": p.gamma, "batch_size": p.batch_size,
                "utd": p.utd, "warmup_steps": p.warmup_steps, "replay_in_checkpoint": p.replay_in_checkpoint,
                "cost_normalize": getattr(p, "cost_normalize", False)}  # the Lagrangian learners' option

    def policy_state(self) -> dict:
        return self.policy.export_numpy()

    def update(self, batches: list[dict], clock: dict | None = None) -> dict:
        """One gradient step per minibatch of each sampled block [K, B, ...]. With a ``clock``
        (``first_step``, ``every``: the coordinator's step phases), ``step`` also gets the set of
        step phases due at each minibatch's global gradient step g (those with g % every == 0)."""
        stats: dict[str, list] = {}
        skipped = self.skipped_updates
        g = clock["first_step"] if clock else None
        if isinstance(self, LagrangianLearner):
            self.dual_steps_due += sum(int(b["obs"].shape[0]) for b in batches)
        for block in batches:
            # a copy: Ray's arrays are read-only
            data = {k: torch.tensor(v, device=self.device) for k, v in block.items()}
            for i in range(data["obs"].shape[0]):
                b = {k: v[i] for k, v in data.items()}
                if clock is None:
                    out = self.step(b)
                else:
                    out = self.step(b, {name for name, every in clock["every"].items() if g % every == 0})
                    g += 1
                for k, v in out.items():
                    stats.setdefault(k, []).append(v)
        return {**{k: float(np.mean(v)) for k, v in stats.items()}, **self.dual_metrics(),
                SKIPPED_UPDATES: self.skipped_updates - skipped}

    def dual_metrics(self) -> dict:
        return {LAGRANGE_MULTIPLIER: self.multiplier.value}

    def build_critics(self, n_reward: int, activation: str = "relu", lr: float | None = None) -> None:
        """``n_reward`` reward Q-networks and one cost Q-network, their targets, one Adam over both."""
        d, a, p = self.env.obs_dim, self.env.act_dim, self.p
        self.q_r = Critic(d, a, p.hidden, n_reward, activation, p.init).to(self.device)
        self.q_c = Critic(d, a, p.hidden, 1, activation, p.init).to(self.device)
        self.q_r_target, self.q_c_target = copy.deepcopy(self.q_r), copy.deepcopy(self.q_c)
        self.q_opt = torch.optim.Adam([*self.q_r.parameters(), *self.q_c.parameters()],
                                      lr=p.critic_lr if lr is None else lr)

    def critic_step(self, b: dict, a2: torch.Tensor, bonus: torch.Tensor | float = 0.0,
                    y_c: torch.Tensor | None = None) -> float:
        """One step on L_Q = Σ_j E (Q_Rj(s, a) − y_R)² + E (Q_C(s, a) − y_C)², a = tanh(u), with
        y_R = r + discount · (min_j Q̄_Rj(s', a') + bonus) and y_C = c + discount · Q̄_C(s', a')
        (or the given one-step target ``y_c``)."""
        act = torch.tanh(b["act"])
        with torch.no_grad():
            y_r = b["reward"] + b["discount"] * (self.q_r_target(b["next_obs"], a2).min(0).values + bonus)
            if y_c is None:
                y_c = b["cost"] + b["discount"] * self.q_c_target(b["next_obs"], a2)[0]
        loss_q = ((self.q_r(b["obs"], act) - y_r) ** 2).mean(1).sum() + ((self.q_c(b["obs"], act)[0] - y_c) ** 2).mean()
        self._descend(self.q_opt, loss_q, [*self.q_r.parameters(), *self.q_c.parameters()])
        return loss_q.item()

    def step(self, b: dict) -> dict:
        raise NotImplementedError

    def _descend(self, opt, loss, params) -> None:
        self.descend(opt, loss, params, self.p.max_grad_norm)
