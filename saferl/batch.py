"""The rollout batch: the record an env host sends to a learner or the replay buffer.

numpy only, so that actors and learners both import it without importing each other. A batch
is a plain dict (Ray pickles it without copying the arrays); ``RolloutBatch`` names its fields,
their shapes and meaning, for T steps of N envs with observation size d and action size a.
"""
from __future__ import annotations

from typing import TypedDict

import numpy as np


class RolloutBatch(TypedDict):
    obs: np.ndarray         # [T, N, d] float32: the observation each action was taken in
    act: np.ndarray         # [T, N, a] float32: the policy's sample u (squashing policies act tanh(u))
    logp: np.ndarray        # [T, N] float32: log π(u | obs) when acting
    reward: np.ndarray      # [T, N] float32
    cost: np.ndarray        # [T, N] float32
    terminated: np.ndarray  # [T, N] bool: the episode ended in a terminal state after this step
    truncated: np.ndarray   # [T, N] bool: the episode hit its time limit after this step
    valid: np.ndarray       # [T, N] bool: False on the steps of an episode skipped for invalid env data
    last_obs: np.ndarray    # [N, d]: the observation after the last step
    final_idx: np.ndarray   # [E, 2] int64: (t, env) of each episode that ended in the batch
    final_obs: np.ndarray   # [E, d] float32: its final observation (obs[t + 1] is already the reset)


ROLLOUT_FIELDS = tuple(RolloutBatch.__annotations__)
STEP_FIELDS = ROLLOUT_FIELDS[:8]  # the [T, N, ...] fields, written step by step


def step_buffers(num_steps: int, num_envs: int, obs_dim: int, act_dim: int) -> dict:
    """The per-step arrays of a batch of ``num_steps`` steps, to be filled in (``valid`` all True)."""
    t, n = num_steps, num_envs
    shapes = {"obs": (t, n, obs_dim), "act": (t, n, act_dim)}
    dtypes = {"terminated": bool, "truncated": bool, "valid": bool}
    out = {k: np.empty(shapes.get(k, (t, n)), dtypes.get(k, np.float32)) for k in STEP_FIELDS}
    out["valid"][:] = True
    return out


def next_observations(batch: dict) -> np.ndarray:
    """[T, N, d] observation after each step of a batch, with the final observation of ended
    episodes substituted (the stored next observation is already a reset)."""
    nxt = np.concatenate([batch["obs"][1:], batch["last_obs"][None]], axis=0)
    if len(batch["final_idx"]):
        nxt[batch["final_idx"][:, 0], batch["final_idx"][:, 1]] = batch["final_obs"]
    return nxt
