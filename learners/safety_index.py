"""The parameterised safety index of the FAC-SIS paper (eq 11), on the geometry tail of the
observation (``envs/point_hazard.py``: robot position p and planar velocity v, then per hazard
its position h and radius d_min):

    φ(s) = max_hazards [ σ + d_min^n − d^n − k ḋ ],   d = ‖h − p‖,   ḋ = −v · (h − p) / d

and the safe-action constraint of eq 1-2, Δφ(s, s') = φ(s') − max(φ(s) − η_D, 0) ≤ 0.
Presets (Table 2; η_D = 0): φ0 = (σ 0, k 0, n 1), the raw constraint d_min − d; φ_h = (0.3, 1, 2),
hand-crafted; φ_F = (0.04, 1, 2), from the synthesis rules of Zhao et al. 2021.

After each learning step ζ is projected onto a box. The paper does not bound ζ; the authors'
reference code clips σ to [0, 1], k to [0.5, 3] and n to [0.1, 2], and those are the defaults
(``sigma_range``, ``k_range``, ``n_range``). Without the lower bound on k and the upper bound on n
the loss of eq 4 has a trivial descent direction on data whose violations no index can remove
(k → 0 with n growing flattens φ near the hazard, shrinking every Δφ), which is not the
synthesised index of Table 2 (σ 0.096, k 0.78, n 1.149, inside the box). A fixed index (FAC) is
never projected, so φ0's k = 0 stays as given.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from saferl.envs.point_hazard import geometry_dim

PRESETS = {"zero": (0.0, 0.0, 1.0), "handcrafted": (0.3, 1.0, 2.0), "feasible": (0.04, 1.0, 2.0)}
MIN_N = 0.1  # the exponent is kept positive (a projection after each step)
REFERENCE_BOX = {"sigma": (0.0, 1.0), "k": (0.5, 3.0), "n": (MIN_N, 2.0)}  # the authors' reference code


class IndexParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: str | None = Field("handcrafted", pattern="^(zero|handcrafted|feasible)$",
                               description="start from φ0 / φ_h / φ_F (Table 2); None: sigma, k, n below")
    sigma: float = Field(0.3, ge=0)
    k: float = Field(1.0, ge=0)
    n: float = Field(2.0, ge=MIN_N)
    eta_d: float = Field(0.0, ge=0, description="η_D, the least decrease of φ outside the safe set (eq 1)")
    sigma_range: tuple[float, float] = Field(REFERENCE_BOX["sigma"], description="σ's projection box after a step")
    k_range: tuple[float, float] = Field(REFERENCE_BOX["k"], description="k's projection box after a step")
    n_range: tuple[float, float] = Field(REFERENCE_BOX["n"], description="n's projection box after a step")

    @model_validator(mode="after")
    def _boxes(self) -> IndexParams:
        for name in ("sigma_range", "k_range", "n_range"):
            lo, hi = getattr(self, name)
            floor = MIN_N if name == "n_range" else 0.0
            if not floor <= lo <= hi:
                raise ValueError(f"{name}: need {floor} ≤ low ≤ high (got {[lo, hi]})")
        return self

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
        self.box = {"sigma": p.sigma_range, "k": p.k_range, "n": p.n_range}

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
        for name, (lo, hi) in self.box.items():
            getattr(self, name).clamp_(min=lo, max=hi)

    def values(self) -> dict:
        return {"sigma": self.sigma.item(), "k": self.k.item(), "n": self.n.item()}
