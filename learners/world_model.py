"""World model for MB-CGPO (CGPO paper, Appendix F.4.2, eq 85).

F_φ(s_t, a_t) -> (s_{t+1}, r_t, c_t), an MLP trained on real transitions with

    L = ‖F_s(s_t, a_t) − s_{t+1}‖² + (F_r(s_t, a_t) − r_t)² + (F_c(s_t, a_t) − c_t)²        (eq 85)

and then rolled like a differentiable simulator (``WorldModelEnv``), so analytic gradients come
from model trajectories exactly as from a differentiable env.

Choices not fixed by the paper: inputs are standardised with statistics frozen at each fit, the
state head predicts s_{t+1} − s_t (the same function class, better conditioned), and each
output is scaled by its standard deviation in the loss (so eq 85's terms weigh alike).
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from saferl.envs.diff import DiffEnv
from saferl.learners.base import guarded_step
from saferl.learners.networks import mlp


class WorldModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, gt=0)
    fit_steps: int = Field(200, gt=0, description="minibatch steps per world_model phase")
    capacity: int = Field(200_000, gt=0, description="most recent real transitions kept")


class WorldModel(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int]):
        super().__init__()
        self.obs_dim = obs_dim
        self.net = mlp([obs_dim + act_dim, *hidden, obs_dim + 2], activation=nn.SiLU)
        for name, dim in (("in", obs_dim + act_dim), ("out", obs_dim + 2)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))

    def forward(self, obs: torch.Tensor, act: torch.Tensor):
        x = (torch.cat([obs, act], -1) - self.in_mean) / self.in_std
        y = self.net(x) * self.out_std + self.out_mean
        return obs + y[..., :self.obs_dim], y[..., self.obs_dim], y[..., self.obs_dim + 1]

    def loss(self, obs, act, next_obs, reward, cost) -> torch.Tensor:
        """eq 85 on standardised targets."""
        x = (torch.cat([obs, act], -1) - self.in_mean) / self.in_std
        target = torch.cat([next_obs - obs, reward[:, None], cost[:, None]], -1)
        return (((self.net(x) - (target - self.out_mean) / self.out_std)) ** 2).sum(-1).mean()

    @torch.no_grad()
    def set_statistics(self, obs, act, next_obs, reward, cost) -> None:
        """Freeze the standardisation at the data's moments (kept as they were if any is NaN/Inf)."""
        x = torch.cat([obs, act], -1)
        y = torch.cat([next_obs - obs, reward[:, None], cost[:, None]], -1)
        stats = (x.mean(0), x.std(0).clamp_min(1e-6), y.mean(0), y.std(0).clamp_min(1e-6))
        if not all(bool(torch.isfinite(s).all()) for s in stats):
            return
        for buf, s in zip((self.in_mean, self.in_std, self.out_mean, self.out_std), stats):
            buf.copy_(s)


class WorldModelEnv(DiffEnv):
    """A trained world model behind the differentiable task protocol (state = observation)."""

    def __init__(self, model: WorldModel, act_dim: int, max_episode_steps: int):
        self.model, self.act_dim, self.max_episode_steps = model, act_dim, max_episode_steps
        self.obs_dim = model.obs_dim

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def step(self, state: torch.Tensor, action: torch.Tensor):
        return self.model(state, action)


class ReplayFit:
    """Bounded store of real transitions and the eq 85 fit (used by the world-model actor)."""

    KEYS = ("obs", "act", "next_obs", "reward", "cost")

    def __init__(self, obs_dim: int, act_dim: int, p: WorldModelParams, device: torch.device, seed: int):
        self.p, self.device = p, device
        self.model = WorldModel(obs_dim, act_dim, p.hidden).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=p.lr)
        self.data: dict[str, np.ndarray] = {}
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.dropped = 0  # transitions refused by ``add`` for a NaN/Inf value (since the last fit)
        self.skipped_updates = 0  # fit steps refused for a NaN/Inf loss or gradient (since the last fit)

    def add(self, batch: dict) -> int:
        """Append a batch of transitions; rows with a NaN/Inf value are dropped (and counted): one
        would poison the frozen statistics and so every later fit step."""
        arrays = {k: np.asarray(batch[k], np.float32) for k in self.KEYS}
        n = len(arrays["obs"])
        ok = np.ones(n, bool)
        for arr in arrays.values():
            ok &= np.isfinite(arr.reshape(n, -1)).all(1)
        self.dropped += int(n - ok.sum())
        for k, arr in arrays.items():
            arr = arr[ok]
            self.data[k] = arr if k not in self.data else np.concatenate([self.data[k], arr])[-self.p.capacity:]
        return len(self.data["obs"])

    def fit(self) -> dict:
        """The eq 85 fit; each step guarded as the learners' ``descend`` (a NaN/Inf loss or gradient
        is skipped, the model untouched) and counted in ``world_model/skipped_updates``."""
        dropped, self.dropped = self.dropped, 0
        n = len(self.data.get("obs", ()))
        if n == 0:  # nothing (finite) to fit yet
            return {"world_model/transitions": 0, "world_model/dropped_transitions": dropped,
                    "world_model/skipped_updates": 0}
        tensors = [torch.tensor(self.data[k], device=self.device) for k in self.KEYS]
        self.model.set_statistics(*tensors)
        losses, skipped = [], 0
        for _ in range(self.p.fit_steps):
            idx = torch.randint(n, (min(self.p.batch_size, n),), generator=self.gen).to(self.device)
            loss = self.model.loss(*(t[idx] for t in tensors))
            self.opt.zero_grad()
            if bool(torch.isfinite(loss)):
                loss.backward()
                skipped += not guarded_step(self.opt, self.model.parameters())
            else:
                skipped += 1
            losses.append(loss.item())
        self.skipped_updates += skipped
        return {"world_model/loss": float(np.mean(losses[-10:])), "world_model/transitions": n,
                "world_model/dropped_transitions": dropped, "world_model/skipped_updates": skipped}
