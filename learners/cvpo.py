"""CVPO: Constrained Variational Policy Optimization (Liu et al., ICML 2022), Algorithm 2.

Per minibatch of B transitions (``actors/replay.py``; u the stored pre-squash action, a = tanh u):

  critics (eq 74-77)   y_R = r + disc · min_j Q̄_Rj(s', a'),  y_C = c + disc · Q̄_C(s', a'),
                       a' = tanh u', u' ~ π_θ(·|s') (the current policy, as in the paper's policy
                       evaluation and both reference codes)
  E-step (eq 7-9)      K particles u_bk ~ π_θ'(·|s_b), x_bk = Q̄_R(s_b, a_bk) − λ Q̄_C(s_b, a_bk);
                       (η*, λ*) = argmin_{η,λ ≥ 0} g(η, λ) = ηε2 + λε1 + η E_b log (1/K) Σ_k exp(x_bk / η)
                       solved exactly each update (SciPy SLSQP with the analytic gradient, bounds
                       [1e-6, 1e5], warm-started at the last solution; the first is η = λ = 0.1),
                       q*_bk = softmax_k(x_bk / η*)                                          (eq 8)
  M-step (eq 78-83)    M times: with π_μ = N(μ_θ(s), Σ_θ'(s)) and π_Σ = N(μ_θ'(s), Σ_θ(s)),
                       L = E_b (1/K) Σ_k q*_bk [log π_μ(u_bk|s_b) + log π_Σ(u_bk|s_b)]
                           + β_μ (ε_μ − C_μ) + β_Σ (ε_Σ − C_Σ),
                       C_μ = E ½ (μ − μ')ᵀ Σ'⁻¹ (μ − μ'),  C_Σ = E ½ [tr(Σ⁻¹Σ') − n + ln(|Σ|/|Σ'|)]
                       (the KL of π_θ' to π_μ and to π_Σ; C_μ + C_Σ is the full D_KL(π_θ' ‖ π_θ)
                       only when Σ = Σ' (or μ = μ'): the full KL's mean term is weighted by the new
                       Σ⁻¹, C_μ's by the old Σ'⁻¹);
                       β_μ ← clip(β_μ − α_μ (ε_μ − C_μ), 0, β_μ,max), β_Σ likewise; θ ascends L
                       (Adam, gradient norm clipped)
  targets (eq 84)      Q̄ ← ρ Q̄ + (1 − ρ) Q,  θ' ← ρ θ' + (1 − ρ) θ

The likelihood is the weighted *mean* over the K particles (the 1/K above), as in both reference
codes (cvpo-safe-rl and FSRL average q*·log π over particles and states): their caps on β_μ, β_Σ
were tuned for that scale, and with the sum over particles the likelihood outweighs the capped KL
penalties K times more, so the mean KL settles far above ε_μ. The caps: β_Σ,max = 10 as in
cvpo-safe-rl; β_μ,max = 1 instead of its 0.1, which goes with that code's default ε_μ = 1e-2 —
at Table 1's ε_μ = 1e-3 the multiplier needed to hold C_μ at ε_μ can exceed 0.1, and a pinned cap
leaves C_μ above its bound (the cap only guards against runaway; β_μ settles below it). The
weighted likelihood is computed from per-state particle statistics (w = Σ_k q_k, the weighted mean
ū and scatter S = Σ_k q_k (u_k − μ')(u_k − μ')ᵀ, fixed during the M-step), which is the same sum
over particles rewritten: Σ_k q_k ‖L'⁻¹(u_k − μ)‖² = Σ_k q_k ‖L'⁻¹(u_k − ū)‖² + w ‖L'⁻¹(ū − μ)‖²
and Σ_k q_k (u_k − μ')ᵀ Σ⁻¹ (u_k − μ') = tr(Σ⁻¹ S) (``mstep_loglik``).

ε1 is the per-step conversion of the episode limit d (App. B.1): ε1 = d (1 − γ^T) / (T (1 − γ)).
The policy is ``networks.CholeskyTanhGaussianPolicy`` (a full-covariance Gaussian over u, squashed
by tanh into the action box; the reference code bounds the mean with a sigmoid instead and lets
the env clip samples). The E-step uses the target critics and target policy, as the reference
code does. Table 1's values are the defaults: [256, 256] ReLU, γ 0.99, ρ 0.995, B 300, critic
lr 1e-3, K 32, M 6, α_θ 0.002, α_μ 1, α_Σ 100, ε2 0.1, ε_μ 1e-3, ε_Σ 1e-4.

Numerical trouble (issue #9): critic and M-steps go through ``Learner.descend`` (a NaN/Inf loss
or gradient is skipped and counted in ``health/skipped_updates``; a skipped M-step also keeps
β_μ, β_Σ); an E-step whose SLSQP solve raises, or whose particle values or solution are NaN/Inf,
keeps the previous (warm-start) η, λ and is counted in ``health/solver_failures``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import minimize

from saferl.learners import base
from saferl.learners.networks import CholeskyTanhGaussianPolicy, polyak
from saferl.learners.offpolicy_base import OffPolicyLearner, OffPolicyParams
from saferl.metric_keys import LAGRANGE_MULTIPLIER


class CVPOParams(OffPolicyParams):
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    batch_size: int = Field(300, gt=0, description="B (Table 1)")
    critic_lr: float = Field(1e-3, gt=0)
    policy_lr: float = Field(0.002, gt=0, description="α_θ")
    particles: int = Field(32, gt=1, description="K action samples per state in the E-step")
    mstep_iters: int = Field(6, gt=0, description="M")
    kl_estep: float = Field(0.1, gt=0, description="ε2, the E-step KL bound")
    kl_mean: float = Field(1e-3, gt=0, description="ε_μ, the M-step mean KL bound")
    kl_cov: float = Field(1e-4, gt=0, description="ε_Σ, the M-step covariance KL bound")
    beta_mean_lr: float = Field(1.0, gt=0, description="α_μ")
    beta_cov_lr: float = Field(100.0, gt=0, description="α_Σ")
    beta_mean_max: float = Field(1.0, gt=0, description="clip of β_μ (the reference code's 0.1 binds at ε_μ = 1e-3; "
                                 "module docstring)")
    beta_cov_max: float = Field(10.0, gt=0, description="clip of β_Σ (reference code)")
    dual_init: float = Field(0.1, gt=0, description="first η and λ (reference code)")
    dual_bounds: tuple[float, float] = Field((1e-6, 1e5), description="SLSQP bounds on η and λ")
    tau: float = Field(0.005, gt=0, le=1, description="1 − ρ: polyak rate of every target")
    init_std: float = Field(0.5, gt=0, description="initial σ of each action dimension (pre-squash)")
    max_grad_norm: float = Field(40.0, gt=0, description="critic gradient clip")
    policy_grad_norm: float = Field(0.01, gt=0, description="policy gradient clip (reference code)")


# -- E-step -------------------------------------------------------------------------------------


def estep_dual(x_r: np.ndarray, x_c: np.ndarray, eps1: float, eps2: float):
    """g(η, λ) of eq 9 and its gradient, for particle values x_r, x_c [B, K] (float64).

    With x = x_r − λ x_c and w = softmax_k(x/η): ∂g/∂η = ε2 − E_b KL(w_b ‖ uniform),
    ∂g/∂λ = ε1 − E_b E_w[x_c]; the log-mean-exp is shifted by its max for stability."""

    def g(v: np.ndarray):
        eta, lam = float(v[0]), float(v[1])
        z = (x_r - lam * x_c) / eta
        m = z.max(1, keepdims=True)
        e = np.exp(z - m)
        s = e.sum(1, keepdims=True)
        lme = (m + np.log(s / z.shape[1]))[:, 0]  # log (1/K) Σ exp z
        w = e / s
        value = eta * eps2 + lam * eps1 + eta * lme.mean()
        d_eta = eps2 + (lme - (w * z).sum(1)).mean()
        d_lam = eps1 - (w * x_c).sum(1).mean()
        return value, np.array([d_eta, d_lam])

    return g


def solve_estep(x_r: np.ndarray, x_c: np.ndarray, eps1: float, eps2: float, init: tuple[float, float],
                bounds: tuple[float, float]) -> tuple[float, float, bool]:
    """(η*, λ*, converged) by SLSQP from ``init`` (the reference code's solver and bounds).

    Guarded (issue #9): non-finite particle values, an exception in the solver, or a non-finite
    solution or dual value return ``init`` (the warm start) with ``converged`` False; use
    ``estep_failed`` to tell that fallback from a merely unconverged (finite) SLSQP answer."""
    eta, lam, ok, _ = _solve_estep(x_r, x_c, eps1, eps2, init, bounds)
    return eta, lam, ok


def _solve_estep(x_r, x_c, eps1, eps2, init, bounds) -> tuple[float, float, bool, bool]:
    """(η, λ, converged, failed): failed = the warm start ``init`` was returned as the fallback."""
    init = tuple(float(v) for v in init)
    if not (np.isfinite(x_r).all() and np.isfinite(x_c).all()):
        return (*init, False, True)
    g = estep_dual(x_r, x_c, eps1, eps2)
    try:
        with np.errstate(all="ignore"):
            res = minimize(g, np.asarray(init, np.float64), jac=True, method="SLSQP",
                           bounds=[bounds, bounds], options={"maxiter": 100, "ftol": 1e-10})
            x = np.clip(res.x, *bounds)
            finite = bool(np.isfinite(x).all()) and bool(np.isfinite(g(x)[0]))
    except (ValueError, ArithmeticError, np.linalg.LinAlgError):
        return (*init, False, True)
    if not finite:
        return (*init, False, True)
    eta, lam = (float(v) for v in x)
    return eta, lam, bool(res.success), False


def per_step_threshold(limit: float, gamma: float, horizon: int) -> float:
    """ε1 = d (1 − γ^T) / (T (1 − γ)): the episode limit on the discounted Q_c scale (App. B.1)."""
    if gamma >= 1.0:  # (1 − γ^T) / (1 − γ) → T
        return limit
    return limit * (1 - gamma ** horizon) / (horizon * (1 - gamma))


@torch.no_grad()
def particle_q(critic, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Every net of ``critic`` (``offpolicy_base.Critic``, Q(s, a) on [s, a]) at the K particle actions of
    each state: obs [B, d], act [B, K, m] -> [n_nets, B, K]. The same sums as ``critic`` on the
    states repeated K times, but the first layer's state part W_s s + b is computed once per state
    and added to W_a a of each particle, and the ReLUs work in place."""
    d, out = obs.shape[-1], []
    for net in critic.qs:
        first = net[0]
        h = torch.nn.functional.linear(obs, first.weight[:, :d], first.bias).unsqueeze(1) \
            + torch.nn.functional.linear(act, first.weight[:, d:])
        for layer in net[1:]:
            h = torch.relu_(h) if isinstance(layer, torch.nn.ReLU) else layer(h)
        out.append(h.squeeze(-1))
    return torch.stack(out)


# -- M-step -------------------------------------------------------------------------------------


def decoupled_kl(mu_old: torch.Tensor, tril_old: torch.Tensor, mu: torch.Tensor, tril: torch.Tensor):
    """(C_μ, C_Σ) per state: C_μ = ½ (μ − μ')ᵀ Σ'⁻¹ (μ − μ') = KL(N(μ', Σ') ‖ N(μ, Σ')) and
    C_Σ = ½ [tr(Σ⁻¹Σ') − n + ln(|Σ|/|Σ'|)] = KL(N(μ', Σ') ‖ N(μ', Σ)) (eq 78). Their sum is
    KL(N(μ', Σ') ‖ N(μ, Σ)) only when Σ = Σ' or μ = μ' (the full KL weights the mean term by Σ⁻¹)."""
    n = mu.shape[-1]
    diff = torch.linalg.solve_triangular(tril_old, (mu - mu_old).unsqueeze(-1), upper=False).squeeze(-1)
    c_mu = 0.5 * (diff ** 2).sum(-1)
    m = torch.linalg.solve_triangular(tril, tril_old, upper=False)  # L⁻¹L': tr(Σ⁻¹Σ') = ‖L⁻¹L'‖²_F
    log_det = 2 * (torch.log(torch.diagonal(tril, dim1=-2, dim2=-1)).sum(-1)
                   - torch.log(torch.diagonal(tril_old, dim1=-2, dim2=-1)).sum(-1))
    c_sigma = 0.5 * ((m ** 2).sum((-2, -1)) - n + log_det)
    return c_mu, c_sigma


@dataclass
class ParticleStats:
    """What the M-step needs of the weighted particles of each state (fixed during the M-step):
    w = Σ_k q_k, ū = Σ_k q_k u_k / w, spread = Σ_k q_k ‖L'⁻¹(u_k − ū)‖², scatter S = Σ_k q_k
    (u_k − μ')(u_k − μ')ᵀ, and the old policy's μ', L', L'⁻¹ and log|L'|."""
    w: torch.Tensor            # [B]
    mean: torch.Tensor         # [B, n]
    spread: torch.Tensor       # [B]
    scatter: torch.Tensor      # [B, n, n]
    mu_old: torch.Tensor       # [B, n]
    tril_old: torch.Tensor     # [B, n, n]
    inv_old: torch.Tensor      # [B, n, n]
    logdet_old: torch.Tensor   # [B]: Σ log diag L'


def particle_stats(u: torch.Tensor, weights: torch.Tensor, mu_old: torch.Tensor, tril_old: torch.Tensor
                   ) -> ParticleStats:
    """``ParticleStats`` of particles u [B, K, n] with weights q [B, K] under π_θ' = N(μ', L'L'ᵀ)."""
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    inv_old = torch.linalg.solve_triangular(tril_old, eye.expand_as(tril_old), upper=False)
    w = weights.sum(1)
    mean = (weights.unsqueeze(-1) * u).sum(1) / w.unsqueeze(-1)
    z = (u - mean.unsqueeze(1)) @ inv_old.transpose(-2, -1)  # L'⁻¹(u_k − ū), [B, K, n]
    spread = (weights * (z ** 2).sum(-1)).sum(1)
    d = u - mu_old.unsqueeze(1)
    scatter = (weights.unsqueeze(-1) * d).transpose(-2, -1) @ d
    logdet_old = torch.log(torch.diagonal(tril_old, dim1=-2, dim2=-1)).sum(-1)
    return ParticleStats(w, mean, spread, scatter, mu_old, tril_old, inv_old, logdet_old)


def mstep_terms(st: ParticleStats, mu: torch.Tensor, tril: torch.Tensor):
    """Per state: Σ_k q_k [log π_μ(u_k) + log π_Σ(u_k)] (π_μ = N(μ, Σ'), π_Σ = N(μ', Σ)) and
    ``decoupled_kl``'s C_μ, C_Σ, from the particle statistics (module docstring)."""
    n = mu.shape[-1]
    eye = torch.eye(n, dtype=mu.dtype, device=mu.device)
    inv = torch.linalg.solve_triangular(tril, eye.expand_as(tril), upper=False)  # L⁻¹
    logdet = torch.log(torch.diagonal(tril, dim1=-2, dim2=-1)).sum(-1)
    to_mean = ((st.mean - mu).unsqueeze(-2) @ st.inv_old.transpose(-2, -1)).squeeze(-2)  # L'⁻¹(ū − μ)
    tr_scatter = ((inv @ st.scatter) * inv).sum((-2, -1))  # tr(Σ⁻¹ S) = tr(L⁻¹ S L⁻ᵀ)
    loglik = (-0.5 * (st.spread + st.w * (to_mean ** 2).sum(-1) + tr_scatter)
              - st.w * (st.logdet_old + logdet + n * math.log(2 * math.pi)))
    diff = ((mu - st.mu_old).unsqueeze(-2) @ st.inv_old.transpose(-2, -1)).squeeze(-2)
    c_mu = 0.5 * (diff ** 2).sum(-1)
    c_sigma = 0.5 * (((inv @ st.tril_old) ** 2).sum((-2, -1)) - n + 2 * (logdet - st.logdet_old))
    return loglik, c_mu, c_sigma


class CVPO(OffPolicyLearner):
    Params = CVPOParams
    MODULES = ("policy", "target_policy", "q_r", "q_c", "q_r_target", "q_c_target", "pi_opt", "q_opt")

    def __init__(self, params: CVPOParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        p = params
        self.policy = CholeskyTanhGaussianPolicy(env.obs_dim, env.act_dim, p.hidden, p.init_std, p.init).to(device)
        self.target_policy = copy.deepcopy(self.policy).requires_grad_(False)
        self.build_critics(2)
        self.pi_opt = torch.optim.Adam(self.policy.parameters(), lr=p.policy_lr)
        self.eps1 = per_step_threshold(cost_limit, p.gamma, env.max_episode_steps)
        self.eta = self.lam = p.dual_init
        self.beta_mean = self.beta_cov = 0.0

    def update(self, batches: list[dict], clock: dict | None = None) -> dict:
        failures = self.solver_failures
        return {**super().update(batches, clock), "health/solver_failures": self.solver_failures - failures}

    def dual_metrics(self) -> dict:
        return {LAGRANGE_MULTIPLIER: self.lam, "cvpo/eta": self.eta, "cvpo/beta_mean": self.beta_mean,
                "cvpo/beta_cov": self.beta_cov, "cvpo/eps1": self.eps1}

    def step(self, b: dict) -> dict:
        p = self.p
        with torch.no_grad():  # the bootstrap action from the current policy (eq 74-77)
            a2 = torch.tanh(self.policy.dist(b["next_obs"]).sample())
        loss_q = self.critic_step(b, a2)
        weights, particles, estep = self.estep(b["obs"])
        mstep = self.mstep(b["obs"], particles, weights)
        polyak(self.q_r_target, self.q_r, p.tau)
        polyak(self.q_c_target, self.q_c, p.tau)
        polyak(self.target_policy, self.policy, p.tau)
        return {"loss_q": loss_q, **estep, **mstep}

    @torch.no_grad()
    def estep(self, obs: torch.Tensor):
        """Particles from the target policy, their target-critic values, (η*, λ*) and q* (eq 8-9)."""
        p, k = self.p, self.p.particles
        u = self.target_policy.dist(obs).sample((k,)).transpose(0, 1)  # [B, K, n]
        a = torch.tanh(u)
        x_r = particle_q(self.q_r_target, obs, a).min(0).values  # [B, K]
        x_c = particle_q(self.q_c_target, obs, a)[0]
        eta, lam, ok, failed = _solve_estep(x_r.double().cpu().numpy(), x_c.double().cpu().numpy(), self.eps1,
                                            p.kl_estep, (self.eta, self.lam), p.dual_bounds)
        self.solver_failures += failed  # the warm-start duals are kept (health/solver_failures)
        self.eta, self.lam = eta, lam
        weights = torch.softmax((x_r - lam * x_c) / eta, dim=1)
        kl_q = (weights * torch.log(weights * k + 1e-12)).sum(1).mean().item()
        return weights, u, {"cvpo/estep_kl": kl_q, "cvpo/estep_qc": (weights * x_c).sum(1).mean().item(),
                            "cvpo/estep_converged": float(ok), "q_r": x_r.mean().item(), "q_c": x_c.mean().item()}

    def mstep(self, obs: torch.Tensor, u: torch.Tensor, weights: torch.Tensor) -> dict:
        """M weighted-likelihood steps under the decoupled KL bounds (eq 78-83); the likelihood
        is averaged over the K particles (module docstring)."""
        p, k = self.p, u.shape[1]
        with torch.no_grad():
            st = particle_stats(u, weights, *self.target_policy.mean_and_tril(obs))
        for _ in range(p.mstep_iters):
            mu, tril = self.policy.mean_and_tril(obs)
            loglik, c_mu, c_sigma = mstep_terms(st, mu, tril)
            loglik, c_mu, c_sigma = loglik.mean() / k, c_mu.mean(), c_sigma.mean()
            beta_mean = float(np.clip(self.beta_mean - p.beta_mean_lr * (p.kl_mean - c_mu.item()),
                                      0.0, p.beta_mean_max))
            beta_cov = float(np.clip(self.beta_cov - p.beta_cov_lr * (p.kl_cov - c_sigma.item()),
                                     0.0, p.beta_cov_max))
            loss = -(loglik + beta_mean * (p.kl_mean - c_mu) + beta_cov * (p.kl_cov - c_sigma))
            if self.descend(self.pi_opt, loss, self.policy.parameters(), p.policy_grad_norm):
                self.beta_mean, self.beta_cov = beta_mean, beta_cov  # a skipped (NaN) step keeps β_μ, β_Σ too
        with torch.no_grad():  # the Gaussian's entropy, n/2 (1 + ln 2π) + ln|L|, after the last step
            _, tril = self.policy.mean_and_tril(obs)
            n = tril.shape[-1]
            entropy = 0.5 * n * (1 + math.log(2 * math.pi)) + torch.log(torch.diagonal(tril, dim1=-2, dim2=-1)).sum(-1)
        return {"loss_pi": loss.item(), "cvpo/kl_mean": c_mu.item(), "cvpo/kl_cov": c_sigma.item(),
                "entropy": entropy.mean().item()}

    def state_dict(self) -> dict:
        return {**super().state_dict(),
                "duals": {"eta": self.eta, "lam": self.lam, "beta_mean": self.beta_mean, "beta_cov": self.beta_cov}}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        d = sd["duals"]
        self.eta, self.lam, self.beta_mean, self.beta_cov = d["eta"], d["lam"], d["beta_mean"], d["beta_cov"]
