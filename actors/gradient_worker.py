"""Gradient worker: a differentiable env host (DESIGN.md §4).

Given the learner's policy weights it rolls out its shard of envs through the differentiable
simulator, back-propagates, and returns J_R, J_C, the flattened gradients g = ∇J_R,
q = ∇J_C, and observation moments (for the policy's running normaliser). The learner averages
shards weighted by their env counts, so more workers = more envs per gradient.
"""
from __future__ import annotations

import importlib

import torch

from saferl import registry
from saferl.learners.analytic import bptt_objectives, common_randomness, objective_gradients
from saferl.learners.networks import GaussianPolicy, pick_device


def make_diff_env(task_name: str):
    spec = registry.get_task(task_name)
    module, cls = spec.entry.split(":")
    return getattr(importlib.import_module(module), cls)(**spec.kwargs)


class GradientWorker:
    def __init__(self, task_name: str, env_offset: int, num_envs: int, total_envs: int, seed: int,
                 policy_arch: dict, device: str = "auto"):
        self.env = make_diff_env(task_name)
        self.shard = slice(env_offset, env_offset + num_envs)
        self.total_envs, self.seed = total_envs, seed
        self.device = pick_device(device)
        self.policy = GaussianPolicy(**policy_arch).to(self.device)

    def ping(self) -> int:
        return self.shard.start

    def compute(self, policy_state: dict, iteration: int, horizon: int, stochastic: bool = True) -> dict:
        self.policy.load_state_dict(policy_state)
        states, noise = common_randomness(self.seed, iteration, self.total_envs, self.env, horizon)
        state = states[self.shard].to(self.device)
        noise = noise[:, self.shard].to(self.device) if stochastic else None
        j_r, j_c, obs = bptt_objectives(self.env, self.policy, state, noise, horizon)
        g, q = objective_gradients(j_r, j_c, list(self.policy.parameters()))
        return {"j_r": j_r.item(), "j_c": j_c.item(), "g": g, "q": q, "n": state.shape[0],
                "obs_count": obs.shape[0], "obs_mean": obs.mean(0).cpu().numpy(),
                "obs_var": obs.var(0, unbiased=False).cpu().numpy()}
