"""The records that cross between learners and env hosts, in both directions.

``RolloutBatch``: what an env host sends to a learner or the replay buffer. ``NumpyPolicy``: the
policy a learner sends to env hosts (and the inference server) to act with. numpy only, so that
actors, learners and the Safety-Gymnasium interpreter all import it without importing each other.
Both are plain dicts (Ray pickles them without copying the arrays); the TypedDicts name their
fields, shapes and meaning, for T steps of N envs with observation size d and action size a.
"""
from __future__ import annotations

from typing import NotRequired, TypedDict

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
    final_cost: np.ndarray  # [E] float64: its undiscounted cost, counted by the host from its first step,
    final_length: np.ndarray  # [E] int64: and its length (an episode may have begun in an earlier batch)
    # With the policy's ``obs_norm_per_step``: obs, last_obs and final_obs are normalised as the host
    # acted on them (statistics updated every step), and the raw observations come here:
    raw_obs: NotRequired[np.ndarray]  # [T, N, d] float32 (only then)


class NumpyPolicy(TypedDict, total=False):
    """The policy as ``actors/np_policy.py`` runs it: z = clip((o − obs_mean) / √(obs_var + 1e-8),
    ±obs_clip), an MLP over z, then one action head. Keys after ``squash`` select the head."""
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W [out, in], b [out]) per linear layer
    activation: str                 # between hidden layers: tanh | relu | elu
    obs_mean: np.ndarray            # [d] float32 (zeros without a normaliser)
    obs_var: np.ndarray             # [d] float32 (ones − 1e-8 without one)
    obs_clip: float                 # inf without one
    obs_count: float                # observations behind obs_mean / obs_var
    obs_norm_per_step: bool         # hosts update the statistics every step (np_policy.StepStatistics)
    log_std: np.ndarray             # [a]: state-independent log σ (zeros when a head gives σ)
    squash: bool                    # the env action is tanh(u)
    std_head: bool                  # SAC: the output's second half is log σ(s) ...
    log_std_bounds: tuple[float, float]  # ... clamped to these
    cholesky_head: bool             # CVPO: the output is μ and the lower triangle of L(s)
    min_diag: float                 # ... whose diagonal is softplus(·) + this
    action_noise: float             # TD3 / DDPG: tanh(μ(s)) + N(0, σ²), clipped to [−1, 1]
    act_dim: int                    # with a Cholesky head, action noise or ``uniform``
    uniform: bool                   # off-policy warm-up: uniform actions in the box


ROLLOUT_FIELDS = tuple(k for k in RolloutBatch.__annotations__ if k != "raw_obs")
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


def ended_episodes(batches: list[dict]) -> tuple[list[float], list[int]]:
    """Undiscounted cost and length of the episodes that ended in ``batches``, as the env hosts
    counted them from each episode's first step (which may lie in an earlier batch)."""
    return ([float(c) for b in batches for c in b["final_cost"]],
            [int(n) for b in batches for n in b["final_length"]])


def mean_step_cost(batches: list[dict]) -> float:
    """Mean per-step cost over the valid steps of ``batches`` (0.0 if none): the constraint
    estimate's fallback, × max_episode_steps, when no episode ended."""
    cost = np.concatenate([b["cost"][b["valid"]] if "valid" in b else b["cost"].ravel() for b in batches])
    return float(cost.mean()) if cost.size else 0.0


def merge_moments(mean, var, count, n, batch_mean, batch_var):
    """The running mean and (population) variance of ``count`` observations merged with ``n`` more
    of mean ``batch_mean`` and variance ``batch_var`` (parallel Welford; numpy arrays or torch
    tensors): (mean, var, count). The one rule for a ``NumpyPolicy``'s obs_mean / obs_var /
    obs_count, used by the learner's normaliser and by env hosts that update them every step."""
    delta, total = batch_mean - mean, count + n
    return mean + delta * n / total, (var * count + batch_var * n + delta ** 2 * count * n / total) / total, total
