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

import queue
import threading
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


class _ResetPool:
    """Envs being reset in a background thread, handed out FIFO.

    A Safety-Gymnasium navigation reset rebuilds the MuJoCo world (~0.9 s). Swapping in a spare
    that was reset ahead of time keeps the other envs of the batch stepping; the background
    thread does most of its work while the host is idle (the learner is updating). Seeds are
    assigned when an env is queued, so the sequence of episodes is reproducible.
    """

    def __init__(self):
        self._todo: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            env, seed = self._todo.get()
            if env is None:
                return
            try:
                self._ready.put((env, env.reset(seed), None))
            except Exception as err:  # surfaced to the stepping thread by get()
                self._ready.put((env, None, err))

    def put(self, env, seed: int) -> None:
        self._todo.put((env, seed))

    def get(self):
        env, obs, err = self._ready.get()
        if err is not None:
            raise err
        return env, obs

    def close(self) -> None:
        self._todo.put((None, None))


class VecEnv:
    """N single envs stepped in one process, with auto-reset, episode stats and optional
    pre-reset spares (see ``_ResetPool``)."""

    def __init__(self, make_env: Callable[[], object], num_envs: int, spares: int = 0):
        self.num_envs, self.spares = num_envs, spares
        self.envs = [make_env() for _ in range(num_envs)]
        self._spare_envs = [make_env() for _ in range(spares)]
        e = self.envs[0]
        self.obs_dim, self.act_dim = e.obs_dim, e.act_dim
        self.act_low, self.act_high = e.act_low, e.act_high
        self.max_episode_steps = e.max_episode_steps
        self.stats = EpisodeStats(num_envs)
        self._pool = _ResetPool() if spares else None
        self._next_seed = 0

    def _seed(self) -> int:
        self._next_seed += 1
        return self._base_seed + self._next_seed

    def reset(self, seed: int) -> np.ndarray:
        self._base_seed, self._next_seed = int(seed) * 1_000_003, 0
        self.stats = EpisodeStats(self.num_envs)
        obs = np.stack([env.reset(self._seed()) for env in self.envs])
        if self._pool is not None:
            # the pool always holds `spares` envs: take them back and requeue with fresh seeds
            spare = self._spare_envs or [self._pool.get()[0] for _ in range(self.spares)]
            for env in spare:
                self._pool.put(env, self._seed())
            self._spare_envs = []
        return obs.astype(np.float32)

    def _restart(self, i: int) -> np.ndarray:
        if self._pool is None:
            return self.envs[i].reset(self._seed())
        self._pool.put(self.envs[i], self._seed())
        self.envs[i], obs = self._pool.get()
        return obs

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
            obs[i] = self._restart(i)
        return obs, rew, cost, term, trunc, {"final_obs": final_obs, "episodes": episodes}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        for env in self.envs:
            getattr(env, "close", lambda: None)()
