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
from saferl.actors.process import ActorProcess, safeguard_failures
from saferl.batch import step_buffers
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
    if spec.kind == "custom":  # your own env (envs/custom.py); its package came with py_modules
        from saferl.envs.custom import CustomEnv
        from saferl.envs.vector import VecEnv

        return VecEnv(lambda: CustomEnv(spec.entry, spec.max_episode_steps, render_mode=render_mode,
                                        **spec.kwargs), num_envs)
    import importlib

    from saferl.envs.diff import TorchVecEnv

    module, cls = spec.entry.split(":")
    return TorchVecEnv(getattr(importlib.import_module(module), cls)(**spec.kwargs), num_envs)


class EnvDataError(ValueError):
    """An env step returned a NaN/Inf observation, reward or cost (``checks.on_invalid: abort``);
    ``str(err)`` is one line naming the task, host, env and episode step."""


def _what(obs: np.ndarray, rew, cost) -> str:
    for name, v in (("reward", rew), ("cost", cost)):
        if not np.isfinite(v):
            return f"{name} is {float(v)}"
    return "observation is not finite" if not np.isfinite(obs).all() else "final observation is not finite"


class EnvHost(ActorProcess):
    def __init__(self, task_name: str, num_envs: int, seed: int, host_index: int = 0,
                 render_mode: str | None = None, on_invalid: str = "abort"):
        if on_invalid not in ("abort", "skip_episode"):
            raise ValueError(f"on_invalid must be 'abort' or 'skip_episode', got {on_invalid!r}")
        self.vec = make_vec_env(task_name, num_envs, render_mode)  # "rgb_array": episode_frames
        self.task_name, self.host_index, self.on_invalid = task_name, host_index, on_invalid
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
        self.ep_t = np.zeros(self.vec.num_envs, np.int64)  # steps into each env's episode
        return self.obs

    def get_state(self) -> dict | None:
        """Where the envs and the sampling stream are, for checkpoints (a resumed run continues the
        same episodes), or None where the envs cannot say (Safety-Gymnasium and Gymnasium MuJoCo
        envs: a resumed run starts fresh episodes there)."""
        if not hasattr(self.vec, "get_state"):
            return None
        return {"vec": self.vec.get_state(), "obs": self.obs, "ep_t": self.ep_t, "rng": self.rng.bit_generator.state}

    def set_state(self, sd: dict) -> None:
        self.vec.set_state(sd["vec"])
        self.obs, self.ep_t = np.array(sd["obs"]), np.array(sd["ep_t"])  # Ray's arrays are read-only
        self.rng.bit_generator.state = sd["rng"]

    def step(self, actions: np.ndarray):
        out = self.vec.step(np.asarray(actions, np.float32))
        self.obs = out[0]
        return out

    # -- bad input -----------------------------------------------------------------------------
    def _screen(self, obs, rew, cost, term, trunc, info) -> np.ndarray:
        """Check one vector step for NaN/Inf (vectorised; the ended envs' final observations too).
        ``abort``: raise ``EnvDataError``. ``skip_episode``: reset each bad env (``obs`` and ``info``
        are edited in place: its fresh observation, its ended episode and final obs dropped) and
        return their indices for the caller to mask out."""
        ok = np.isfinite(rew) & np.isfinite(cost) & np.isfinite(obs).all(axis=1)
        for i, fo in info["final_obs"].items():
            ok[i] &= bool(np.isfinite(fo).all())
        step = self.ep_t.copy()  # 0-based index of this step within each env's episode
        self.ep_t += 1
        self.ep_t[term | trunc] = 0
        if ok.all():
            return np.empty(0, np.int64)
        bad = np.flatnonzero(~ok)
        if self.on_invalid == "abort":
            i = int(bad[0])
            raise EnvDataError(f"env error: {self.task_name} host {self.host_index} env {i} step {int(step[i])}: "
                               f"{_what(obs[i], rew[i], cost[i])}")
        ended = np.flatnonzero(term | trunc)  # info["episodes"] is in this order
        info["episodes"] = [ep for i, ep in zip(ended, info["episodes"]) if ok[i]]
        for i in bad:
            info["final_obs"].pop(int(i), None)
            obs[i] = self.vec.reset_env(int(i))
            self.ep_t[i] = 0
        return bad

    # -- rollouts ------------------------------------------------------------------------------
    def _act(self, policy: dict, obs: np.ndarray, deterministic: bool = False):
        """Policy inference; squashed actions in [−1, 1] are mapped onto the task's box."""
        action, u, logp = np_policy.act(policy, obs, self.rng, deterministic)
        return np_policy.to_box(policy, action, self.low, self.high), u, logp

    def rollout(self, policy: dict, num_steps: int) -> tuple[dict, dict]:
        """Step every env ``num_steps`` times with the given policy weights.

        Returns a ``saferl.batch.RolloutBatch`` (its fields and shapes are named there); steps of
        an episode skipped for NaN/Inf data (``on_invalid="skip_episode"``) are zeroed, terminated
        and not ``valid``, so GAE and replay never see the bad values;
        and, separately, a small summary: finished episodes' return/cost/length and timings
        (the coordinator reads only the summary; the batch goes straight to the learner)."""
        if policy.get("obs_norm_per_step"):
            return self._rollout_normalising(policy, num_steps)
        self.begin_rollout(num_steps)
        for _ in range(num_steps):
            t0 = time.perf_counter()
            out = self._act(policy, self.obs)
            self._frag["inference_s"] += time.perf_counter() - t0
            self.advance(out)
        return self.end_rollout()

    def _rollout_normalising(self, policy: dict, num_steps: int) -> tuple[dict, dict]:
        """``rollout`` with the observation statistics updated at every step (the policy's
        ``obs_norm_per_step``; OmniSafe's ObsNormalize): each step's observations are merged into
        them before the policy acts, and the batch holds the observations as normalised then
        (``raw_obs``: as observed). Final and last observations are normalised with the statistics
        of their step, without being merged (the last ones are merged when acted on next)."""
        stats = np_policy.StepStatistics(policy)
        self.begin_rollout(num_steps)
        frag = self._frag
        z = np.zeros_like(frag["buf"]["obs"])
        for t in range(num_steps):
            t0 = time.perf_counter()
            acting = stats.push(self.obs)
            z[t] = np_policy.normalise(acting, self.obs)
            out = self._act(acting, self.obs)
            frag["inference_s"] += time.perf_counter() - t0
            ended = len(frag["final_obs"])
            self.advance(out)
            for j in range(ended, len(frag["final_obs"])):
                frag["final_obs"][j] = np_policy.normalise(acting, frag["final_obs"][j])
        batch, summary = self.end_rollout()
        z[~batch["valid"]] = 0.0  # skipped episodes' steps, zeroed as their raw observations are
        batch["raw_obs"], batch["obs"] = batch["obs"], z
        batch["last_obs"] = np_policy.normalise(acting, batch["last_obs"]).astype(np.float32)
        return batch, summary

    # The same rollout driven step by step from outside (``saferl.actors.inference``: one server
    # acts for every host): begin_rollout -> advance(actions) × T -> end_rollout.
    def begin_rollout(self, num_steps: int) -> np.ndarray:
        """Start a fragment of ``num_steps`` steps; returns the current observations."""
        n, d, a = self.vec.num_envs, self.vec.obs_dim, self.vec.act_dim
        buf = step_buffers(num_steps, n, d, a)
        self._frag = {"buf": buf, "t": 0, "final_idx": [], "final_obs": [], "episodes": [], "inference_s": 0.0,
                      "env_s": 0.0, "skipped": 0, "clipped": 0,
                      "ep_start": np.zeros(n, np.int64)}  # where each env's current episode began
        return self.obs

    def advance(self, out: tuple) -> np.ndarray:
        """One step of the fragment with ``out`` = (env action in the task's box, u, logp);
        returns the next observations."""
        action, u, logp = out
        f, buf, t = self._frag, self._frag["buf"], self._frag["t"]
        t1 = time.perf_counter()
        f["clipped"] += np.count_nonzero((action < self.low) | (action > self.high))  # the env clips them
        obs, rew, cost, term, trunc, info = self.vec.step(action)
        f["env_s"] += time.perf_counter() - t1
        bad = self._screen(obs, rew, cost, term, trunc, info)
        buf["obs"][t], buf["act"][t], buf["logp"][t] = self.obs, u, logp
        buf["reward"][t], buf["cost"][t], buf["terminated"][t], buf["truncated"][t] = rew, cost, term, trunc
        ep_start = f["ep_start"]
        for i in bad:  # skip_episode: its partial episode becomes zeroed, terminated, invalid steps
            s = ep_start[i]
            for key in ("obs", "act", "logp", "reward", "cost", "truncated", "valid"):
                buf[key][s:t + 1, i] = 0
            buf["terminated"][s:t + 1, i] = True
        f["skipped"] += len(bad)
        ep_start[term | trunc] = t + 1
        ep_start[bad] = t + 1
        for i, fo in info["final_obs"].items():  # the ended envs in info["episodes"]'s order (final_cost)
            f["final_idx"].append((t, i))
            f["final_obs"].append(fo)
        f["episodes"] += info["episodes"]
        self.obs = obs
        f["t"] = t + 1
        return obs

    def end_rollout(self) -> tuple[dict, dict]:
        """The fragment's batch and summary (as ``rollout`` returns them)."""
        f, self._frag = self._frag, None
        buf, d = f["buf"], self.vec.obs_dim
        if f["t"] != len(buf["obs"]):
            raise RuntimeError(f"rollout fragment ended after {f['t']} of {len(buf['obs'])} steps")
        n, a = self.vec.num_envs, self.vec.act_dim
        buf["last_obs"] = self.obs.copy()
        buf["final_idx"] = np.asarray(f["final_idx"], np.int64).reshape(-1, 2)
        buf["final_obs"] = np.asarray(f["final_obs"], np.float32).reshape(-1, d)
        buf["final_cost"] = np.asarray([ep["cost"] for ep in f["episodes"]], np.float64)
        buf["final_length"] = np.asarray([ep["length"] for ep in f["episodes"]], np.int64)
        summary = {"episodes": f["episodes"], "inference_s": f["inference_s"], "env_s": f["env_s"],
                   "skipped_episodes": f["skipped"], "clipped_action_frac": f["clipped"] / max(1, f["t"] * n * a),
                   "safeguard_failures": safeguard_failures()}
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
        self.ep_t = np.zeros(self.vec.num_envs, np.int64)
        done: list[dict] = []
        while len(done) < episodes:
            action, _, _ = self._act(policy, self.obs, deterministic)
            if attack_rate > 0:
                hit = self.rng.random(action.shape[0]) < attack_rate
                noise = self.rng.uniform(self.low, self.high, action.shape).astype(np.float32)
                action = np.where(hit[:, None], noise, action)
            obs, rew, cost, term, trunc, info = self.vec.step(action)
            self._screen(obs, rew, cost, term, trunc, info)  # skip_episode: skipped episodes do not count
            self.obs = obs
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
