"""Env-host actor: a vectorised environment plus numpy policy inference, one Ray call per
rollout fragment.

Imports numpy, stdlib and saferl's numpy-only modules: Safety-Gymnasium hosts run this module in
the Safety-Gymnasium interpreter (``runtime_env={"py_executable": ...}``), which has numpy 1.x
and no torch. Torch tasks are built only when such a task is asked for.
"""
from __future__ import annotations

import os
import time

import numpy as np

from saferl import registry
from saferl.actors import np_policy
from saferl.envs.np_compat import pickle_arrays_as_numpy2

# Under numpy 1 (the Safety-Gymnasium interpreter): unpickle the numpy 2 arrays the driver and
# learners send, and pickle ours under numpy 2's module names (no deprecation warnings there).
pickle_arrays_as_numpy2()


def make_vec_env(task_name: str, num_envs: int, render_mode: str | None = None):
    spec = registry.get_task(task_name)
    if spec.kind == "safety_gymnasium":
        from saferl.envs.safety_gym import make_env  # only inside the Safety-Gymnasium interpreter
        from saferl.envs.vector import VecEnv

        return VecEnv(lambda: make_env(spec.entry, seed=0, render_mode=render_mode, **spec.kwargs), num_envs)
    if spec.kind == "gymnasium":
        from saferl.envs.gym_tasks import GymCostEnv
        from saferl.envs.vector import VecEnv

        kwargs = {**spec.kwargs, **({"render_mode": render_mode} if render_mode else {})}
        if render_mode and not os.environ.get("DISPLAY"):  # headless MuJoCo: Mesa's (software) EGL
            os.environ.setdefault("MUJOCO_GL", "egl")
        return VecEnv(lambda: GymCostEnv(spec.entry, max_episode_steps=spec.max_episode_steps, **kwargs), num_envs)
    import importlib

    from saferl.envs.diff import TorchVecEnv

    module, cls = spec.entry.split(":")
    return TorchVecEnv(getattr(importlib.import_module(module), cls)(**spec.kwargs), num_envs)


def next_observations(batch: dict) -> np.ndarray:
    """[T, N, d] observation after each step of a ``rollout`` batch, with the final observation
    of ended episodes substituted (the stored next obs is already a reset)."""
    nxt = np.concatenate([batch["obs"][1:], batch["last_obs"][None]], axis=0)
    if len(batch["final_idx"]):
        nxt[batch["final_idx"][:, 0], batch["final_idx"][:, 1]] = batch["final_obs"]
    return nxt


class EnvHost:
    def __init__(self, task_name: str, num_envs: int, seed: int, host_index: int = 0,
                 render_mode: str | None = None):
        self.vec = make_vec_env(task_name, num_envs, render_mode)  # "rgb_array": episode_frames
        self.host_index = host_index
        self.low, self.high = np.asarray(self.vec.act_low, np.float32), np.asarray(self.vec.act_high, np.float32)
        self.reset(seed)

    def spec(self) -> dict:
        v = self.vec
        return {"obs_dim": v.obs_dim, "act_dim": v.act_dim, "act_low": v.act_low,
                "act_high": v.act_high, "max_episode_steps": v.max_episode_steps, "num_envs": v.num_envs,
                "n_hazards": getattr(v, "n_hazards", 0)}

    def ping(self) -> int:
        return self.host_index

    # -- the plain protocol (tests, tools) ------------------------------------------------------
    def reset(self, seed: int) -> np.ndarray:
        self.rng = np.random.default_rng([int(seed), self.host_index])
        self.obs = self.vec.reset(int(np.random.SeedSequence([int(seed), self.host_index]).generate_state(1)[0]))
        return self.obs

    def step(self, actions: np.ndarray):
        out = self.vec.step(np.asarray(actions, np.float32))
        self.obs = out[0]
        return out

    # -- rollouts ------------------------------------------------------------------------------
    def _act(self, policy: dict, obs: np.ndarray, deterministic: bool = False):
        """Policy inference; squashed actions in [−1, 1] are mapped onto the task's box."""
        action, u, logp = np_policy.act(policy, obs, self.rng, deterministic)
        if policy.get("squash") or policy.get("uniform"):
            action = self.low + (action + 1.0) * 0.5 * (self.high - self.low)
        return action, u, logp

    def rollout(self, policy: dict, num_steps: int) -> tuple[dict, dict]:
        """Step every env ``num_steps`` times with the given policy weights.

        Returns arrays shaped [T, N, ...]: obs, act (the Gaussian sample u), logp, reward, cost,
        terminated, truncated; ``last_obs`` [N, d]; ``final_idx`` [K, 2] (t, env) with
        ``final_obs`` [K, d] for episodes that ended (their next obs is a fresh reset);
        and, separately, a small summary: finished episodes' return/cost/length and timings
        (the coordinator reads only the summary; the batch goes straight to the learner)."""
        n, d, a = self.vec.num_envs, self.vec.obs_dim, self.vec.act_dim
        buf = {"obs": np.empty((num_steps, n, d), np.float32), "act": np.empty((num_steps, n, a), np.float32),
               "logp": np.empty((num_steps, n), np.float32), "reward": np.empty((num_steps, n), np.float32),
               "cost": np.empty((num_steps, n), np.float32), "terminated": np.empty((num_steps, n), bool),
               "truncated": np.empty((num_steps, n), bool)}
        final_idx, final_obs, episodes = [], [], []
        t_infer = t_env = 0.0
        for t in range(num_steps):
            t0 = time.perf_counter()
            action, u, logp = self._act(policy, self.obs)
            t1 = time.perf_counter()
            obs, rew, cost, term, trunc, info = self.vec.step(action)
            t_env += time.perf_counter() - t1
            t_infer += t1 - t0
            buf["obs"][t], buf["act"][t], buf["logp"][t] = self.obs, u, logp
            buf["reward"][t], buf["cost"][t], buf["terminated"][t], buf["truncated"][t] = rew, cost, term, trunc
            for i, fo in info["final_obs"].items():
                final_idx.append((t, i))
                final_obs.append(fo)
            episodes += info["episodes"]
            self.obs = obs
        buf["last_obs"] = self.obs.copy()
        buf["final_idx"] = np.asarray(final_idx, np.int64).reshape(-1, 2)
        buf["final_obs"] = np.asarray(final_obs, np.float32).reshape(-1, d)
        summary = {"episodes": episodes, "inference_s": t_infer, "env_s": t_env}
        return buf, summary

    def evaluate(self, policy: dict, episodes: int, deterministic: bool = True,
                 attack_rate: float = 0.0) -> list[dict]:
        """Run until ``episodes`` episodes finish (fresh resets first); returns their stats.

        ``attack_rate`` α: per env and step, with probability α the policy's action is replaced
        by one drawn uniformly from the action box (the host's seeded rng: reproducible; α = 0
        draws nothing, so evaluation is unchanged)."""
        if not 0.0 <= attack_rate <= 1.0:
            raise ValueError(f"attack_rate must be in [0, 1], got {attack_rate}")
        if attack_rate > 0 and not (np.isfinite(self.low).all() and np.isfinite(self.high).all()):
            raise ValueError("random-action attacks need a bounded action box")
        self.obs = self.vec.reset(int(self.rng.integers(2**31)))
        done: list[dict] = []
        while len(done) < episodes:
            action, _, _ = self._act(policy, self.obs, deterministic)
            if attack_rate > 0:
                hit = self.rng.random(action.shape[0]) < attack_rate
                noise = self.rng.uniform(self.low, self.high, action.shape).astype(np.float32)
                action = np.where(hit[:, None], noise, action)
            self.obs, *_, info = self.vec.step(action)
            done += info["episodes"]
        return done[:episodes]

    def episode_frames(self, policy: dict, deterministic: bool = True, max_frames: int | None = None) -> dict:
        """One episode of env 0 with the policy (seeded from the host's rng), rendered: ``frames``
        uint8 [T + 1, H, W, 3] (the initial state, then after each of the T steps; at most
        ``max_frames``, the episode cut short), per-step ``reward`` and ``cost`` [T], ``length``
        T and whether it ``ended``. Safety-Gymnasium/Gymnasium hosts need ``render_mode="rgb_array"``;
        torch tasks are drawn with matplotlib (``saferl.envs.render``)."""
        from saferl.envs.render import EpisodeRenderer

        env = EpisodeRenderer(self.vec)
        obs, frames, rewards, costs, done = env.reset(int(self.rng.integers(2**31))), [env.frame()], [], [], False
        while not done and (max_frames is None or len(frames) < max_frames):
            action, _, _ = self._act(policy, obs[None], deterministic)
            obs, rew, cost, done = env.step(action[0])
            frames.append(env.frame())
            rewards.append(rew)
            costs.append(cost)
        return {"frames": np.stack(frames), "reward": np.asarray(rewards, np.float32),
                "cost": np.asarray(costs, np.float32), "length": len(rewards), "ended": done}

    def close(self) -> None:
        self.vec.close()
