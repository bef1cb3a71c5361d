"""The parameterised safety index of seed 004 (FAC-SIS), eq 11, on the geometry tail of the
observation (``envs/point_hazard.py``: robot position p and planar velocity v, then per hazard
its position h and radius d_min):

    φ(s) = max_hazards [ σ + d_min^n − d^n − k ḋ ],   d = ‖h − p‖,   ḋ = −v · (h − p) / d

and the safe-action constraint of eq 1-2, Δφ(s, s') = φ(s') − max(φ(s) − η_D, 0) ≤ 0.
Presets (Table 2; η_D = 0): φ0 = (σ 0, k 0, n 1), the raw constraint d_min − d; φ_h = (0.3, 1, 2),
hand-crafted; φ_F = (0.04, 1, 2), from the synthesis rules of Zhao et al. 2021.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from saferl.envs.point_hazard import geometry_dim

PRESETS = {"zero": (0.0, 0.0, 1.0), "handcrafted": (0.3, 1.0, 2.0), "feasible": (0.04, 1.0, 2.0)}
MIN_N = 0.1  # the exponent is kept positive (a projection after each step)


class IndexParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: str | None = Field("handcrafted", pattern="^(zero|handcrafted|feasible)$",
                               description="start from φ0 / φ_h / φ_F (Table 2); None: sigma, k, n below")
    sigma: float = Field(0.3, ge=0)
    k: float = Field(1.0, ge=0)
    n: float = Field(2.0, ge=MIN_N)
    eta_d: float = Field(0.0, ge=0, description="η_D, the least decrease of φ outside the safe set (eq 1)")

    def values(self) -> tuple[float, float, float]:
        return PRESETS[self.preset] if self.preset else (self.sigma, self.k, self.n)


def split_geometry(obs: torch.Tensor, n_hazards: int):
    """(p [B, 2], v [B, 2], hazard positions [B, H, 2], radii [B, H]) from the observation's tail."""
    g = obs[..., obs.shape[-1] - geometry_dim(n_hazards):]
    hz = g[..., 4:].reshape(*g.shape[:-1], n_hazards, 3)
    return g[..., 0:2], g[..., 2:4], hz[..., :2], hz[..., 2]


class SafetyIndex(nn.Module):
    """ζ = (σ, k, n) as parameters; ``phi`` and ``delta`` are differentiable in ζ."""

    def __init__(self, p: IndexParams, n_hazards: int):
        super().__init__()
        sigma, k, n = p.values()
        self.sigma, self.k, self.n = (nn.Parameter(torch.tensor(float(x))) for x in (sigma, k, n))
        self.eta_d, self.n_hazards = p.eta_d, n_hazards

    def phi(self, obs: torch.Tensor) -> torch.Tensor:
        pos, vel, hazards, d_min = split_geometry(obs, self.n_hazards)
        diff = hazards - pos.unsqueeze(-2)
        d = diff.norm(dim=-1).clamp_min(1e-6)
        d_dot = -(vel.unsqueeze(-2) * diff).sum(-1) / d
        per_hazard = self.sigma + d_min ** self.n - d ** self.n - self.k * d_dot
        return per_hazard.max(-1).values

    def delta(self, obs: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """Δφ = φ(s') − max(φ(s) − η_D, 0): positive where the safe-action constraint is violated."""
        return self.phi(next_obs) - torch.relu(self.phi(obs) - self.eta_d)

    @torch.no_grad()
    def project(self) -> None:
        self.sigma.clamp_(min=0.0)
        self.k.clamp_(min=0.0)
        self.n.clamp_(min=MIN_N)

    def values(self) -> dict:
        return {"sigma": self.sigma.item(), "k": self.k.item(), "n": self.n.item()}
