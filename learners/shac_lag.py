"""SHAC-Lag and SHAC (CGPO paper, Appendix F.1; SHAC: Xu et al. 2022).

g = ∇L_R and q = ∇L_C come from short windows of h steps with time-conditioned critic
bootstraps (eq 55-56, ``learners/analytic.py``), computed by the gradient workers. The
surrogate problem max_δ gᵀδ s.t. c + qᵀδ ≤ 0 (eq 75-76) is solved by the primal-dual iteration
of eq 77-78: an Adam step on θ along g − λq every update, and λ ← max(0, λ + η_λ(Ĵ_C − b)) on the
coordinator's ``dual`` schedule. After each policy step the critics V_R(s, t), V_C(s, t) are fitted
to finite-horizon TD(λ) targets (eq 66-68). SHAC is the same learner with λ ≡ 0.

Choices not fixed by the paper: Adam for the primal step (lr, betas, grad-norm clip in Params);
the dual step uses the current window estimate Ĵ_C = realised episode prefix + window costs +
V_C tail; no target critics by default (the CGPO paper's eq 68 uses the current critic). With
``target_critic_alpha`` = α (SHAC, Xu et al. 2022 §3.2; the SafeGBPO paper's per-task values), the
window bootstraps and the TD(λ) targets use target critics V̄ ← α V̄ + (1 − α) V after each fit;
with ``critic_lr_end`` the critic's Adam step size decays linearly (SHAC's schedule).

SHAC's own policy loss (Xu et al. 2022; the SafeGBPO reference code) is the window objective per
step, L = −1/(N h) Σ_i [Σ_t γ^t r + γ^h V]: with ``loss_per_step`` the policy step uses g/h and
q/h (h = the window's length, so an episode's shorter last window is normalised by its own
length) — the quantity clipped at ``max_grad_norm`` and reported as ``grad_norm``. Without it
(the default, the CGPO paper's L_R of eq 55) the window sum is used; Adam is nearly invariant to the
scale, the clip is not. (The reference's denominator also counts the bootstrap entries,
N(h + 1) for a window inside an episode: a factor h/(h + 1) from ours.) ``critic_betas``,
``critic_max_grad_norm`` (the reference clips the critic's gradients at the policy's bound) and
``activation`` (the policy's hidden activation; the reference's is ELU, followed by a LayerNorm
that is not reproduced here) let the SafeGBPO configs follow the reference's settings.
"""
from __future__ import annotations

import torch
from pydantic import Field

from saferl.learners import base
from saferl.learners.lagrange import LagrangeParams, LagrangianLearner
from saferl.learners.window_base import WindowLearner, WindowParams
from saferl.metric_keys import LAGRANGE_MULTIPLIER


class SHACLagParams(WindowParams):
    lr: float = Field(2e-3, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.7, 0.95)
    loss_per_step: bool = Field(False, description="policy step on g/h, q/h: SHAC's loss −1/(Nh) Σ (...), "
                                "not the window sum (module docstring)")
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(lr=0.05))


class SHACLag(LagrangianLearner, WindowLearner):
    Params = SHACLagParams
    MODULES = (*WindowLearner.MODULES, "opt")
    constrained = True

    def __init__(self, params: SHACLagParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=params.lr, betas=params.betas)
        self.init_multiplier(params.lagrange)

    def policy_step(self, est: dict) -> dict:
        """Adam along the ascent direction of L_R − λ L_C (per step: divided by h, ``loss_per_step``)."""
        lam = self.multiplier.value if self.constrained else 0.0
        scale = 1.0 / est["h"] if self.p.loss_per_step else 1.0
        direction = torch.as_tensor(scale * (est["g"] - lam * est["q"]), dtype=torch.float32, device=self.device)
        self.opt.zero_grad()
        i = 0
        for prm in self.policy.parameters():
            prm.grad = -direction[i:i + prm.numel()].view_as(prm).clone()
            i += prm.numel()
        grad_norm = direction.norm().item()  # ‖g − λq‖ (/h) before clipping (what clip_grad_norm_ returned)
        # NaN/Inf (e.g. λ q overflow): skipped
        self.step_grads(self.opt, self.policy.parameters(), self.p.max_grad_norm)
        return {"grad_norm": grad_norm, LAGRANGE_MULTIPLIER: lam}

    def skip_policy_step(self, est: dict) -> dict:
        return {"grad_norm": float("nan"), LAGRANGE_MULTIPLIER: self.multiplier.value if self.constrained else 0.0}

    def phase_dual(self, signals: dict) -> dict:
        if not self.constrained or self.last_j_c is None:
            return {}
        return {LAGRANGE_MULTIPLIER: self.multiplier.update(self.last_j_c, self.cost_limit)}



class SHAC(SHACLag):
    """Unconstrained SHAC: λ ≡ 0 (no dual phase)."""
    constrained = False
