"""CGPO sub-problem (eq 10, Algorithm 2) against cvxpy and the KKT conditions; radius rule eq 18."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from saferl.learners.cgpo_math import (
    RadiusParams,
    adapt_radius,
    dual_variables,
    lambda_sets,
    reduction_ratio,
    solve_subproblem,
    toleration_ratio,
)

cp = pytest.importorskip("cvxpy")


def instance(rng, case):
    """Random (g, q, c, δ̂) landing in case 'a', 'b' or 'c' (|c| vs √δ̂ ‖q‖)."""
    n = int(rng.integers(2, 51))
    g = rng.normal(size=n) * 10 ** rng.uniform(-2, 2)
    q = rng.normal(size=n) * 10 ** rng.uniform(-2, 2)
    radius_sq = 10 ** rng.uniform(-4, 0)
    edge = math.sqrt(radius_sq) * np.linalg.norm(q)
    c = edge * {"a": rng.uniform(1.05, 3), "b": -rng.uniform(1.05, 3), "c": rng.uniform(-0.95, 0.95)}[case]
    return g, q, c, radius_sq


def cvx_solve(g, q, c, radius_sq):
    """cvxpy on eq 10 written in u = δ/√δ̂ with g, (q, c) divided by ‖g‖, ‖q‖ (same problem, better
    conditioned for the interior-point solver); returns status, δ, gᵀδ and the paper's (λ, ν)."""
    gn, qn, rad = np.linalg.norm(g), np.linalg.norm(q), math.sqrt(radius_sq)
    u = cp.Variable(g.size)
    lin = c / (qn * rad) + (q / qn) @ u <= 0
    ball = cp.sum_squares(u) <= 1
    prob = cp.Problem(cp.Maximize((g / gn) @ u), [lin, ball])
    prob.solve(solver=cp.CLARABEL)
    if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        return prob.status, None, None, None, None
    # L = −gᵀx + ν(c + qᵀx) + μ(xᵀx − 1)  ⇒  g − νq = 2μx, i.e. the paper's λ = 2μ (eq 35-36)
    return (prob.status, rad * u.value, gn * rad * prob.value,
            2 * gn * np.ravel(ball.dual_value)[0] / rad, gn * np.ravel(lin.dual_value)[0] / qn)


def assert_feasible(delta, q, c, radius_sq):
    scale = abs(c) + np.linalg.norm(q) * math.sqrt(radius_sq)
    assert delta @ delta <= radius_sq * (1 + 1e-12)
    assert c + q @ delta <= 1e-10 * scale


@pytest.mark.parametrize("case", ["b", "c"])
def test_matches_cvxpy_when_solvable(case):
    rng = np.random.default_rng({"b": 1, "c": 2}[case])
    for _ in range(25):
        g, q, c, radius_sq = instance(rng, case)
        delta, info = solve_subproblem(g, q, c, radius_sq)
        assert info["case"] == case and info["feasible"] and info["degenerate"] is None
        assert_feasible(delta, q, c, radius_sq)
        status, x, value, lam, nu = cvx_solve(g, q, c, radius_sq)
        assert status == cp.OPTIMAL
        scale = np.linalg.norm(g) * math.sqrt(radius_sq)
        assert g @ delta >= value - 1e-8 * scale               # at least as good as cvxpy
        assert g @ delta <= value + 1e-8 * scale               # and not "better" by infeasibility
        np.testing.assert_allclose(delta, x, atol=1e-4 * math.sqrt(radius_sq))  # unique optimum; IPM accuracy
        # the paper's scaling of the multipliers (λ = 2μ) against cvxpy's duals, to IPM accuracy
        gn, qn = np.linalg.norm(g), np.linalg.norm(q)
        assert info["lam"] == pytest.approx(lam, rel=1e-3, abs=1e-4 * gn / math.sqrt(radius_sq))
        assert info["nu"] == pytest.approx(nu, rel=1e-3, abs=1e-4 * gn / qn)


def test_case_c_hits_both_dual_pieces():
    rng = np.random.default_rng(3)
    nus = [solve_subproblem(*instance(rng, "c"))[1]["nu"] for _ in range(200)]
    assert any(nu > 0 for nu in nus) and any(nu == 0 for nu in nus)


def test_case_a_infeasible_and_recovery_step():
    rng = np.random.default_rng(4)
    for _ in range(15):
        g, q, c, radius_sq = instance(rng, "a")
        delta, info = solve_subproblem(g, q, c, radius_sq)
        assert info["case"] == "a" and not info["feasible"] and info["lam"] is None
        assert cvx_solve(g, q, c, radius_sq)[0] in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE)
        # the direction of the minimum-norm point of the plane c + qᵀδ = 0 (eq 29), length √δ̂
        ring = -c * q / (q @ q)
        np.testing.assert_allclose(delta, math.sqrt(radius_sq) * ring / np.linalg.norm(ring), rtol=1e-12)
        # which minimises the linearised cost over the ball
        u, qn, rad = cp.Variable(g.size), np.linalg.norm(q), math.sqrt(radius_sq)
        best = cp.Problem(cp.Minimize((q / qn) @ u), [cp.sum_squares(u) <= 1])
        best.solve(solver=cp.CLARABEL)
        assert abs(info["constraint"] - (c + qn * rad * best.value)) <= 1e-7 * qn * rad


def test_kkt_case_c():
    """Eq 36-39 in the paper's scaling, g − νq = λδ, and strong duality with the dual (eq 35)."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        g, q, c, radius_sq = instance(rng, "c")
        delta, info = solve_subproblem(g, q, c, radius_sq)
        lam, nu = info["lam"], info["nu"]
        gn, qn = np.linalg.norm(g), np.linalg.norm(q)
        assert lam > 0 and nu >= 0
        np.testing.assert_allclose(g - nu * q, lam * delta, atol=1e-10 * gn)       # stationarity
        assert abs(nu * (c + q @ delta)) <= 1e-10 * gn * math.sqrt(radius_sq)     # compl. slackness
        assert abs(lam * (delta @ delta - radius_sq)) <= 1e-10 * gn * math.sqrt(radius_sq)
        assert_feasible(delta, q, c, radius_sq)                                   # primal feasibility
        dual = -np.sum((g - nu * q) ** 2) / (2 * lam) + nu * c - lam * radius_sq / 2
        assert abs(dual + g @ delta) <= 1e-10 * gn * math.sqrt(radius_sq)         # zero duality gap
        # Algorithm 2 on the raw (r, s, t) gives the same multipliers as the rescaled solve
        lam2, nu2 = dual_variables(g @ g, g @ q, q @ q, c, radius_sq)
        assert lam2 == pytest.approx(lam, rel=1e-6) and nu2 == pytest.approx(nu, rel=1e-6, abs=1e-9 * gn / qn)


def test_kkt_adversarial_case_c():
    """Nearly (anti-)parallel g, q and |c| ≈ √δ̂ ‖q‖ (near-tangent planes, near-ties of La and Lb):
    KKT residuals at rounding level relative to the size of the multiplier terms."""
    rng = np.random.default_rng(9)
    for _ in range(2000):
        n = int(rng.integers(1, 8))
        q = rng.normal(size=n) * 10 ** rng.uniform(-3, 3)
        noise = 10 ** rng.uniform(-12, -1) * np.linalg.norm(q) * rng.normal(size=n)
        g = (rng.choice([-1, 1]) * q + noise) * 10 ** rng.uniform(-3, 3)
        radius_sq = 10 ** rng.uniform(-6, 1)
        gn, qn, rad = np.linalg.norm(g), np.linalg.norm(q), math.sqrt(radius_sq)
        c = rad * qn * rng.choice([rng.uniform(-1, 1), 0.0, rng.choice([-1, 1]) * (1 - 10 ** rng.uniform(-12, -1))])
        delta, info = solve_subproblem(g, q, c, radius_sq)
        lam, nu = info["lam"], info["nu"]
        assert info["case"] == "c" and info["feasible"] and delta @ delta <= radius_sq * (1 + 1e-12)
        assert np.linalg.norm(g - nu * q - lam * delta) <= 1e-12 * (gn + nu * qn + lam * rad)
        assert abs(nu * (c + q @ delta)) <= 1e-12 * (gn + nu * qn) * rad
        assert abs(lam * (delta @ delta - radius_sq)) <= 1e-12 * (gn * rad + lam * radius_sq)


def test_lambda_sets():
    assert lambda_sets(1.0, 2.0) == ((0.0, math.inf), None)           # λc + s > 0 for all λ ≥ 0
    assert lambda_sets(-1.0, 2.0) == ((0.5, math.inf), (0.0, 0.5))
    assert lambda_sets(1.0, -2.0) == ((0.0, 0.5), (0.5, math.inf))
    assert lambda_sets(-1.0, -2.0) == (None, (0.0, math.inf))
    assert lambda_sets(0.0, 0.0) == (None, (0.0, math.inf))
    assert lambda_sets(0.5, 0.0) == ((0.0, math.inf), None)


# ---------------------------------------------------------------- degenerate inputs

def check_finite(delta, info):
    assert np.all(np.isfinite(delta))
    assert all(v is None or isinstance(v, str) or math.isfinite(v) for v in info.values())


def test_q_zero():
    g = np.array([3.0, 4.0])
    delta, info = solve_subproblem(g, np.zeros(2), 1.0, 0.04)
    check_finite(delta, info)
    assert info["case"] == "a" and not info["feasible"] and np.all(delta == 0) and info["degenerate"]
    for c in (0.0, -1.0):
        delta, info = solve_subproblem(g, np.zeros(2), c, 0.04)
        check_finite(delta, info)
        assert info["case"] == "b" and info["feasible"]
        np.testing.assert_allclose(delta, [0.12, 0.16])


def test_g_zero():
    q = np.array([0.0, 2.0])
    for c, case, expect in [(1.0, "a", [0, -0.2]), (-1.0, "b", [0, 0]), (0.1, "c", [0, -0.05]),
                            (-0.1, "c", [0, 0]), (0.0, "c", [0, 0])]:
        delta, info = solve_subproblem(np.zeros(2), q, c, 0.04)
        check_finite(delta, info)
        assert info["case"] == case and (case == "a") != info["feasible"]
        np.testing.assert_allclose(delta, expect, atol=1e-15)
        if case == "c":
            assert info["lam"] == 0 and info["nu"] == 0


@pytest.mark.parametrize("factor", [2.0, 3.0, 1e-6, -2.0, -3.0, -1e6])
@pytest.mark.parametrize("ratio", [-0.9, -0.3, 0.0, 0.4, 0.99])
def test_g_parallel_to_q(factor, ratio):
    """g = αq: for α > 0 the optimum is the plane (not unique, λ* = 0), for α < 0 the far end."""
    rng = np.random.default_rng(7)
    q = rng.normal(size=6)
    g, radius_sq = factor * q, 0.01
    c = ratio * 0.1 * np.linalg.norm(q)
    delta, info = solve_subproblem(g, q, c, radius_sq)
    check_finite(delta, info)
    assert info["case"] == "c" and info["feasible"]
    assert_feasible(delta, q, c, radius_sq)
    best = -c * factor if factor > 0 else abs(factor) * np.linalg.norm(q) * 0.1
    assert g @ delta == pytest.approx(best, rel=1e-9, abs=1e-12 * np.linalg.norm(g))
    if factor == 2.0:                       # exactly parallel after scaling: min-norm fallback
        assert info["lam"] == 0 and info["degenerate"]
        np.testing.assert_allclose(delta, -c * q / (q @ q), atol=1e-15)


def test_nearly_parallel_and_extreme_scales():
    rng = np.random.default_rng(8)
    for _ in range(20):
        _g0, q0, c0, radius_sq = instance(rng, "c")
        for gs, qs, eps in [(1.0, 1.0, 1e-9), (1.0, 1.0, 1e-14), (1e-150, 1e150, 1e-6),
                            (1e150, 1e-150, 0.0), (1e-170, 1e-170, 1e-3)]:
            q = q0 * qs
            g = (q0 + eps * np.linalg.norm(q0) * rng.normal(size=q0.size)) * gs
            c = c0 * qs
            delta, info = solve_subproblem(g, q, c, radius_sq)
            check_finite(delta, info)
            assert info["case"] == "c" and info["feasible"]
            assert np.linalg.norm(delta) <= math.sqrt(radius_sq) * (1 + 1e-12)
            # compare with the well-scaled problem (δ is invariant to g → αg, (q, c) → α(q, c))
            ref, _ = solve_subproblem(g / gs, q0, c0, radius_sq)
            assert (g / gs) @ delta == pytest.approx((g / gs) @ ref, rel=1e-9,
                                                     abs=1e-12 * np.linalg.norm(g / gs) * math.sqrt(radius_sq))


def test_boundary_of_cases():
    """c² = δ̂ qᵀq: for c > 0 the recovery step is the single feasible point; for c < 0 case b."""
    q, g = np.array([3.0, 4.0]), np.array([1.0, -2.0])
    delta, info = solve_subproblem(g, q, 0.5, 0.01)
    assert info["case"] == "a"
    np.testing.assert_allclose(delta, [-0.06, -0.08])
    assert abs(info["constraint"]) < 1e-15
    delta, info = solve_subproblem(g, q, -0.5, 0.01)
    assert info["case"] == "b" and info["feasible"]
    delta, info = solve_subproblem(g, q, np.nextafter(0.5, 0), 0.01)   # just inside case c
    check_finite(delta, info)
    assert info["case"] == "c" and info["feasible"]
    np.testing.assert_allclose(delta, [-0.06, -0.08], atol=1e-8)


def test_invalid_inputs():
    for args in [([1, 2], [1, 2, 3], 0, 1), ([[1, 2]], [[1, 2]], 0, 1), ([1, 2], [1, 2], 0, 0),
                 ([1, 2], [1, 2], 0, -1), ([1, np.nan], [1, 2], 0, 1), ([1, 2], [1, 2], np.inf, 1)]:
        with pytest.raises(ValueError):
            solve_subproblem(*args)


# ---------------------------------------------------------------- radius (eq 18)

def test_adapt_radius():
    p = RadiusParams()
    assert (p.init, p.lower, p.upper, p.beta1, p.beta2, p.eta1, p.eta2) == (1e-3, 1e-4, 1e-2, 0.8, 1.25, 0.25, 0.75)
    cases = [(1e-3, 0.1, 0.9, 8e-4), (1e-3, 0.9, 0.1, 8e-4), (1e-3, 0.9, 0.9, 1.25e-3),
             (1e-3, 0.5, 0.9, 1e-3), (1e-3, 0.9, 0.5, 1e-3), (1e-3, 0.25, 0.25, 1e-3),   # η1 not below
             (1e-3, 0.75, 0.75, 1.25e-3), (1e-3, 0.749, 10.0, 1e-3),
             (1e-3, math.nan, 1.0, 8e-4), (1e-3, 1.0, math.nan, 8e-4), (1e-3, math.inf, math.inf, 1.25e-3),
             (9e-3, 1.0, 1.0, 1e-2), (1e-2, 1.0, 1.0, 1e-2),                            # clip above
             (1.1e-4, 0.0, 1.0, 1e-4), (1e-4, -5.0, 1.0, 1e-4)]                        # clip below
    for r, rho, zeta, expect in cases:
        assert adapt_radius(r, rho, zeta, p) == pytest.approx(expect, rel=1e-12), (r, rho, zeta)
    reacher = RadiusParams(init=1e-2, upper=1e-1)
    assert adapt_radius(0.09, 1.0, 1.0, reacher) == pytest.approx(0.1)


def test_radius_params_validation():
    for bad in [dict(lower=1e-2, upper=1e-3), dict(init=1.0), dict(beta1=1.0), dict(beta2=0.9),
                dict(eta1=0.8, eta2=0.5), dict(foo=1)]:
        with pytest.raises(ValidationError):
            RadiusParams(**bad)


def test_ratios():
    # ρ: actual / predicted change of J_R (Ĵ_R(θ_{k+1}) = J_R(θ_k) + gᵀδ)
    assert reduction_ratio(10.0, 11.0, 12.0) == pytest.approx(0.5)
    assert reduction_ratio(10.0, 13.0, 12.0) == pytest.approx(1.5)
    assert reduction_ratio(10.0, 9.0, 12.0) == pytest.approx(-0.5)
    assert reduction_ratio(10.0, 9.0, 8.0) == pytest.approx(0.5)        # case a: predicted loss
    assert reduction_ratio(10.0, 10.0, 10.0) == 1.0
    assert reduction_ratio(10.0, 9.0, 10.0) == -math.inf
    # ζ: |b − J_C(θ_{k+1})| / |J_C(θ_{k+1}) − Ĵ_C(θ_{k+1})|
    assert toleration_ratio(8.0, 7.0, 10.0) == pytest.approx(2.0)
    assert toleration_ratio(12.0, 11.0, 10.0) == pytest.approx(2.0)     # beyond the limit, as written
    assert toleration_ratio(9.5, 7.5, 10.0) == pytest.approx(0.25)
    assert toleration_ratio(9.0, 9.0, 10.0) == math.inf
