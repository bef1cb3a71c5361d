"""CGPO's FunctionEnv (CGPO paper, Appendix C.1 and F.4.1).

s_{t+1} = s_t + 0.2 a_t, a ∈ (−1, 1); reward and cost are both f(x_t) (eq 70),
f(x) = (x/10)² + 0.1 + 0.1 sin(8x/π); J_C = Σ_{t=0}^{99} f(x_t) ≤ 8 (eq 71).
The non-differentiable variant (eq 83) uses floor(x) in the quadratic term.

Choice not fixed by the paper: the initial state, x_0 ~ U(−5, 5) (wide enough that the
constraint binds: J_C of standing still at |x| = 5 is about 35).
"""
from __future__ import annotations

import math

import torch

from saferl.envs.diff import DiffEnv


class FunctionEnv(DiffEnv):
    obs_dim = 1
    act_dim = 1
    max_episode_steps = 100

    def __init__(self, floor: bool = False, init_range: float = 5.0):
        self.floor, self.init_range = floor, init_range

    def f(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.floor(x) if self.floor else x
        return (q / 10.0) ** 2 + 0.1 + 0.1 * torch.sin(8.0 * x / math.pi)

    def initial_state(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(n, 1, generator=generator) * 2 - 1) * self.init_range

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def step(self, state: torch.Tensor, action: torch.Tensor):
        value = self.f(state[:, 0])
        return state + 0.2 * action, value, value
