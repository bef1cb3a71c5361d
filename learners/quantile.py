"""The distributional (quantile) critic and its CVaR value, for sTRPO's unsafe policy (sTRPO paper,
§4.1, eq 4: "replacing the standard value estimate in advantage computation with a CVaR-based
estimator", citing Yang et al. 2019's quantile-function critics).

The critic outputs N quantiles θ_1..θ_N of the discounted return distribution Z(s) at the
fractions τ_i = (2i − 1) / 2N (QR-DQN, Dabney et al. 2018), trained with the quantile Huber loss

    L = E_s Σ_i E_j [ |τ_i − 1{u_ij < 0}| · ℓ_κ(u_ij) / κ ],   u_ij = y_j − θ_i(s)

against target atoms y_j. On-policy, the atoms are the sampled discounted return to the end of
the trajectory segment plus the discounted bootstrap quantiles at its end:

    y_t = x_t + γ [(1 − end_t) y_{t+1} + end_t (1 − term_t) θ(s'_t)]     (all N atoms at once)

with the batch's last step treated as an end (bootstrapped) — a TD(1) sample of Z(s_t).
The CVaR value is the mean of the upper α-tail, V_CVaR_α(s) = mean of the ⌈αN⌉ largest θ_i(s):
for a cost, the upper tail is the risky one.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from saferl.learners.networks import mlp


class QuantileCritic(nn.Module):
    def __init__(self, obs_dim: int, hidden: list[int], n_quantiles: int):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, n_quantiles])
        self.register_buffer("taus", (2 * torch.arange(n_quantiles, dtype=torch.float32) + 1) / (2 * n_quantiles))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantiles [..., N] of the return from (normalised) observations z."""
        return self.net(z)


class CVaRValue(nn.Module):
    """V(s) = CVaR_α of a quantile critic's distribution: the mean of its ⌈αN⌉ largest quantiles
    (sorted, since a regression fit need not be monotone). Shaped [..., 1] like a value critic,
    so ``onpolicy_base.advantages`` computes eq 4's TD residual and its GAE with it."""

    def __init__(self, quantiles: QuantileCritic, alpha: float):
        super().__init__()
        self.quantiles, self.alpha = quantiles, alpha

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return cvar(self.quantiles(z), self.alpha).unsqueeze(-1)


def cvar(quantiles: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean of the ⌈αN⌉ largest of N equally weighted quantiles (last axis)."""
    k = max(1, math.ceil(alpha * quantiles.shape[-1] - 1e-9))
    return quantiles.topk(k, dim=-1).values.mean(-1)


def quantile_huber_loss(pred: torch.Tensor, target: torch.Tensor, taus: torch.Tensor,
                        kappa: float = 1.0) -> torch.Tensor:
    """QR-DQN's loss: pred [B, N] quantiles at ``taus`` [N], target [B, M] atoms."""
    u = target.unsqueeze(1) - pred.unsqueeze(2)  # [B, N, M]
    huber = torch.where(u.abs() <= kappa, 0.5 * u ** 2, kappa * (u.abs() - 0.5 * kappa))
    weight = (taus.view(1, -1, 1) - (u.detach() < 0).to(u.dtype)).abs()
    return (weight * huber / kappa).mean(2).sum(1).mean()


@torch.no_grad()
def return_atoms(critic: QuantileCritic, norm, batch: dict, signal: str, gamma: float) -> torch.Tensor:
    """Target atoms y_t [T, N_env, N] (module docstring) for ``batch[signal]`` [T, N_env]."""
    x, end, term = batch[signal], batch["end"], batch["terminated"]
    boot = critic(norm(batch["next_obs"])) * (~term).unsqueeze(-1)  # [T, N_env, N]
    atoms = torch.empty_like(boot)
    nxt = boot[-1]
    for t in range(x.shape[0] - 1, -1, -1):
        cont = boot[t] if t == x.shape[0] - 1 else torch.where(end[t].unsqueeze(-1), boot[t], nxt)
        atoms[t] = x[t].unsqueeze(-1) + gamma * cont
        nxt = atoms[t]
    return atoms
