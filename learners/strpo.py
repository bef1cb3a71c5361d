"""sTRPO: Safe Trust Region Policy Optimization (seed 001), both stages.

**Stage 1, ``UnsafeTRPO``** (§4.1). An auxiliary policy π_unsafe is trained with TRPO to
*maximise* the cost (eq 3),

    φ_{k+1} = argmax_φ Ê[π_φ(a|s)/π_φold(a|s) · A^c_t]   s.t.  D̄_KL(φ_old, φ) ≤ δ,

where A^c is the GAE of the TD residual with a CVaR value (eq 4),
ξ_t = c_t + γ V_CVaR_α(s_{t+1}) − V_CVaR_α(s_t), from a quantile cost critic
(``learners/quantile.py``). ``distributional: false`` uses the plain expected-value cost critic
(the paper's "TRPO vs DTRPO" ablation). The run's last checkpoint is then π_unsafe, kept fixed.

**Stage 2, ``STRPO``** (§4.2-4.3). Per update, with reward and cost GAE from separate critics:

    Ã = z(Â_r) − λ z(Â_c)                                                 (eq 6)
    g = ∇_θ E[ρ Ã],   H = ∇² D̄_KL(π_k ‖ π_θ),   φ = E_{π_k}[−(π_unsafe/π_k) ∇_θ log π_θ]   (eq 7)
    max_s gᵀs   s.t.  ½ sᵀHs ≤ δ1,   φᵀs ≥ δ2                            (eq 8)
    G = H⁻¹(g + λ2 φ),   α = √(2δ1 / GᵀHG),   θ_{k+1} = θ_k + αG          (eq 9)

λ is the PID multiplier (``learners/lagrange.py``, Stooke et al. 2020) stepped on the mean
episode cost by the coordinator's ``dual`` phase. φ estimates ∇_θ D̄_KL(π_unsafe ‖ π_θ) at θ_k
(eq 7 by importance weights; ``exclusion_gradient: analytic`` differentiates the Gaussian KL
exactly). The step is ``exclusion_step``: with x_g = H⁻¹g, x_φ = H⁻¹φ (conjugate gradient), the
exclusion of the full step αG is φᵀαG = √(2δ1)(r + λ2 s)/√(q + 2λ2 r + λ2² s) (q = gᵀx_g,
r = φᵀx_g, s = φᵀx_φ), increasing in λ2 towards its supremum √(2δ1 s). When λ2 is too small,
"(optionally) adjust λ2" is done exactly: the least λ2 with φᵀαG = δ2 is

    λ2* = (−r + κ √((sq − r²)/(s − κ²))) / s,   κ = δ2 / √(2δ1),

and with λ2 = max(λ2_config, λ2*) the step is eq 8's KKT solution when λ2_config = 0. A
backtracking line search then accepts the first fraction with sampled D̄_KL ≤ δ1(1 + tol),
an improved surrogate and φᵀ(fαG) ≥ δ2. If no λ2 makes eq 8 feasible (δ2 ≥ √(2δ1 s)) or no
fraction passes, the reverse step θ_k − αG (eq 10) is line-searched on the KL alone; if that
fails too, θ stays at θ_k. So an accepted step either satisfies both constraints of eq 8 or is
the fallback — never neither.

Choices the paper leaves open, each a config value: the PID gains (OmniSafe's CPPO-PID defaults
Kp 0.1, Ki 0.01, Kd 0.01), CVaR α = 0.25 of 32 quantiles, the quantile Huber κ = 1, the
stage-1 budget ``unsafe_steps``, and TRPO's line-search constants (OmniSafe's). Ablations:
``joint_advantage: false`` uses z(Â_r) alone; ``exclusion: false`` drops φ (λ2 = 0, no
exclusion constraint: TRPO on the joint advantage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from saferl.learners import base
from saferl.learners.lagrange import LagrangeParams
from saferl.learners.networks import GaussianPolicy, flat_grad
from saferl.learners.ppo_lag import flat, standardise
from saferl.learners.quantile import CVaRValue, QuantileCritic, quantile_huber_loss, return_atoms
from saferl.learners.trpo_lag import (TRPOLag, TRPOLagParams, TrustRegionLearner, TrustRegionParams,
                                      natural_gradient_step)
from saferl.learners.trust_region import SearchResult, backtracking_line_search, conjugate_gradient, mean_kl

# -- stage 1 ----------------------------------------------------------------------------------------


class UnsafeTRPOParams(TrustRegionParams):
    distributional: bool = Field(True, description="CVaR value from a quantile cost critic (eq 4); "
                                 "false: the expected-value critic (the TRPO-vs-DTRPO ablation)")
    n_quantiles: int = Field(32, gt=1, description="quantiles of the cost-return distribution (paper: open)")
    cvar_alpha: float = Field(0.25, gt=0, le=1, description="CVaR tail mass (upper tail of the cost; paper: open)")
    huber_kappa: float = Field(1.0, gt=0, description="κ of the quantile Huber loss")


class UnsafeTRPO(TrustRegionLearner):
    """Stage 1: TRPO ascending the cost advantage of eq 4 (module docstring)."""

    Params = UnsafeTRPOParams

    def __init__(self, params: UnsafeTRPOParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        if params.distributional:
            self.q_c = QuantileCritic(env.obs_dim, params.hidden, params.n_quantiles).to(device)
            self.v_c = CVaRValue(self.q_c, params.cvar_alpha)
            self.v_opt = torch.optim.Adam([*self.v_r.parameters(), *self.q_c.parameters()], lr=params.critic_lr)

    def prepare(self, batches: list[dict]) -> dict:
        prep = super().prepare(batches)  # adv_c: GAE of ξ_t with V = CVaR_α (eq 4)
        if self.p.distributional:  # the quantile critic's targets replace the scalar ones
            atoms = return_atoms(self.q_c, self.policy.normalised, prep["batch"], "cost", self.p.cost_gamma)
            prep["ret_c"] = flat(prep["batch"], atoms)
        return prep

    def critic_step(self, z: torch.Tensor, ret_r: torch.Tensor, ret_c: torch.Tensor) -> float:
        if not self.p.distributional:
            return super().critic_step(z, ret_r, ret_c)
        loss = ((self.v_r(z).squeeze(-1) - ret_r) ** 2).mean() + \
            quantile_huber_loss(self.q_c(z), ret_c, self.q_c.taus, self.p.huber_kappa)
        self.descend(self.v_opt, loss, [p for group in self.v_opt.param_groups for p in group["params"]])
        return loss.item()

    def policy_step(self, prep: dict, batches: list[dict]) -> dict:
        out = natural_gradient_step(self.policy_at_k(prep), standardise(prep["adv_c"]), self.p)
        with torch.no_grad():
            out["cvar_cost_value"] = self.v_c(self.policy.normalised(prep["obs"])).mean().item()
        return out


# -- stage 2: the exclusion step ------------------------------------------------------------------


def least_lambda2(q: float, r: float, s: float, delta1: float, delta2: float) -> float | None:
    """The least λ2 with φᵀαG(λ2) = δ2 (module docstring); None when no λ2 reaches δ2."""
    kappa2 = delta2 ** 2 / (2 * delta1)
    if s <= kappa2 * (1 + 1e-9) or s <= 0:
        return None
    return (-r + math.sqrt(kappa2 * max(s * q - r * r, 0.0) / (s - kappa2))) / s


@dataclass
class ExclusionStep:
    step: torch.Tensor          # the full step αG (before the line search's fraction)
    lambda2: float
    feasible: bool              # eq 8 has a solution along G: φᵀαG ≥ δ2
    phi_step: float             # φᵀαG


def exclusion_step(fvp, g: torch.Tensor, phi: torch.Tensor | None, lambda2: float, delta1: float,
                   delta2: float, cg_iters: int, adapt_lambda2: bool = True) -> ExclusionStep | None:
    """G = H⁻¹(g + λ2 φ) and α = √(2δ1/GᵀHG) (eq 9), λ2 raised to λ2* when needed and allowed;
    ``phi`` None: the plain TRPO step (no exclusion). None when conjugate gradient failed."""
    cg_g = conjugate_gradient(fvp, g, cg_iters)
    if cg_g.failed:
        return None
    x_g, x_phi = cg_g.x, None
    if phi is not None:
        cg_phi = conjugate_gradient(fvp, phi, cg_iters)
        if cg_phi.failed:
            return None
        x_phi = cg_phi.x
        q, r, s = (g @ x_g).item(), (phi @ x_g).item(), (phi @ x_phi).item()
        if adapt_lambda2:
            least = least_lambda2(q, r, s, delta1, delta2)
            if least is not None and least > lambda2:
                lambda2 = least * (1 + 1e-6)  # a hair inside, against rounding
    direction = x_g if x_phi is None else x_g + lambda2 * x_phi
    ghg = (direction @ fvp(direction)).item()
    if not math.isfinite(ghg) or ghg <= 0:
        return None
    step = math.sqrt(2 * delta1 / ghg) * direction
    phi_step = (phi @ step).item() if phi is not None else math.inf
    return ExclusionStep(step, lambda2, phi_step >= delta2, phi_step)


# -- stage 2: the learner ---------------------------------------------------------------------------


class STRPOParams(TRPOLagParams):
    target_kl: float = Field(0.01, gt=0, description="δ1, the trust-region radius (paper default 1e-2)")
    delta2: float = Field(1e-4, ge=0, description="δ2, the least exclusion φᵀ(θ − θ_k) (paper default 1e-4)")
    lambda2: float = Field(0.01, ge=0, description="λ2, the weight of φ in G (paper: 0.01 or 1; at 1 the "
                           "exclusion dominated the z-scored reward gradient on FunctionEnv)")
    adapt_lambda2: bool = Field(True, description="raise λ2 to the least value meeting φᵀαG ≥ δ2")
    joint_advantage: bool = Field(True, description="eq 6; false: z(Â_r) alone (ablation)")
    exclusion: bool = Field(True, description="the unsafe-policy term; false: TRPO on Ã (ablation)")
    exclusion_gradient: Literal["importance", "analytic"] = Field(
        "importance", description="φ by eq 7's importance weights, or the exact ∇ of the Gaussian KL")
    fallback: Literal["reverse", "none"] = Field("reverse", description="eq 10's reverse step, or stay at θ_k")
    unsafe_policy: str | None = Field(
        None, description="stage-1 run directory (or checkpoint file) of a trpo_unsafe run; None: "
        "`saferl train` runs stage 1 first in RUN_DIR/unsafe_policy")
    unsafe_steps: int = Field(1_000_000, gt=0, description="stage-1 budget when unsafe_policy is None")
    lagrange: LagrangeParams = Field(default_factory=lambda: LagrangeParams(kind="pid", kp=0.1, ki=0.01, kd=0.01))

    @field_validator("unsafe_policy")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().exists():
            raise ValueError(f"path {v} does not exist")
        return v


def load_unsafe_policy(path: str, env: base.EnvSpec, device) -> GaussianPolicy:
    """π_unsafe from a trpo_unsafe run directory (its newest checkpoint) or checkpoint file."""
    from saferl.cluster.rundir import checkpoints  # the one place checkpoint files are listed
    from saferl.config import ConfigError

    p = Path(path).expanduser()
    files = checkpoints(p) if p.is_dir() else [p]
    if not files:
        raise ConfigError(f"config error: algo_params.unsafe_policy: {path} has no checkpoint")
    ckpt = torch.load(files[-1], map_location="cpu", weights_only=False)
    if ckpt.get("algo") != "trpo_unsafe":
        raise ConfigError(f"config error: algo_params.unsafe_policy: {files[-1]} is a {ckpt.get('algo')!r} "
                          "run; sTRPO needs a trpo_unsafe run")
    up = UnsafeTRPOParams(**ckpt["config"]["algo_params"])
    policy = GaussianPolicy(env.obs_dim, env.act_dim, up.hidden, up.init_log_std, normalise_obs=up.normalise_obs)
    try:
        policy.load_state_dict(ckpt["learner"]["policy"])
    except RuntimeError:
        raise ConfigError(f"config error: algo_params.unsafe_policy: {files[-1]} was trained on "
                          f"{ckpt.get('task')!r}, whose shapes differ from this task's") from None
    return policy.to(device).requires_grad_(False)


class STRPO(TRPOLag):
    """Stage 2 (module docstring); TRPO-Lag's PID/Lagrange ``dual`` phase and checkpointing."""

    Params = STRPOParams

    def __init__(self, params: STRPOParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.unsafe = None
        if params.exclusion:
            if params.unsafe_policy is None:
                from saferl.config import ConfigError
                raise ConfigError("config error: algo_params.unsafe_policy: sTRPO needs a stage-1 policy "
                                  "(saferl train runs stage 1 itself when it is unset)")
            self.unsafe = load_unsafe_policy(params.unsafe_policy, env, device)

    def joint_advantage(self, adv_r: torch.Tensor, adv_c: torch.Tensor) -> torch.Tensor:
        """Eq 6: z(Â_r) − λ z(Â_c), or z(Â_r) in the ablation."""
        adv = standardise(adv_r)
        return adv - self.multiplier.value * standardise(adv_c) if self.p.joint_advantage else adv

    def exclusion_gradient(self, k) -> torch.Tensor:
        """φ of eq 7 at θ_k: ∇_θ of Ê[−w log π_θ(a|s)], w = π_unsafe(a|s)/π_k(a|s) fixed; or the
        exact ∇_θ D̄_KL(π_unsafe ‖ π_θ) of the Gaussians."""
        with torch.no_grad():
            unsafe = self.unsafe.dist(k.obs)
        if self.p.exclusion_gradient == "analytic":
            return flat_grad(mean_kl(unsafe, self.policy.dist(k.obs)), k.params)
        with torch.no_grad():
            w = torch.exp(unsafe.log_prob(k.act).sum(-1) - k.logp)
        return flat_grad(-(w * self.policy.log_prob(k.obs, k.act)).mean(), k.params)

    def unsafe_kl(self, k) -> float:
        with torch.no_grad():
            return mean_kl(self.unsafe.dist(k.obs), self.policy.dist(k.obs)).item()

    def policy_step(self, prep: dict, batches: list[dict]) -> dict:
        p = self.p
        adv = self.joint_advantage(prep["adv_r"], prep["adv_c"])
        k = self.policy_at_k(prep)
        g = k.gradient(adv)
        phi = self.exclusion_gradient(k) if self.unsafe is not None else None
        stats = {"lagrange_multiplier": self.multiplier.value}
        if phi is not None:
            stats.update(phi_norm=phi.norm().item(), unsafe_kl_before=self.unsafe_kl(k))
            if not torch.isfinite(phi).all():  # importance weights overflowed: no exclusion this step
                phi = None
                stats["phi_nonfinite"] = 1.0
        loss_before = k.measure(adv)[0]
        ex = exclusion_step(k.fvp, g, phi, p.lambda2, p.target_kl, p.delta2, p.cg_iters, p.adapt_lambda2)
        case, res, step = "none", SearchResult(False, 0.0, 0, loss_before, 0.0, None), torch.zeros_like(g)
        if ex is not None:
            step = ex.step
            if ex.feasible:
                res = self.search(k, ex.step, adv, loss_before, phi, ex.lambda2 if phi is not None else 0.0,
                                  require_improvement=True)
                case = "step" if res.accepted else case
            if not res.accepted and p.fallback == "reverse":  # eq 10
                step = -ex.step
                res = self.search(k, step, adv, loss_before, None, 0.0, require_improvement=False)
                case = "reverse" if res.accepted else "none"
            stats.update(lambda2=ex.lambda2 if phi is not None else 0.0, phi_step=ex.phi_step if phi is not None else 0.0,
                         exclusion_feasible=float(ex.feasible))
        k.move(step, res.fraction)
        loss, kl, _ = k.measure(adv)
        stats.update({"strpo/case": {"step": 0, "reverse": 1, "none": 2}[case], "loss_pi": loss,
                      "loss_pi_before": loss_before, "kl": kl, "step_fraction": res.fraction,
                      "search_tries": res.tries, "step_norm": (res.fraction * step).norm().item()})
        if self.unsafe is not None:
            stats["unsafe_kl"] = self.unsafe_kl(k)
        return stats

    def search(self, k, step, adv, loss_before: float, phi: torch.Tensor | None, lambda2: float,
               require_improvement: bool):
        """Backtracking on ``step``: sampled KL ≤ δ1(1 + tol), the penalised surrogate
        E[ρÃ] + λ2 φᵀ(θ − θ_k) that G ascends improved (if required) and, with ``phi``, the
        exclusion φᵀ(f·step) ≥ δ2 (as a 'cost' −φᵀ(f·step) ≤ −δ2)."""
        p = self.p
        phi_step = (phi @ step).item() if phi is not None else 0.0

        def evaluate(fraction: float):
            k.move(step, fraction)
            loss, kl, _ = k.measure(adv)
            return loss - lambda2 * fraction * phi_step, kl, -fraction * phi_step

        return backtracking_line_search(
            evaluate, loss_before, p.target_kl, kl_tolerance=p.kl_tolerance,
            backtrack_coef=p.backtrack_coef, max_tries=p.max_backtracks, require_improvement=require_improvement,
            cost_before=0.0, max_cost_increase=-p.delta2 if phi is not None else None)
