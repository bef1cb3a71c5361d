"""Replay-buffer actor for off-policy learners: env hosts' rollout batches go in (straight from
the hosts, never through the driver), minibatches go out to the learner.

Storage is a ring of ``capacity`` n-step transitions (s, u, Σγᵏr, Σγᵏc, γⁿ(1 − terminal), s'),
preallocated on the first batch, so memory is bounded and stated: capacity × (2·obs_dim +
act_dim + 3) float32 numbers. n-step sums stop at an episode's end (bootstrapping a truncated
one from its final observation) and at a fragment's end (bootstrapping from the last obs).
"""
from __future__ import annotations

import numpy as np

from saferl.actors.process import ActorProcess
from saferl.batch import next_observations

FIELDS = ("obs", "act", "reward", "cost", "discount", "next_obs")


def n_step_transitions(batch: dict, n: int, gamma: float) -> dict:
    """Flatten a rollout batch [T, N] into n-step transitions [T·N], less the steps marked invalid
    (episodes skipped for NaN/Inf data: zeroed and terminated, so no valid sum reaches them)."""
    reward, cost = batch["reward"], batch["cost"]
    end = batch["terminated"] | batch["truncated"]
    T, N = reward.shape
    t = np.repeat(np.arange(T)[:, None], N, axis=1)
    col = np.broadcast_to(np.arange(N), (T, N))
    ret_r, ret_c = np.zeros((T, N)), np.zeros((T, N))
    scale, last = np.ones((T, N)), t.copy()
    active = np.ones((T, N), bool)
    for k in range(n):
        tk = np.minimum(t + k, T - 1)
        active &= t + k < T
        ret_r += np.where(active, scale * reward[tk, col], 0.0)
        ret_c += np.where(active, scale * cost[tk, col], 0.0)
        last = np.where(active, tk, last)
        scale = np.where(active, scale * gamma, scale)
        active &= ~end[tk, col]
    out = {"obs": batch["obs"], "act": batch["act"], "reward": ret_r, "cost": ret_c,
           "discount": scale * ~batch["terminated"][last, col],
           "next_obs": next_observations(batch)[last, col]}
    keep = batch["valid"].reshape(-1) if "valid" in batch else slice(None)  # no skipped episode's steps
    return {k: np.asarray(v, np.float32).reshape(T * N, *np.shape(v)[2:])[keep] for k, v in out.items()}


class CostNormaliser:
    """OmniSafe's ``CostNormalize`` (its ``Normalizer`` with clip 5), for the costs the critics learn
    from: the costs of each env step, of all envs together, are merged into a running mean and
    unbiased variance, then each is replaced by (c − mean) / max(std, 0.01), clipped to ±5, with the
    statistics that include it (the raw cost while fewer than two costs are merged). Episode costs,
    and so the multiplier, stay raw, as OmniSafe's ``original_cost``."""
    CLIP, STD_FLOOR = 5.0, 0.01

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0  # of the merged costs: n, Σc, Σc²

    def __call__(self, cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Costs [T, N] of T successive env steps, normalised step by step; invalid (skipped) steps
        are left out of the statistics."""
        c = np.where(valid, cost, 0.0).astype(np.float64)
        n = self.count + np.cumsum(valid.sum(1))
        total = self.total + np.cumsum(c.sum(1))
        squares = self.squares + np.cumsum((c ** 2).sum(1))
        mean = total / np.maximum(n, 1)
        var = np.maximum(squares - n * mean ** 2, 0.0) / np.maximum(n - 1, 1)
        z = np.clip((cost - mean[:, None]) / np.maximum(np.sqrt(var), self.STD_FLOOR)[:, None], -self.CLIP, self.CLIP)
        if len(n):
            self.count, self.total, self.squares = int(n[-1]), float(total[-1]), float(squares[-1])
        return np.where((n > 1)[:, None], z, cost).astype(np.float32)

    def state_dict(self) -> dict:
        return {"count": self.count, "total": self.total, "squares": self.squares}

    def load_state_dict(self, sd: dict) -> None:
        self.count, self.total, self.squares = sd["count"], sd["total"], sd["squares"]


class ReplayBuffer(ActorProcess):
    def __init__(self, capacity: int, n_step: int, gamma: float, seed: int, cost_normalize: bool = False):
        self.capacity, self.n_step, self.gamma = capacity, n_step, gamma
        self.rng = np.random.default_rng(seed)
        self.data: dict[str, np.ndarray] = {}
        self.pos = self.size = 0
        self.cost_norm = CostNormaliser() if cost_normalize else None

    def add(self, *batches: dict) -> int:
        """The hosts' rollout batches of one iteration (the same env steps, side by side)."""
        if self.cost_norm is not None:
            batches = self._normalise_costs(batches)
        for batch in batches:
            self._put(n_step_transitions(batch, self.n_step, self.gamma))
        return self.size

    def _normalise_costs(self, batches: tuple[dict, ...]) -> list[dict]:
        """Every host's envs at step t count as one vector env's step t, as in OmniSafe with
        ``vector_env_nums`` envs."""
        valid = [b["valid"] if "valid" in b else np.ones(b["cost"].shape, bool) for b in batches]
        if len({b["cost"].shape[0] for b in batches}) > 1:  # fragments of different lengths: one by one
            return [{**b, "cost": self.cost_norm(b["cost"], v)} for b, v in zip(batches, valid)]
        z = self.cost_norm(np.concatenate([b["cost"] for b in batches], 1), np.concatenate(valid, 1))
        cuts = np.cumsum([b["cost"].shape[1] for b in batches])[:-1]
        return [{**b, "cost": zi} for b, zi in zip(batches, np.split(z, cuts, axis=1))]

    def _put(self, tr: dict) -> None:
        if not self.data:
            self.data = {k: np.empty((self.capacity, *v.shape[1:]), np.float32) for k, v in tr.items()}
        n = len(tr["obs"])
        idx = (self.pos + np.arange(n)) % self.capacity  # a batch larger than capacity keeps its tail
        for k, v in tr.items():
            self.data[k][idx] = v
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, num_batches: int, batch_size: int) -> dict:
        """``num_batches`` minibatches of uniform draws: arrays [num_batches, batch_size, ...]."""
        if self.size == 0:
            raise RuntimeError("replay buffer is empty: sample after the first rollout")
        idx = self.rng.integers(0, self.size, (num_batches, batch_size))
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"data": {k: v[:self.size] for k, v in self.data.items()}, "pos": self.pos,
                "size": self.size, "rng": self.rng.bit_generator.state,
                **({"cost_norm": self.cost_norm.state_dict()} if self.cost_norm is not None else {})}

    def load_state_dict(self, sd: dict) -> None:
        self.data = {}
        if sd["size"]:
            self.data = {k: np.empty((self.capacity, *v.shape[1:]), np.float32) for k, v in sd["data"].items()}
            for k, v in sd["data"].items():
                self.data[k][:sd["size"]] = v
        self.pos, self.size = sd["pos"], sd["size"]
        self.rng.bit_generator.state = sd["rng"]
        if self.cost_norm is not None and "cost_norm" in sd:
            self.cost_norm.load_state_dict(sd["cost_norm"])
