"""Generalised advantage estimation (Schulman et al. 2016), the one implementation used for
reward and cost alike.

    δ_t = x_t + γ V'_t − V_t,        A_t = δ_t + γ λ (1 − end_t) A_{t+1}

``next_values`` V'_t is the value of the true next state (of ``final_obs`` when the episode
ended, zero when it terminated), so truncation by a time limit bootstraps correctly.
"""
from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
        episode_end: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All inputs [T, N]; returns (advantages, value targets = advantages + values)."""
    deltas = rewards + gamma * next_values - values
    carry = (1.0 - episode_end.to(rewards.dtype)) * gamma * lam
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = deltas[t] + carry[t] * running
        adv[t] = running
    return adv, adv + values
