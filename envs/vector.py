"""The vectorised numpy protocol every env host speaks (numpy + stdlib only: this module runs
inside the Safety-Gymnasium interpreter too).

    reset(seed) -> obs [N, obs_dim]
    step(actions [N, act_dim]) -> obs, reward [N], cost [N], terminated [N], truncated [N], info

Auto-reset: when env i ends, ``obs[i]`` is already the first observation of its next episode and
``info["final_obs"][i]`` holds the last one (for bootstrapping truncated episodes);
``info["episodes"]`` lists the finished episodes' return, cost and length.

Single envs follow the adapter protocol of ``saferl.envs.safety_gym.SafetyGymEnv``:
``reset(seed) -> obs`` and ``step(a) -> obs, reward, cost, terminated, truncated, info``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


class EpisodeStats:
    """Running per-env return/cost/length; ``end(i)`` closes env i's episode."""

    def __init__(self, n: int):
        self.ret, self.cost, self.len = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)

    def add(self, reward: np.ndarray, cost: np.ndarray) -> None:
        self.ret += reward
        self.cost += cost
        self.len += 1

    def end(self, i: int) -> dict:
        ep = {"return": float(self.ret[i]), "cost": float(self.cost[i]), "length": int(self.len[i])}
        self.ret[i] = self.cost[i] = 0.0
        self.len[i] = 0
        return ep


class VecEnv:
    """N single envs stepped in one process, with auto-reset and episode stats.

    Resets happen inline: the Safety-Gymnasium adapter's fast reset (``envs/safety_gym.py``)
    makes a navigation reset a few milliseconds instead of ~1 s, so one env's reset no longer
    stalls the batch."""

    def __init__(self, make_env: Callable[[], object], num_envs: int):
        self.num_envs = num_envs
        self.envs = [make_env() for _ in range(num_envs)]
        e = self.envs[0]
        self.obs_dim, self.act_dim = e.obs_dim, e.act_dim
        self.act_low, self.act_high = e.act_low, e.act_high
        self.max_episode_steps = e.max_episode_steps
        self.n_hazards = getattr(e, "n_hazards", 0)
        self.stats = EpisodeStats(num_envs)
        self._next_seed = 0

    def _seed(self) -> int:
        """Episode k of this vector env is seeded (seed·1000003 + k) mod 2³¹: reproducible."""
        self._next_seed += 1
        return (self._base_seed + self._next_seed) % 2**31

    def reset(self, seed: int) -> np.ndarray:
        self._base_seed, self._next_seed = int(seed) * 1_000_003, 0
        self.stats = EpisodeStats(self.num_envs)
        return np.stack([env.reset(self._seed()) for env in self.envs]).astype(np.float32)

    def step(self, actions: np.ndarray):
        n = self.num_envs
        obs = np.empty((n, self.obs_dim), np.float32)
        rew, cost = np.empty(n, np.float32), np.empty(n, np.float32)
        term, trunc = np.zeros(n, bool), np.zeros(n, bool)
        final_obs, episodes = {}, []
        for i, env in enumerate(self.envs):
            obs[i], rew[i], cost[i], term[i], trunc[i], _ = env.step(actions[i])
        self.stats.add(rew, cost)
        for i in np.flatnonzero(term | trunc):
            final_obs[int(i)] = obs[i].copy()
            episodes.append(self.stats.end(i))
            obs[i] = self.envs[i].reset(self._seed())
        return obs, rew, cost, term, trunc, {"final_obs": final_obs, "episodes": episodes}

    def reset_env(self, i: int) -> np.ndarray:
        """Start a fresh episode in env ``i`` alone, discarding its running stats (a skipped
        episode); returns its first observation."""
        self.stats.end(i)
        return np.asarray(self.envs[i].reset(self._seed()), np.float32)

    def close(self) -> None:
        for env in self.envs:
            getattr(env, "close", lambda: None)()
