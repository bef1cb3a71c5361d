"""BPTT-Lag (CGPO paper, Appendix F.1, eq 75-80).

The surrogate problem (eq 75-76) at θ_k, with g = ∇J_R(θ_k), q = ∇J_C(θ_k), c = J_C(θ_k) − b:

    max_δ gᵀδ   s.t.   c + qᵀδ ≤ 0

solved by the primal-dual iteration of eq 77-78 on L(δ, λ) = −gᵀδ + λ(c + qᵀδ): an Adam step on θ
along g − λq every update, and λ ← max(0, λ + η_λ c) on the coordinator's ``dual`` schedule.
g and q are the BPTT gradients of whole episodes (eq 79-80):

    L_R(θ) = 1/N Σ_i Σ_{t<T} r(s_t^i, a_t^i),     L_C(θ) = 1/N Σ_i Σ_{t<T} c(s_t^i, a_t^i)

This is SHAC-Lag (``learners/shac_lag.py``) with the window equal to the episode and no critics.
Choices not fixed by the paper: Adam for the primal step and its lr; the dual step size.
"""
from __future__ import annotations

from pydantic import Field

from saferl.learners.lagrange import LagrangeParams
from saferl.learners.shac_lag import SHACLag, SHACLagParams


class BPTTLagParams(SHACLagParams):
    critic_hidden: list[int] | None = None
    horizon: int | None = Field(None, gt=0, description="None = the whole episode (T)")
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(lr=0.05))


class BPTTLag(SHACLag):
    Params = BPTTLagParams
