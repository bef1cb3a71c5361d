"""Lagrange multipliers for  max J_R  s.t.  J_C ≤ b, the one place they are implemented.

``Lagrange``: projected gradient ascent on the dual, λ ← max(0, λ + η (J_C − b)).
``PIDLagrange``: Stooke, Achiam & Abbeel 2020 (Responsive Safety in RL by PID Lagrangian
Methods), Algorithm 2: λ = max(0, K_P e + K_I Σe + K_D max(0, Ĵ_C − Ĵ_C,prev)) with e = J_C − b,
the integral projected to ≥ 0 and the cost smoothed by EMAs.
Both are called by the coordinator's ``dual`` schedule phase, never by a learner's inner loop.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LagrangeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field("lagrange", pattern="^(lagrange|pid)$")
    init: float = Field(0.0, ge=0)
    lr: float = Field(0.035, gt=0, description="dual step size (lagrange)")
    kp: float = Field(0.1, ge=0)
    ki: float = Field(0.01, ge=0)
    kd: float = Field(0.01, ge=0)
    d_delay_ema: float = Field(0.9, ge=0, lt=1, description="EMA of J_C for the derivative term")
    upper: float = Field(1e3, gt=0, description="cap on λ")


class Lagrange:
    def __init__(self, p: LagrangeParams):
        self.p, self.value = p, p.init

    def update(self, cost: float, limit: float) -> float:
        self.value = min(max(0.0, self.value + self.p.lr * (cost - limit)), self.p.upper)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, sd: dict) -> None:
        self.value = sd["value"]


class PIDLagrange(Lagrange):
    def __init__(self, p: LagrangeParams):
        super().__init__(p)
        self.integral, self.prev_cost = p.init / p.ki if p.ki > 0 else 0.0, None

    def update(self, cost: float, limit: float) -> float:
        p = self.p
        error = cost - limit
        self.integral = max(0.0, self.integral + error)
        prev = cost if self.prev_cost is None else self.prev_cost
        derivative = max(0.0, cost - prev)
        self.prev_cost = p.d_delay_ema * prev + (1 - p.d_delay_ema) * cost
        self.value = min(max(0.0, p.kp * error + p.ki * self.integral + p.kd * derivative), p.upper)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "integral": self.integral, "prev_cost": self.prev_cost}

    def load_state_dict(self, sd: dict) -> None:
        self.value, self.integral, self.prev_cost = sd["value"], sd["integral"], sd["prev_cost"]


def make_multiplier(p: LagrangeParams) -> Lagrange:
    return PIDLagrange(p) if p.kind == "pid" else Lagrange(p)
