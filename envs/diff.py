"""Differentiable torch task protocol, and its adapter to the vectorised numpy protocol.

A differentiable task is batched and functional so gradients flow through whole trajectories:

    initial_state(n, generator) -> state [n, ...]
    observe(state) -> obs [n, obs_dim]
    step(state, action) -> next_state, reward [n], cost [n]     (all differentiable)

Episodes have a fixed horizon (``max_episode_steps``); a task with an absorbing failure state
(Brax's ant falling over) also defines ``alive(state) -> [n] bool``. ``TorchVecEnv`` runs the
same task without gradients behind the numpy protocol, so sampling algorithms and evaluation use
it too; there an env that stops being alive *terminates* (and resets), so sampling learners do
not spend samples on frozen states and see true episode lengths.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from saferl.envs.vector import EpisodeStats


class PicklableGenerators:
    """Pickling for an env that holds CPU ``torch.Generator``s (which do not pickle): each
    attribute named in ``rng_attrs`` travels as its generator's state and is rebuilt on load
    (so a copy continues the same stream); those in ``transient_attrs`` travel as None."""

    rng_attrs: tuple[str, ...] = ()
    transient_attrs: tuple[str, ...] = ()

    def __getstate__(self):
        state = {**self.__dict__, **dict.fromkeys(self.transient_attrs)}
        for name in self.rng_attrs:
            state[name] = state[name].get_state()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name in self.rng_attrs:
            gen = torch.Generator()
            gen.set_state(state[name])
            setattr(self, name, gen)


class DiffEnv:
    obs_dim: int
    act_dim: int
    max_episode_steps: int
    act_low = -1.0
    act_high = 1.0

    def initial_state(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def step(self, state: torch.Tensor, action: torch.Tensor):
        raise NotImplementedError  # abstract


class TorchVecEnv:
    """Numpy protocol over a batched DiffEnv (auto-reset at the horizon = truncation)."""

    def __init__(self, env: DiffEnv, num_envs: int):
        self.env, self.num_envs = env, num_envs
        self.obs_dim, self.act_dim = env.obs_dim, env.act_dim
        self.act_low = np.full(env.act_dim, env.act_low, np.float32)
        self.act_high = np.full(env.act_dim, env.act_high, np.float32)
        self.max_episode_steps = env.max_episode_steps
        self.n_hazards = getattr(env, "n_hazards", 0)
        self.stats = EpisodeStats(num_envs)

    def reset(self, seed: int) -> np.ndarray:
        self.gen = torch.Generator().manual_seed(int(seed))
        self.state = self.env.initial_state(self.num_envs, self.gen)
        self.t = np.zeros(self.num_envs, dtype=np.int64)
        self.stats = EpisodeStats(self.num_envs)
        return self._obs(self.state)

    def _obs(self, state) -> np.ndarray:
        return self.env.observe(state).numpy().astype(np.float32)

    @torch.no_grad()
    def step(self, actions: np.ndarray):
        a = torch.as_tensor(np.clip(actions, self.act_low, self.act_high), dtype=torch.float32)
        self.state, r, c = self.env.step(self.state, a)
        rew, cost = r.numpy().astype(np.float32), c.numpy().astype(np.float32)
        self.t += 1
        self.stats.add(rew, cost)
        alive = getattr(self.env, "alive", None)
        term = np.zeros(self.num_envs, bool) if alive is None else ~alive(self.state).cpu().numpy()
        trunc = (self.t >= self.max_episode_steps) & ~term
        obs = self._obs(self.state)
        final_obs, episodes = {}, []
        done = np.flatnonzero(term | trunc)
        if done.size:
            fresh = self.env.initial_state(done.size, self.gen)
            self.state = self.state.clone()
            self.state[torch.as_tensor(done)] = fresh
            for i in done:
                final_obs[int(i)] = obs[i].copy()
                episodes.append(self.stats.end(i))
            self.t[done] = 0
            obs = self._obs(self.state)
        return obs, rew, cost, term, trunc, {"final_obs": final_obs, "episodes": episodes}

    def get_state(self) -> dict:
        """Everything the next steps depend on (checkpoints: a resumed run continues these episodes)."""
        return {**copy.deepcopy({"state": self.state, "t": self.t, "stats": vars(self.stats)}),
                "gen": self.gen.get_state()}

    def set_state(self, sd: dict) -> None:
        self.state, self.t = sd["state"], np.array(sd["t"])  # copies: Ray hands arrays over read-only
        vars(self.stats).update({k: np.array(v) for k, v in sd["stats"].items()})
        self.gen.set_state(sd["gen"])

    def reset_env(self, i: int) -> np.ndarray:
        """Start a fresh episode in env ``i`` alone, discarding its running stats (a skipped
        episode); returns its first observation."""
        self.stats.end(i)
        self.state = self.state.clone()
        self.state[torch.as_tensor([i])] = self.env.initial_state(1, self.gen)
        self.t[i] = 0
        return self._obs(self.state)[i]

    def close(self) -> None:
        pass
