"""Analytic (first-order) policy gradients through a differentiable simulator — the machinery
shared by BPTT-Lag now and by SHAC, SHAC-Lag and CGPO later.

BPTT objectives (seed 000, eq 79-80), over N envs and horizon T:

    L_R(θ) = 1/N Σ_i Σ_{t<T} r(s_t^i, a_t^i),     L_C(θ) = 1/N Σ_i Σ_{t<T} c(s_t^i, a_t^i)

with a_t = π_θ(s_t) reparameterised (mean + σ·ε, ε fixed per call) so both are deterministic,
differentiable functions of θ; g = ∇L_R and q = ∇L_C by back-propagation through time.
"""
from __future__ import annotations

import numpy as np
import torch

from saferl.learners.networks import GaussianPolicy, flat_grad


def common_randomness(seed: int, iteration: int, total_envs: int, env, horizon: int):
    """Initial states and action noise for *all* envs of an iteration; each worker slices its
    shard, so N workers of n envs compute exactly the gradient one worker of N·n would."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(iteration))
    states = env.initial_state(total_envs, gen)
    noise = torch.randn(horizon, total_envs, env.act_dim, generator=gen)
    return states, noise


def bptt_objectives(env, policy: GaussianPolicy, state: torch.Tensor, noise: torch.Tensor | None,
                    horizon: int):
    """Returns (J_R, J_C, observations) with J the mean over envs of the summed signal."""
    total_r = torch.zeros(state.shape[0], device=state.device)
    total_c = torch.zeros_like(total_r)
    observations = []
    for t in range(horizon):
        obs = env.observe(state)
        observations.append(obs.detach())
        action = policy.rsample(obs, None if noise is None else noise[t])
        state, r, c = env.step(state, action)
        total_r, total_c = total_r + r, total_c + c
    return total_r.mean(), total_c.mean(), torch.cat(observations)


def objective_gradients(j_r: torch.Tensor, j_c: torch.Tensor, params) -> tuple[np.ndarray, np.ndarray]:
    g = flat_grad(j_r, params, retain_graph=True)
    q = flat_grad(j_c, params)
    return g.cpu().numpy(), q.cpu().numpy()
