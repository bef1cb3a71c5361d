"""Gymnasium tasks with a cost signal, behind the single-env adapter protocol of
``envs/vector.py`` (main interpreter: gymnasium 1.x, mujoco 4).

Non-differentiable Swimmer (CGPO paper, Appendix F.4.1): gymnasium's Swimmer, reward
r = v_x + β_ctrl‖a‖² (gymnasium's forward and control terms), cost c_t = ‖v‖, T = 300, limit 150.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np

COSTS = {
    # planar speed of the body: ‖(v_x, v_y)‖ (Zhang et al. 2020's velocity constraint)
    "speed": lambda info: float(np.hypot(info["x_velocity"], info.get("y_velocity", 0.0))),
}


class GymCostEnv:
    def __init__(self, env_id: str, cost: str, max_episode_steps: int, seed: int = 0, **make_kwargs):
        self.env = gym.make(env_id, max_episode_steps=max_episode_steps, **make_kwargs)
        self.cost_fn = COSTS[cost]
        self.obs_dim = int(np.prod(self.env.observation_space.shape))
        self.act_dim = int(np.prod(self.env.action_space.shape))
        self.act_low = self.env.action_space.low.astype(np.float32)
        self.act_high = self.env.action_space.high.astype(np.float32)
        self.max_episode_steps = max_episode_steps
        self.env.action_space.seed(seed)

    def reset(self, seed: int | None = None) -> np.ndarray:
        return np.asarray(self.env.reset(seed=seed)[0], np.float32)

    def step(self, action: np.ndarray):
        a = np.clip(action, self.act_low, self.act_high)
        obs, reward, terminated, truncated, info = self.env.step(a)
        return (np.asarray(obs, np.float32), float(reward), self.cost_fn(info), bool(terminated),
                bool(truncated), info)

    def render(self):
        return self.env.render()

    def close(self) -> None:
        self.env.close()
