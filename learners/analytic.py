"""Analytic (first-order) policy gradients through a differentiable simulator: the machinery
shared by BPTT-Lag, SHAC, SHAC-Lag and CGPO (CGPO paper, §5.3 and Appendix A.4-A.5).

Short-horizon objectives (eq 19-20 = 55-56) over N envs, window [t0, t0 + h):

    L_R(θ) = 1/N Σ_i [ Σ_{t=t0}^{t0+h-1} r(s_t^i, a_t^i) + V_R(s_{t0+h}^i, t0+h) ]
    L_C(θ) = 1/N Σ_i [ Σ_{t=t0}^{t0+h-1} c(s_t^i, a_t^i) + V_C(s_{t0+h}^i, t0+h) ]

with V(s, T) = 0 at the finite horizon T. Back-propagating through the simulator gives the
adjoints of eq 57-64, so g = ∇L_R and q = ∇L_C. With h = T and no critics these are BPTT's
eq 79-80. Actions are reparameterised (a = tanh(μ + σε), ε drawn from a common stream), so the
objectives are deterministic, differentiable functions of θ.

Critics take the time step, V(s, t) (eq 65), and are fitted to finite-horizon TD(λ) targets
(eq 66-68), computed by the one GAE of ``learners/gae.py`` with γ = 1: G^λ_t = Â_t + V(s_t, t).

The zeroth-order batched gradient (ZoBG, eq 69) of the same objectives is here too
(``zobg_gradients``; ``window_gradients`` picks the estimator): the gbe study compares its
predictions with FoBG's (Tables 2-3), and CGPO-ZoBG (Fig 10) trains on it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from saferl.learners.gae import gae
from saferl.learners.networks import GaussianPolicy, flat_grad, mlp


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def episode_starts(seed: int, episode: int, total_envs: int, env) -> torch.Tensor:
    """Initial states of *all* envs for one episode; workers slice their shard, so N workers of
    n envs compute exactly what one worker of N·n would."""
    return env.initial_state(total_envs, _generator(seed, 0, episode))


def window_noise(seed: int, iteration: int, total_envs: int, act_dim: int, h: int) -> torch.Tensor:
    return torch.randn(h, total_envs, act_dim, generator=_generator(seed, 1, iteration))


class TimeValue(nn.Module):
    """V(s, t): finite-horizon value with the time step as an input (eq 65)."""

    def __init__(self, obs_dim: int, hidden: list[int], horizon: int):
        super().__init__()
        self.horizon = horizon
        self.net = mlp([obs_dim + 1, *hidden, 1], activation=nn.ELU)

    def forward(self, obs_normalised: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=obs_normalised.dtype, device=obs_normalised.device)
        t = torch.broadcast_to(t / self.horizon, obs_normalised.shape[:-1]).unsqueeze(-1)
        return self.net(torch.cat([obs_normalised, t], -1)).squeeze(-1)


def rollout_window(env, policy: GaussianPolicy, state: torch.Tensor, t0: int, h: int, horizon: int,
                   noise: torch.Tensor | None, critics: tuple[TimeValue, TimeValue] | None = None,
                   gamma: float = 1.0):
    """Roll h steps from (state, t0) keeping the graph. Returns per-env window sums of reward and
    cost (Σ γ^k r_k; γ = 1 is the paper's finite-horizon objective, SHAC's own tasks discount),
    per-env bootstrap values γ^h V(s_{t0+h}, t0+h) (zero at the horizon or without critics), the
    final state, and the (detached, undiscounted) trajectory for critic training.

    An env may add a policy-loss term per step (``env.last_loss_term``, [N] or None after each
    step; the safeguards' regulariser c_reg·MSE(a_safe, a), SafeGBPO eq 45): it is subtracted,
    undiscounted, from the reward sum only — so it enters L_R and g = ∇L_R with the same weight
    per step as the reward, and never the trajectory's rewards (critic targets, logged returns)
    or the critics' bootstraps."""
    sum_r = torch.zeros(state.shape[0], device=state.device)
    sum_c = torch.zeros_like(sum_r)
    observations, rewards, costs = [], [], []
    for k in range(h):
        obs = env.observe(state)
        observations.append(obs.detach())
        action = policy.rsample(obs, None if noise is None else noise[k])
        state, r, c = env.step(state, action)
        sum_r, sum_c = sum_r + gamma ** k * r, sum_c + gamma ** k * c
        loss_term = getattr(env, "last_loss_term", None)
        if loss_term is not None:
            sum_r = sum_r - loss_term
        rewards.append(r.detach())
        costs.append(c.detach())
    obs_end = env.observe(state)
    observations.append(obs_end.detach())
    boot_r = boot_c = torch.zeros_like(sum_r)
    if critics is not None and t0 + h < horizon:
        z = policy.normalised(obs_end)
        boot_r, boot_c = gamma ** h * critics[0](z, t0 + h), gamma ** h * critics[1](z, t0 + h)
    traj = {"obs": torch.stack(observations), "reward": torch.stack(rewards), "cost": torch.stack(costs),
            "t0": t0}
    return sum_r, sum_c, boot_r, boot_c, state, traj


def pre_squash_actions(policy: GaussianPolicy, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u_t = μ_θ(s_t) + σ ε_t of a rollout (obs [h+1, N, d] from ``rollout_window``, noise [h, N, a]):
    the pre-tanh samples, whose density carries the score (the tanh Jacobian has no θ)."""
    with torch.no_grad():
        return policy.net(policy.normalised(obs[:-1])) + policy.log_std.exp() * noise


def zobg_gradients(policy: GaussianPolicy, obs: torch.Tensor, u: torch.Tensor,
                   returns: list[torch.Tensor]) -> list[np.ndarray]:
    """Eq 69, one gradient per return tensor [N]: 1/N Σ_i Σ_t ∇_θ log π_θ(u_t^i | s_t^i) R(τ_i), with
    the visited states and sampled actions held fixed. No baseline (eq 69 literally)."""
    logp = policy.log_prob(obs[:-1], u).sum(0)  # [N]: Σ_t log π over each trajectory
    params = list(policy.parameters())
    grads = []
    for k, ret in enumerate(returns):
        surrogate = (logp * ret.detach()).mean()
        grads.append(flat_grad(surrogate, params, retain_graph=k < len(returns) - 1)
                     .cpu().numpy().astype(np.float64))
    return grads


def zobg_gradient(policy: GaussianPolicy, obs: torch.Tensor, u: torch.Tensor, returns: torch.Tensor) -> np.ndarray:
    """Eq 69 for one return tensor (``zobg_gradients``)."""
    return zobg_gradients(policy, obs, u, [returns])[0]


def window_gradients(env, policy: GaussianPolicy, state: torch.Tensor, t0: int, h: int, horizon: int,
                     noise: torch.Tensor | None, critics=None, gamma: float = 1.0, estimator: str = "fobg"):
    """One window (``rollout_window``'s outputs) with its objectives L_R, L_C (eq 55-56: batch
    means of window sum + bootstrap) and their gradients g, q by

    * ``fobg``: back-propagation through the simulator and the critics (eq 57-64), or
    * ``zobg``: the score function of eq 69 on the same window, R(τ_i) = the window's reward
      (cost) sum plus the critic's bootstrap at the window's end, i.e. the per-trajectory target
      whose batch mean FoBG differentiates. The rollout keeps no graph; no baseline. The window
      replaces eq 69's whole trajectory: the realised episode prefix is constant in the window's
      actions and would only add variance.

    Returns (sum_r, sum_c, boot_r, boot_c, final state, traj, l_r, l_c, g, q); l_r, l_c are 0-d
    tensors, g, q numpy vectors."""
    zobg = estimator == "zobg"
    if zobg and noise is None:
        raise ValueError("gradient_estimator zobg needs a stochastic policy (noise)")
    with torch.set_grad_enabled(not zobg):
        sum_r, sum_c, boot_r, boot_c, state, traj = rollout_window(
            env, policy, state, t0, h, horizon, noise, critics, gamma)
    ret_r, ret_c = sum_r + boot_r, sum_c + boot_c
    l_r, l_c = ret_r.mean(), ret_c.mean()
    if zobg:
        u = pre_squash_actions(policy, traj["obs"], noise)
        g, q = zobg_gradients(policy, traj["obs"], u, [ret_r, ret_c])
    else:
        g, q = objective_gradients(l_r, l_c, list(policy.parameters()))
    return sum_r, sum_c, boot_r, boot_c, state, traj, l_r, l_c, g, q


def objective_gradients(l_r: torch.Tensor, l_c: torch.Tensor, params) -> tuple[np.ndarray, np.ndarray]:
    g = flat_grad(l_r, params, retain_graph=l_c.requires_grad)
    # a cost with no path to θ (e.g. a 0/1 violation indicator and no critic) has zero gradient
    q = flat_grad(l_c, params) if l_c.requires_grad else torch.zeros_like(g)
    return g.cpu().numpy(), q.cpu().numpy()


def td_lambda_targets(critic: TimeValue, obs_normalised: torch.Tensor, rewards: torch.Tensor, t0: int,
                      horizon: int, lam: float, gamma: float = 1.0) -> torch.Tensor:
    """G^λ_t for a window (eq 67; discounted when γ < 1) from rewards [h, N] and observations
    [h+1, N, d]."""
    h = rewards.shape[0]
    with torch.no_grad():
        times = torch.arange(t0, t0 + h + 1, device=rewards.device, dtype=rewards.dtype)
        values = critic(obs_normalised, times[:, None])  # [h+1, N]
        values[times >= horizon] = 0.0  # V(s, T) = 0
    no_end = torch.zeros_like(rewards, dtype=torch.bool)
    _, targets = gae(rewards, values[:-1], values[1:], no_end, gamma=gamma, lam=lam)
    return targets
