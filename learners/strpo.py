"""sTRPO ("Safe, Trust Region Policy Optimization for Constrained RL"), both stages.

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
exactly). With x_g = H⁻¹g, x_φ = H⁻¹φ (conjugate gradient), the full step αG(λ2) excludes
φᵀαG = √(2δ1)(r + λ2 s)/√(q + 2λ2 r + λ2² s) (q = gᵀx_g, r = φᵀx_g, s = φᵀx_φ), increasing in λ2
towards its supremum √(2δ1 s); when λ2 is too small, "(optionally) adjust λ2" is done exactly:
the least λ2 with φᵀαG = δ2 is

    λ2* = (−r + κ √((sq − r²)/(s − κ²))) / s,   κ = δ2 / √(2δ1),

and with λ2 = max(λ2_config, λ2*) the step is eq 8's KKT solution when λ2_config = 0
(``exclusion_step``; the code finds λ2* by bisection on the same quantity with the Fisher-vector
products of x_g and x_φ, so it is exact for the CG solutions).

**The line search** ("backtracking line search on α and (optionally) adjust λ2 until the
exclusion constraint also holds"). φᵀ(f·αG) ≥ δ2 is linear in the step fraction f, so plain
backtracking on the full step at λ2* can never restore it: the candidate at fraction f is
f·αG(λ2_f), λ2_f the least λ2 ≥ λ2_config whose full step excludes δ2/f. It is accepted at the
first f with sampled D̄_KL ≤ δ1(1 + tol), the surrogate G ascends, E[ρÃ] + λ2_f φᵀ(θ − θ_k),
improved, and φᵀ(θ − θ_k) ≥ δ2 (``forward_search``). With ``adapt_lambda2: false`` λ2 stays at
its configured value (the paper's literal G) and only fractions still meeting δ2 are tried.

**The fallback** (eq 10, "when Eq. 8 is infeasible due to estimation noise, we apply a
conservative fallback (reverse step) followed by line search ... preserves the TRPO KL bound
while maintaining separation from unsafe regions"). Read as a safeguard, the reverse step
θ_k − f·αG is accepted only where it is conservative in all three respects the text names or
implies: sampled D̄_KL(π_k ‖ π_θ) ≤ δ1(1 + tol), the surrogate E[ρÃ] improved (it must not move
against the objective) and the sampled D̄_KL(π_unsafe ‖ π_θ) not below its value at θ_k
(``reverse_search``); otherwise θ stays at θ_k. To first order −αG cannot do both (with
r² ≤ qs, −gᵀG ≥ 0 and −φᵀG ≥ 0 force g ∥ φ), so the reverse step is taken only where the sampled
surrogate and separation disagree with the linear model, and the usual fallback is θ_k. Every
update therefore is one of: the forward step (both constraints of eq 8, the penalised surrogate
improved), the reverse step (KL bound, surrogate improved, separation kept) or θ_k — logged as
``strpo/case`` (0, 1, 2), the one-hot ``strpo/forward``, ``strpo/reverse``, ``strpo/kept`` and
their cumulative shares ``strpo/<case>_share`` (checkpointed). The fallback belongs to the
exclusion: without φ (``exclusion: false``, or a non-finite φ) the update is TRPO's, θ_k when
the search fails.

Choices the paper leaves open, each a config value: the PID gains (OmniSafe's CPPO-PID defaults
Kp 0.1, Ki 0.01, Kd 0.01), CVaR α = 0.25 of 32 quantiles, the quantile Huber κ = 1, the
stage-1 budget ``unsafe_steps``, and TRPO's line-search constants (OmniSafe's). Ablations:
``joint_advantage: false`` uses z(Â_r) alone; ``exclusion: false`` drops φ (λ2 = 0, no
exclusion constraint, no fallback: TRPO on the joint advantage); ``adapt_lambda2: false`` keeps
λ2 at its configured value (the paper's λ2 sweep); ``fallback: none`` drops eq 10.
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
from saferl.learners.onpolicy_base import flat, standardise
from saferl.learners.quantile import CVaRValue, QuantileCritic, quantile_huber_loss, return_atoms
from saferl.learners.trpo_lag import TRPOLag, TRPOLagParams
from saferl.learners.trust_region import SearchResult, backtracking_line_search, conjugate_gradient, mean_kl
from saferl.learners.trust_region_base import TrustRegionLearner, TrustRegionParams, natural_gradient_step
from saferl.metric_keys import LAGRANGE_MULTIPLIER

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
        with torch.no_grad():  # here: the critics are fitted beside the policy step (``CriticLane``)
            prep["cvar_cost_value"] = self.v_c(self.policy.normalised(prep["obs"])).mean().item()
        return prep

    def critic_update(self, z: torch.Tensor, ret_r: torch.Tensor, ret_c: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if not self.p.distributional:
            return super().critic_update(z, ret_r, ret_c)
        loss = ((self.v_r(z).squeeze(-1) - ret_r) ** 2).mean() + \
            quantile_huber_loss(self.q_c(z), ret_c, self.q_c.taus, self.p.huber_kappa)
        params = [p for group in self.v_opt.param_groups for p in group["params"]]
        return loss.detach(), base.guarded_descend(self.v_opt, loss, params)

    def policy_step(self, prep: dict, batches: list[dict]) -> dict:
        return {**natural_gradient_step(self.policy_at_k(prep), standardise(prep["adv_c"]), self.p),
                "cvar_cost_value": prep["cvar_cost_value"]}


# -- stage 2: the exclusion step ------------------------------------------------------------------


def least_lambda2(q: float, r: float, s: float, delta1: float, delta2: float) -> float | None:
    """The least λ2 with φᵀαG(λ2) = δ2 (module docstring); None when no λ2 reaches δ2."""
    kappa2 = delta2 ** 2 / (2 * delta1)
    if s <= kappa2 * (1 + 1e-9) or s <= 0:
        return None
    return (-r + math.sqrt(kappa2 * max(s * q - r * r, 0.0) / (s - kappa2))) / s


@dataclass
class Directions:
    """x_g = H⁻¹g and x_φ = H⁻¹φ (conjugate gradient) with the scalars that give the full step
    of eq 9 for any λ2 without another Fisher-vector product: G(λ2) = x_g + λ2 x_φ,
    GᵀHG = a + 2λ2 b + λ2² c (a = x_gᵀHx_g, b = x_gᵀHx_φ, c = x_φᵀHx_φ) and φᵀG = r + λ2 s
    (r = φᵀx_g, s = φᵀx_φ); q = gᵀx_g."""
    x_g: torch.Tensor
    x_phi: torch.Tensor
    q: float
    r: float
    s: float
    a: float
    b: float
    c: float
    delta1: float

    def ghg(self, lambda2: float) -> float:
        return self.a + 2 * lambda2 * self.b + lambda2 ** 2 * self.c

    def exclusion(self, lambda2: float) -> float:
        """φᵀαG(λ2) of the full step (α = √(2δ1 / GᵀHG))."""
        ghg = self.ghg(lambda2)
        return math.sqrt(2 * self.delta1) * (self.r + lambda2 * self.s) / math.sqrt(ghg) if ghg > 0 else -math.inf

    def supremum(self) -> float:
        """lim_{λ2→∞} φᵀαG(λ2) = √(2δ1) s / √c: no step in the trust region along G excludes more."""
        return math.sqrt(2 * self.delta1) * self.s / math.sqrt(self.c) if self.c > 0 else -math.inf

    def full_step(self, lambda2: float) -> tuple[torch.Tensor, float]:
        """(αG(λ2), φᵀαG(λ2))."""
        alpha = math.sqrt(2 * self.delta1 / self.ghg(lambda2))
        return alpha * (self.x_g + lambda2 * self.x_phi), alpha * (self.r + lambda2 * self.s)

    def least_lambda2(self, target: float, floor: float) -> float | None:
        """The least λ2 ≥ ``floor`` whose full step excludes at least ``target`` (bisection on
        the increasing φᵀαG(λ2)); None when even λ2 → ∞ falls short."""
        if self.exclusion(floor) >= target:
            return floor
        if not self.supremum() > target * (1 + 1e-9):
            return None
        lo, hi = floor, max(floor, 1e-8)
        while self.exclusion(hi) < target:
            lo, hi = hi, 2 * hi
            if hi > 1e30:
                return None
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if self.exclusion(mid) >= target:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
        return hi


@dataclass
class ExclusionStep:
    step: torch.Tensor          # the full step αG (before the line search's fraction)
    lambda2: float
    feasible: bool              # eq 8 has a solution along G: φᵀαG ≥ δ2
    phi_step: float             # φᵀαG
    directions: Directions | None = None   # None for the plain TRPO step (no φ)


def exclusion_step(fvp, g: torch.Tensor, phi: torch.Tensor | None, lambda2: float, delta1: float,
                   delta2: float, cg_iters: int, adapt_lambda2: bool = True) -> ExclusionStep | None:
    """G = H⁻¹(g + λ2 φ) and α = √(2δ1/GᵀHG) (eq 9), λ2 raised to the least value meeting
    φᵀαG ≥ δ2 when needed and allowed; ``phi`` None: the plain TRPO step (no exclusion). None
    when conjugate gradient failed or a curvature is not positive."""
    cg_g = conjugate_gradient(fvp, g, cg_iters)
    if cg_g.failed:
        return None
    x_g = cg_g.x
    hx_g = fvp(x_g)
    a = (x_g @ hx_g).item()
    if not math.isfinite(a) or a <= 0:
        return None
    if phi is None:
        return ExclusionStep(math.sqrt(2 * delta1 / a) * x_g, 0.0, True, math.inf)
    cg_phi = conjugate_gradient(fvp, phi, cg_iters)
    if cg_phi.failed:
        return None
    x_phi = cg_phi.x
    c = (x_phi @ fvp(x_phi)).item()
    if not math.isfinite(c) or c <= 0:
        return None
    d = Directions(x_g, x_phi, (g @ x_g).item(), (phi @ x_g).item(), (phi @ x_phi).item(), a,
                   (hx_g @ x_phi).item(), c, delta1)
    if adapt_lambda2:
        lambda2 = d.least_lambda2(delta2 * (1 + 1e-9), lambda2) or lambda2  # a hair inside, against rounding
    step, phi_step = d.full_step(lambda2)
    return ExclusionStep(step, lambda2, phi_step >= delta2, phi_step, d)


# -- stage 2: the learner ---------------------------------------------------------------------------


class STRPOParams(TRPOLagParams):
    target_kl: float = Field(0.01, gt=0, description="δ1, the trust-region radius (paper default 1e-2)")
    delta2: float = Field(1e-4, ge=0, description="δ2, the least exclusion φᵀ(θ − θ_k) (paper default 1e-4)")
    lambda2: float = Field(0.01, ge=0, description="λ2, the weight of φ in G (paper: 0.01 or 1; at 1 the "
                           "exclusion dominated the z-scored reward gradient on FunctionEnv)")
    adapt_lambda2: bool = Field(True, description="raise λ2 to the least value meeting φᵀ(fαG) ≥ δ2 at each "
                                "line-search fraction f; false: λ2 fixed (the paper's λ2 sweep)")
    joint_advantage: bool = Field(True, description="eq 6; false: z(Â_r) alone (ablation)")
    exclusion: bool = Field(True, description="the unsafe-policy term; false: TRPO on Ã (ablation)")
    exclusion_gradient: Literal["importance", "analytic"] = Field(
        "importance", description="φ by eq 7's importance weights, or the exact ∇ of the Gaussian KL")
    fallback: Literal["reverse", "none"] = Field(
        "reverse", description="when the forward step fails: eq 10's reverse step where it improves the surrogate "
        "and keeps the separation from π_unsafe (else θ_k), or always θ_k")
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

    @field_validator("kl_action_dims")
    @classmethod
    def _joint_kl(cls, v: str) -> str:
        if v != "sum":  # eq 7-10's KLs, to π_k and to π_unsafe, are of the joint action distribution
            raise ValueError("sTRPO measures its KLs on the joint action distribution: 'sum' only")
        return v


def load_unsafe_policy(path: str, env: base.EnvSpec, device) -> GaussianPolicy:
    """π_unsafe from a trpo_unsafe run directory (its newest checkpoint) or checkpoint file."""
    from saferl.checkpoint_files import checkpoints
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
    policy = GaussianPolicy(env.obs_dim, env.act_dim, up.hidden, up.init_log_std, normalise_obs=up.normalise_obs,
                            init=up.init)
    try:
        policy.load_state_dict(ckpt["learner"]["policy"])
    except RuntimeError:
        raise ConfigError(f"config error: algo_params.unsafe_policy: {files[-1]} was trained on "
                          f"{ckpt.get('task')!r}, whose shapes differ from this task's") from None
    return policy.to(device).requires_grad_(False)


CASES = {"forward": 0, "reverse": 1, "kept": 2}  # ``strpo/case``: eq 9's step, eq 10's, θ_k kept


class STRPO(TRPOLag):
    """Stage 2 (module docstring); TRPO-Lag's PID/Lagrange ``dual`` phase and checkpointing."""

    Params = STRPOParams

    def __init__(self, params: STRPOParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        self.case_counts = dict.fromkeys(CASES, 0)  # updates per case so far (the cumulative shares)
        self.unsafe = None
        if params.exclusion:
            if params.unsafe_policy is None:
                from saferl.config import ConfigError
                raise ConfigError("config error: algo_params.unsafe_policy: sTRPO needs a stage-1 policy "
                                  "(saferl train runs stage 1 itself when it is unset)")
            self.unsafe = load_unsafe_policy(params.unsafe_policy, env, device)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "case_counts": dict(self.case_counts)}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.case_counts = {**dict.fromkeys(CASES, 0), **sd.get("case_counts", {})}

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
        stats = {LAGRANGE_MULTIPLIER: self.multiplier.value}
        unsafe_before = None
        if phi is not None:
            unsafe_before = self.unsafe_kl(k)
            stats.update(phi_norm=phi.norm().item(), unsafe_kl_before=unsafe_before)
            if not torch.isfinite(phi).all():  # importance weights overflowed: no exclusion this step
                phi = None
                stats["phi_nonfinite"] = 1.0
        loss_before = k.measure(adv)[0]
        ex = exclusion_step(k.fvp, g, phi, p.lambda2, p.target_kl, p.delta2, p.cg_iters, p.adapt_lambda2)
        case, res, step, lambda2 = "kept", SearchResult(False, 0.0, 0, loss_before, 0.0, None), torch.zeros_like(g), 0.0
        if ex is not None:
            if phi is None:  # TRPO on Ã: no exclusion, no fallback
                step, res = ex.step, self.search(k, lambda f: (ex.step, 0.0, 0.0), adv, loss_before)[1]
            else:
                step, lambda2, res = self.forward_search(k, ex, adv, loss_before)
            case = "forward" if res.accepted else case
            if not res.accepted and phi is not None and p.fallback == "reverse":  # eq 10
                step, lambda2 = -ex.step, ex.lambda2
                res = self.reverse_search(k, step, adv, loss_before, unsafe_before)
                case = "reverse" if res.accepted else case
            stats.update(lambda2=lambda2 if res.accepted else ex.lambda2, exclusion_feasible=float(ex.feasible),
                         phi_step_full=ex.phi_step if phi is not None else 0.0)
        k.move(step, res.fraction)
        if phi is not None:  # φᵀ(θ_{k+1} − θ_k) of the step taken
            stats["phi_step"] = (phi @ (res.fraction * step)).item()
        loss, kl, _ = k.measure(adv)
        self.case_counts[case] += 1
        total = sum(self.case_counts.values())
        stats.update({"strpo/case": CASES[case], **{f"strpo/{c}": float(c == case) for c in CASES},
                      **{f"strpo/{c}_share": n / total for c, n in self.case_counts.items()},
                      "loss_pi": loss, "loss_pi_before": loss_before, "kl": kl, "step_fraction": res.fraction,
                      "search_tries": res.tries, "step_norm": (res.fraction * step).norm().item()})
        if self.unsafe is not None:
            stats["unsafe_kl"] = self.unsafe_kl(k)
        return stats

    def search(self, k, candidate, adv, loss_before: float, unsafe_before: float | None = None,
               penalised: bool = True, min_exclusion: float | None = None):
        """Backtracking over fractions f = 1, β, β², … of a full step: ``candidate(f)`` -> (full
        step, λ2, its φᵀstep), or None when no fraction from f down can qualify (the rest are
        skipped). Accepted at θ_k + f·step: the sampled KL ≤ δ1(1 + tol), the surrogate improved
        (with ``penalised`` the one G ascends, E[ρÃ] + λ2 φᵀ(θ − θ_k)), with ``min_exclusion``
        φᵀ(θ − θ_k) ≥ it, and with ``unsafe_before`` D̄_KL(π_unsafe ‖ π_θ) not below it.
        Returns (the accepted candidate or None, the search result)."""
        p, tried, stop = self.p, {}, [False]

        def evaluate(fraction: float):
            cand = None if stop[0] else candidate(fraction)
            if cand is None:
                stop[0] = True
                return math.nan, math.nan, None
            st, lam, phi_full = tried[fraction] = cand
            k.move(st, fraction)
            loss, kl, _ = k.measure(adv)
            if penalised:
                loss -= lam * fraction * phi_full
            if unsafe_before is not None:
                return loss, kl, unsafe_before - self.unsafe_kl(k)  # ≤ 0: separation kept
            return loss, kl, (-fraction * phi_full if min_exclusion is not None else None)

        limit = -min_exclusion if min_exclusion is not None else (0.0 if unsafe_before is not None else None)
        res = backtracking_line_search(
            evaluate, loss_before, p.target_kl, kl_tolerance=p.kl_tolerance, backtrack_coef=p.backtrack_coef,
            max_tries=p.max_backtracks, cost_before=0.0, max_cost_increase=limit)
        return (tried[res.fraction] if res.accepted else None), res

    def forward_search(self, k, ex: ExclusionStep, adv, loss_before: float):
        """Eq 8-9 with the paper's "backtracking line search on α and (optionally) adjust λ2 until
        the exclusion constraint also holds": the candidate at fraction f is f·αG(λ2_f), λ2_f the
        least λ2 ≥ the configured one whose full step excludes δ2 / f (so that f·αG(λ2_f) still
        excludes δ2); with ``adapt_lambda2`` off λ2 stays fixed and only fractions with
        f·φᵀαG ≥ δ2 are tried. Returns (the accepted full step, its λ2, the search result)."""
        p, d = self.p, ex.directions

        def candidate(f: float):
            lam = ex.lambda2
            if f < 1 and p.adapt_lambda2:
                lam = d.least_lambda2(p.delta2 / f * (1 + 1e-9), p.lambda2)
                if lam is None:  # δ2 / f beyond the supremum, and more so for smaller f
                    return None
            st, phi_full = (ex.step, ex.phi_step) if lam == ex.lambda2 else d.full_step(lam)
            return None if f * phi_full < p.delta2 else (st, lam, phi_full)

        cand, res = self.search(k, candidate, adv, loss_before, min_exclusion=p.delta2)
        return (cand[0], cand[1], res) if cand is not None else (ex.step, ex.lambda2, res)

    def reverse_search(self, k, step, adv, loss_before: float, unsafe_before: float):
        """Eq 10's fallback θ_k − f·αG, taken only where it is the "conservative" step the paper
        asks for: the sampled KL ≤ δ1(1 + tol), the surrogate E[ρÃ] improved and the sampled
        D̄_KL(π_unsafe ‖ π_θ) not below its value at θ_k (separation from π_unsafe kept)."""
        return self.search(k, lambda f: (step, 0.0, 0.0), adv, loss_before, unsafe_before=unsafe_before,
                           penalised=False)[1]
