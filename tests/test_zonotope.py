"""Property tests of envs/zonotope.py (SafeGBPO paper, eq 1-6) against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saferl.envs.zonotope import Zonotope, load_sets

FAST = settings(max_examples=12, deadline=None)
seeds = st.integers(0, 2 ** 31 - 1)


def rand_zono(seed: int, n: int, p: int, batch=()) -> Zonotope:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(*batch, n, generator=g, dtype=torch.float64)
    G = torch.randn(*batch, n, p, generator=g, dtype=torch.float64)
    return Zonotope(c, G)


def corners(z: Zonotope) -> torch.Tensor:
    """All c + G s, s ∈ {±1}^p (the vertices are among them): [2^p, n] (unbatched)."""
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=z.num_generators)),
                         dtype=z.center.dtype)
    return z.center + signs @ z.generators.T


@FAST
@given(seeds, st.integers(1, 3), st.integers(1, 5))
def test_support_matches_brute_force(seed, n, p):
    z = rand_zono(seed, n, p)
    d = torch.randn(7, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    brute = (d @ corners(z).T).amax(-1)
    torch.testing.assert_close(z.support(d), brute)
    pts = z.sample(200, torch.Generator().manual_seed(seed))
    assert ((pts @ d.T) <= z.support(d) + 1e-9).all()


@FAST
@given(seeds, st.integers(1, 3), st.integers(1, 5))
def test_interval_hull_is_support_in_unit_directions(seed, n, p):
    z = rand_zono(seed, n, p, batch=(2,))
    lo, hi = z.interval_hull()
    eye = torch.eye(n, dtype=torch.float64)[:, None]  # [n, 1, n] broadcast over the batch
    torch.testing.assert_close(hi, z.support(eye).T)
    torch.testing.assert_close(lo, -z.support(-eye).T)
    b_lo, b_hi = z.box().interval_hull()
    torch.testing.assert_close((b_lo, b_hi), (lo, hi))


@FAST
@given(seeds, st.integers(1, 3), st.integers(1, 4))
def test_samples_are_contained(seed, n, p):
    z = rand_zono(seed, n, p + n - 1)
    pts = z.sample(6, torch.Generator().manual_seed(seed))
    assert z.contains_point(pts, tol=1e-7).all()
    H, h = z.halfspaces()
    assert ((pts @ H.T) <= h + 1e-9).all()


@FAST
@given(seeds, st.integers(1, 5))
def test_point_containment_1d_2d_brute_force(seed, p):
    from scipy.spatial import ConvexHull

    gen = torch.Generator().manual_seed(seed)
    # 1-D: Z = [c − Σ|g|, c + Σ|g|]
    z1 = rand_zono(seed, 1, p)
    radius = z1.generators.abs().sum()
    x1 = z1.center + 2 * torch.randn(20, 1, generator=gen, dtype=torch.float64) * radius
    margin = z1.generators.abs().sum() - (x1 - z1.center).abs()[:, 0]  # > 0 inside
    clear1 = margin.abs() > 1e-7
    assert (z1.contains_point(x1)[clear1] == (margin > 0)[clear1]).all()
    # 2-D: the convex hull of the corners
    z2 = rand_zono(seed, 2, p + 1)
    hull = ConvexHull(corners(z2).numpy())
    lo, hi = z2.interval_hull()
    x2 = lo + (hi - lo) * torch.rand(25, 2, generator=gen, dtype=torch.float64)
    dist = (x2.numpy() @ hull.equations[:, :2].T + hull.equations[:, 2]).max(-1)  # > 0 outside
    clear = np.abs(dist) > 1e-7
    assert (z2.contains_point(x2).numpy()[clear] == (dist <= 0)[clear]).all()
    H, h = z2.halfspaces()
    assert ((((x2 @ H.T) <= h).all(-1)).numpy()[clear] == (dist <= 0)[clear]).all()


@FAST
@given(seeds, st.integers(2, 4))
def test_square_closed_form_matches_lp(seed, n):
    z = rand_zono(seed, n, n, batch=(3,))
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    from saferl.envs.zonotope import _lp_gauge

    lp = torch.tensor([_lp_gauge(z.generators[i].numpy(), (x[i] - z.center[i]).numpy())
                       for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(z.gauge(x), lp, rtol=1e-6, atol=1e-8)
    xg = x.clone().requires_grad_()
    z.gauge_square(xg).sum().backward()  # differentiable closed form
    assert torch.isfinite(xg.grad).all()


@FAST
@given(seeds, st.integers(1, 3), st.integers(1, 4))
def test_containment_certificate(seed, n, p):
    outer = rand_zono(seed, n, p + n - 1)
    # Z scaled by 0.5 about its centre: Γ = I/2, β = 0
    assert outer.containment_certificate(outer.scale(0.5)).item() <= 0.5 + 1e-7
    assert outer.contains_zonotope(outer.scale(0.5)).item()
    # a copy translated past the interval hull is never contained
    lo, hi = outer.interval_hull()
    shift = torch.zeros(n, dtype=torch.float64)
    shift[0] = 2.5 * (hi - lo)[0]
    assert not outer.contains_zonotope(outer + shift).item()
    # random inner ⟨c + Gβ, GΓ⟩: whenever certified, its samples lie in the outer set
    g = torch.Generator().manual_seed(seed + 7)
    gam = torch.randn(outer.num_generators, 2, generator=g, dtype=torch.float64) * 0.4
    beta = torch.randn(outer.num_generators, generator=g, dtype=torch.float64) * 0.3
    inner = Zonotope(outer.center + outer.generators @ beta, outer.generators @ gam)
    if outer.contains_zonotope(inner).item():
        pts = inner.sample(5, g)
        assert outer.contains_point(pts, tol=1e-6).all()


@FAST
@given(seeds, st.integers(1, 3), st.integers(1, 3))
def test_linear_map_and_minkowski_sum(seed, n, p):
    z1, z2 = rand_zono(seed, n, p), rand_zono(seed + 1, n, p + 1)
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    d = torch.randn(5, n, generator=gen, dtype=torch.float64)
    mz, s = M @ z1, z1 + z2
    torch.testing.assert_close(mz.support(d), z1.support(d @ M))  # h_MZ(d) = h_Z(Mᵀd)
    torch.testing.assert_close(s.support(d), z1.support(d) + z2.support(d))
    x1, x2 = z1.sample(4, gen), z2.sample(4, gen)
    assert mz.contains_point(x1 @ M.T, tol=1e-6).all()
    assert s.contains_point(x1 + x2, tol=1e-6).all()
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    assert (z1 + v).contains_point(x1 + v, tol=1e-6).all()


def test_batched_broadcasting_and_grad():
    outer = rand_zono(0, 2, 4, batch=(3,))
    assert outer.sample(5).shape == (5, 3, 2)
    cert = outer.containment_certificate(outer.scale(torch.tensor([[[0.2]], [[0.9]], [[1.5]]],
                                                                 dtype=torch.float64)))
    assert cert.shape == (3,) and cert[0] <= 0.2 + 1e-7 and cert[1] <= 0.9 + 1e-7
    g = outer.generators.clone().requires_grad_()
    Zonotope(outer.center, g).support(torch.ones(2, dtype=torch.float64)).sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad).all()
    assert outer[1].batch_shape == () and outer[1].dim == 2


@pytest.mark.parametrize("task,n,m", [("pendulum", 2, 1), ("quadrotor", 6, 2)])
def test_load_sets(task, n, m):
    rci, ctrl = load_sets(task)
    assert (rci.dim, ctrl.dim) == (n, m) and rci.center.dtype == torch.float64
    assert torch.linalg.matrix_rank(rci.generators) == n
    lo, hi = ctrl.interval_hull()  # the CTRL set lies in the unit action box
    assert (lo >= -1 - 1e-6).all() and (hi <= 1 + 1e-6).all()
    assert load_sets(task, dtype=torch.float32).rci.generators.dtype == torch.float32
    with pytest.raises(ValueError):
        load_sets("cartpole")
