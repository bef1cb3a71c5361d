"""The trust-region toolkit shared by TRPO, TRPO-Lag, CPO (and later PCPO, sTRPO): the one
Fisher-vector product, conjugate gradient and backtracking line search.

TRPO (Schulman et al. 2015, "Trust Region Policy Optimization", §6 and Appendix C) solves

    max_θ  gᵀ(θ − θ_k)   s.t.   ½ (θ − θ_k)ᵀ H (θ − θ_k) ≤ δ

with H the Hessian of the mean KL D̄_KL(π_k ‖ π_θ) at θ_k (the Fisher information matrix of
the policy averaged over the sampled states). H is never formed: ``fisher_vector_product``
gives H v by double back-propagation, ``conjugate_gradient`` solves H x = g with a few of them,
the full step is √(2δ / xᵀHx) · x, and ``backtracking_line_search`` shrinks it until the
sampled KL and the surrogate are acceptable. CPO (Achiam et al. 2017, "Constrained Policy
Optimization", §6.1 and Appendix 10.2) adds a cost-surrogate condition to the search.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def mean_kl(old: torch.distributions.Normal, new: torch.distributions.Normal,
            action_dims: str = "sum") -> torch.Tensor:
    """D̄_KL(π_old ‖ π_new) averaged over the sampled states (TRPO's D̄_KL^{ρ_old}, Schulman et
    al. 2015 eq 12). ``action_dims="sum"``: the KL of the joint action distribution (the
    paper's); ``"mean"``: averaged over the action dimensions too, as OmniSafe 0.5's TRPO, CPO and
    PCPO measure it (``kl_divergence(...).mean()`` over an [N, n] tensor), which is the joint KL
    divided by n: a trust region n times wider for the same δ."""
    kl = torch.distributions.kl_divergence(old, new)
    if action_dims == "mean":
        return kl.mean()
    if action_dims != "sum":
        raise ValueError(f"kl_action_dims: 'sum' or 'mean', not {action_dims!r}")
    return kl.sum(-1).mean()


def detached(dist: torch.distributions.Normal) -> torch.distributions.Normal:
    """A copy of a diagonal Gaussian with no graph (π_old, held fixed while θ moves)."""
    return torch.distributions.Normal(dist.loc.detach(), dist.scale.detach())


def fisher_vector_product(policy: torch.nn.Module, obs: torch.Tensor, damping: float = 0.0,
                          action_dims: str = "sum") -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ (H + damping·I) v, H = ∇²_θ D̄_KL(π_θk ‖ π_θ)|_θ=θk (Schulman et al. 2015, Appendix C.1).

    At θ = θ_k the KL's gradient vanishes and its Hessian is the Fisher information matrix, so
    H v = ∇_θ((∇_θ D̄_KL)ᵀ v): one extra backward pass per product, H never built. The damping
    (Tikhonov) term keeps CG well posed when H is near singular. ``policy.dist(obs)`` must give
    a diagonal Gaussian; π_old is the policy at the parameters it has when this is called.
    ``action_dims``: the KL whose Hessian this is (``mean_kl``).
    """
    params = list(policy.parameters())  # the order of networks.flat_params
    with torch.no_grad():
        old = detached(policy.dist(obs))

    def fvp(v: torch.Tensor) -> torch.Tensor:
        grad = _flat_grad(mean_kl(old, policy.dist(obs), action_dims), params, create_graph=True)
        return _flat_grad(grad @ v, params) + damping * v

    return fvp


def _flat_grad(output: torch.Tensor, params: list[torch.Tensor], create_graph: bool = False) -> torch.Tensor:
    """``networks.flat_grad`` with ``create_graph`` (the KL gradient is differentiated again)."""
    grads = torch.autograd.grad(output, params, create_graph=create_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


@dataclass
class CGResult:
    """Conjugate-gradient solution and diagnostics. ``failed``: a non-finite value or a direction
    of non-positive curvature (pᵀAp ≤ 0) appeared, so ``x`` must not be used; ``converged``: the
    residual ‖b − A x‖ fell below the tolerance before the iteration cap (truncated CG, as TRPO
    uses it, is fine when it did not)."""
    x: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    failed: bool


def conjugate_gradient(avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 15,
                       tol: float = 1e-10) -> CGResult:
    """Solve A x = b for symmetric positive-definite A given only v ↦ A v (Schulman et al. 2015,
    Appendix C: "we use the conjugate gradient algorithm followed by a line search"; the
    iteration is Nocedal & Wright, Numerical Optimization, Algorithm 5.2), from x₀ = 0.
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    if not torch.isfinite(rr):
        return CGResult(x, 0, float("nan"), False, True)
    if rr.sqrt() <= tol:
        return CGResult(x, 0, rr.sqrt().item(), True, False)
    for i in range(1, iters + 1):
        ap = avp(p)
        pap = p @ ap
        if not torch.isfinite(pap) or pap <= 0:
            return CGResult(x, i, rr.sqrt().item(), False, True)
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        if rr_new.sqrt() <= tol:
            return CGResult(x, i, rr_new.sqrt().item(), True, False)
        p = r + (rr_new / rr) * p
        rr = rr_new
    ok = bool(torch.isfinite(x).all())
    return CGResult(x, iters, rr.sqrt().item(), False, not ok)


def max_step(x: torch.Tensor, xhx: torch.Tensor | float, delta: float) -> torch.Tensor:
    """The step β x with ½ (βx)ᵀ H (βx) = δ, β = √(2δ / xᵀHx) (Schulman et al. 2015, Appendix C)."""
    return math.sqrt(2.0 * delta / max(float(xhx), 1e-12)) * x


@dataclass
class SearchResult:
    """Outcome of a backtracking line search. ``fraction`` of the full step was accepted
    (0.0 when ``accepted`` is False: the caller keeps θ_k); ``tries`` candidates were evaluated;
    ``loss``/``kl``/``cost`` are at the accepted point (at the last candidate on failure)."""
    accepted: bool
    fraction: float
    tries: int
    loss: float
    kl: float
    cost: float | None


def backtracking_line_search(evaluate: Callable[[float], tuple[float, float, float | None]],
                             loss_before: float, max_kl: float, *, kl_tolerance: float = 0.5,
                             backtrack_coef: float = 0.8, max_tries: int = 15,
                             require_improvement: bool = True, cost_before: float | None = None,
                             max_cost_increase: float | None = None) -> SearchResult:
    """Try fractions 1, β, β², … (β = ``backtrack_coef``, ``max_tries`` of them) of the full
    step and accept the first at which, with ``evaluate(fraction) -> (loss, kl, cost)``:

      * loss and kl are finite and the sampled mean KL ≤ δ·(1 + ``kl_tolerance``)
        (the quadratic model of the KL is only local; Schulman et al. 2015, Appendix C);
      * the surrogate loss improved, loss < ``loss_before`` (when ``require_improvement``; CPO's
        recovery steps drop this, Achiam et al. 2017, Appendix 10.2);
      * when ``max_cost_increase`` is given, the cost surrogate rose by at most that much,
        cost − ``cost_before`` ≤ ``max_cost_increase`` (CPO: max(−c, 0), so an infeasible policy
        must decrease the cost surrogate and a feasible one may use only its slack).

    ``evaluate`` sets the policy to θ_k + fraction·step and measures it; the caller sets the
    parameters afterwards (θ_k + result.fraction·step).
    """
    frac, loss, kl, cost = 1.0, float("nan"), float("nan"), None
    for i in range(1, max_tries + 1):
        loss, kl, cost = evaluate(frac)
        ok = math.isfinite(loss) and math.isfinite(kl) and kl <= max_kl * (1.0 + kl_tolerance)
        if ok and require_improvement:
            ok = loss < loss_before
        if ok and max_cost_increase is not None:
            ok = cost is not None and math.isfinite(cost) and cost - cost_before <= max_cost_increase
        if ok:
            return SearchResult(True, frac, i, loss, kl, cost)
        frac *= backtrack_coef
    return SearchResult(False, 0.0, max_tries, loss, kl, cost)
