"""Gradient worker: a differentiable env host.

It holds a shard of envs and their state across calls. Given the learner's weights (policy, and
critics for short-horizon methods) it rolls the next window of h steps through the
differentiable simulator, back-propagates, and returns the window objectives L_R, L_C, the
flattened gradients g = ∇L_R, q = ∇L_C (for CGPO-ZoBG instead their score-function estimates of
eq 69 on the same window, which need no simulator gradient: ``analytic.window_gradients``), the
trajectory (for critic training), observation moments (for the running normaliser), and the
episodes that finished. All envs of a run start episodes together, every T / h windows; the
learner averages shards weighted by env count.

``evaluate`` (CGPO's ratio test, eq 18) re-rolls the window ``compute`` just rolled, forward
only, with other policy weights: same start states, time steps, action noise and critics, so the
change of L_R, L_C it reports is the policy's alone.
"""
from __future__ import annotations

import importlib
import time

import numpy as np
import torch

from saferl import registry
from saferl.actors.process import ActorProcess, safeguard_failures
from saferl.learners.analytic import TimeValue, episode_starts, rollout_window, window_gradients, window_noise
from saferl.learners.networks import GaussianPolicy, pick_device
from saferl.learners.world_model import WorldModel, WorldModelEnv


def load_weights(worker, weights: dict) -> None:
    """The learner's policy (and critics, for short-horizon methods) into a worker."""
    worker.policy.load_state_dict(weights["policy"])
    if worker.critics is not None:
        worker.critics[0].load_state_dict(weights["v_r"])
        worker.critics[1].load_state_dict(weights["v_c"])


def build_networks(worker, arch: dict, obs_dim: int) -> None:
    """The learner's policy and (for short-horizon methods) its two time critics, on the worker."""
    worker.policy = GaussianPolicy(**arch["policy"]).to(worker.device)
    worker.critics = None
    if arch.get("critic_hidden"):
        worker.critics = tuple(TimeValue(obs_dim, arch["critic_hidden"], worker.horizon).to(worker.device)
                               for _ in range(2))
    worker.gamma = arch.get("gamma", 1.0)
    worker.estimator = arch.get("gradient_estimator", "fobg")  # CGPO-ZoBG: "zobg" (window_gradients)


def shard_result(l_r, l_c, g, q, j_r: float, j_c: float, traj: dict) -> dict:
    """What the learner receives from a shard: objectives, gradients, J estimates, the trajectory
    (critic training) and observation moments (the running normaliser)."""
    obs = traj["obs"][:-1].reshape(-1, traj["obs"].shape[-1])
    return {"l_r": l_r.item(), "l_c": l_c.item(), "g": g, "q": q, "n": traj["obs"].shape[1],
            "j_r": float(j_r), "j_c": float(j_c),
            "traj": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in traj.items()},
            "obs_count": obs.shape[0], "obs_mean": obs.mean(0).cpu().numpy(),
            "obs_var": obs.var(0, unbiased=False).cpu().numpy()}


def reroll_window(worker, env, trial: dict, state, t0: int, h: int, noise, window_seconds: float) -> dict:
    """The forward-only re-roll of ``evaluate``: the policy of ``trial`` is loaded (the critics
    stay); returns the window objectives, the shard's env count and the seconds it took (with
    those of the window's ``compute``, for comparison)."""
    t_start = time.perf_counter()
    worker.policy.load_state_dict(trial["policy"])
    with torch.no_grad():
        sum_r, sum_c, boot_r, boot_c, _, _ = rollout_window(
            env, worker.policy, state, t0, h, worker.horizon, noise, worker.critics, worker.gamma)
        l_r, l_c = (sum_r + boot_r).mean().item(), (sum_c + boot_c).mean().item()
    return {"l_r": l_r, "l_c": l_c, "n": int(state.shape[0]), "seconds": time.perf_counter() - t_start,
            "window_seconds": window_seconds}


def make_diff_env(task_name: str, device: torch.device | str | None = None):
    """The task's differentiable env; tasks that hold tensors (``accepts_device``) are built on
    ``device`` so a GPU worker steps them without host round trips."""
    spec = registry.get_task(task_name)
    module, name = spec.entry.split(":")
    cls = getattr(importlib.import_module(module), name)
    kwargs = dict(spec.kwargs)
    if device is not None and getattr(cls, "accepts_device", False):
        kwargs["device"] = torch.device(device)
    return cls(**kwargs)


class GradientWorker(ActorProcess):
    def __init__(self, task_name: str, env_offset: int, num_envs: int, total_envs: int, seed: int,
                 arch: dict, device: str = "auto"):
        self.device = pick_device(device)
        self.env = make_diff_env(task_name, self.device)
        self.horizon = self.env.max_episode_steps
        self.shard = slice(env_offset, env_offset + num_envs)
        self.total_envs, self.seed = total_envs, seed
        build_networks(self, arch, self.env.obs_dim)
        self.episode, self.t = -1, self.horizon  # the first call starts episode 0

    def ping(self) -> int:
        return self.shard.start

    def get_state(self) -> dict:
        """Where this shard's episodes are (checkpointed so a resumed run continues them)."""
        return {"episode": self.episode, "t": self.t, "state": getattr(self, "state", None),
                "ret": getattr(self, "ret", None), "cost": getattr(self, "cost", None)}

    def set_state(self, sd: dict) -> None:
        self.episode, self.t = sd["episode"], sd["t"]
        if sd["state"] is not None:
            self.state, self.ret, self.cost = sd["state"].to(self.device), sd["ret"], sd["cost"]

    def compute(self, weights: dict, iteration: int, h: int, stochastic: bool = True) -> tuple[dict, dict]:
        """One window; returns (result for the learner, summary of finished episodes)."""
        t_start = time.perf_counter()
        load_weights(self, weights)
        if self.t >= self.horizon:  # start the next episode for every env
            self.episode += 1
            self.state = episode_starts(self.seed, self.episode, self.total_envs, self.env)[self.shard].to(self.device)
            self.t, self.ret, self.cost = 0, np.zeros(self.state.shape[0]), np.zeros(self.state.shape[0])
        h = min(h, self.horizon - self.t)
        noise = None
        if stochastic:
            noise = window_noise(self.seed, iteration, self.total_envs, self.env.act_dim, h)[:, self.shard]
            noise = noise.to(self.device)
        self.window = {"state": self.state, "t0": self.t, "h": h, "noise": noise}  # for ``evaluate``
        _sum_r, _sum_c, boot_r, boot_c, state, traj, l_r, l_c, g, q = window_gradients(
            self.env, self.policy, self.state, self.t, h, self.horizon, noise, self.critics, self.gamma,
            self.estimator)
        prefix_r, prefix_c = self.ret.mean(), self.cost.mean()
        win_r, win_c = traj["reward"].sum(0).cpu().numpy(), traj["cost"].sum(0).cpu().numpy()
        self.ret, self.cost = self.ret + win_r, self.cost + win_c
        self.state, self.t = state.detach(), self.t + h
        episodes = []
        if self.t >= self.horizon:
            episodes = [{"return": float(r), "cost": float(c), "length": self.horizon}
                        for r, c in zip(self.ret, self.cost)]
        # estimates of J_R(θ), J_C(θ): realised episode prefix + window + critic tail
        result = shard_result(l_r, l_c, g, q, prefix_r + win_r.mean() + boot_r.mean().item(),
                              prefix_c + win_c.mean() + boot_c.mean().item(), traj)
        self.window["seconds"] = time.perf_counter() - t_start
        return result, {"episodes": episodes, "safeguard_failures": safeguard_failures()}

    def evaluate(self, trial: dict | None) -> dict | None:
        """L_R, L_C of the last ``compute``'s window re-rolled forward only with ``trial``'s policy
        (its own observation statistics) and the critics that window used; None for no trial."""
        if trial is None:
            return None
        w = self.window
        return reroll_window(self, self.env, trial, w["state"], w["t0"], w["h"], w["noise"], w["seconds"])


class ModelGradientWorker(ActorProcess):
    """MB-CGPO's worker (Algorithm 3): steps its shard of the *real* (possibly
    non-differentiable) task through the numpy protocol to collect transitions, then takes the
    window's gradients through the world model from the same start observations."""

    def __init__(self, task_name: str, env_offset: int, num_envs: int, total_envs: int, seed: int,
                 arch: dict, world_model_hidden: list[int], device: str = "auto"):
        from saferl.actors.env_host import make_vec_env

        self.vec = make_vec_env(task_name, num_envs)
        self.horizon = self.vec.max_episode_steps
        self.obs = self.vec.reset(int(np.random.SeedSequence([seed, env_offset]).generate_state(1)[0]))
        self.shard, self.total_envs, self.seed = slice(env_offset, env_offset + num_envs), total_envs, seed
        self.device = pick_device(device)
        build_networks(self, arch, self.vec.obs_dim)
        self.model = WorldModel(self.vec.obs_dim, self.vec.act_dim, world_model_hidden).to(self.device)
        self.t, self.ret, self.cost = 0, np.zeros(num_envs), np.zeros(num_envs)

    def ping(self) -> int:
        return self.shard.start

    def get_state(self) -> dict:
        return {"obs": self.obs, "t": self.t, "ret": self.ret, "cost": self.cost}

    def set_state(self, sd: dict) -> None:  # the real env restarts; its episode clock resumes
        self.t, self.ret, self.cost = sd["t"], sd["ret"], sd["cost"]

    def collect(self, weights: dict, iteration: int, h: int, stochastic: bool = True) -> tuple[dict, dict]:
        """Roll h real steps; returns (transitions for the world model, finished episodes)."""
        load_weights(self, weights)
        h = min(h, self.horizon - self.t)
        noise = window_noise(self.seed, iteration, self.total_envs, self.vec.act_dim, h)[:, self.shard]
        self.start_obs, self.start_t, self.window_h = self.obs.copy(), self.t, h
        keys = ("obs", "act", "next_obs", "reward", "cost")
        data, episodes = {k: [] for k in keys}, []
        self.window_r, self.window_c = np.zeros_like(self.ret), np.zeros_like(self.cost)
        for k in range(h):
            with torch.no_grad():
                obs_t = torch.as_tensor(self.obs, device=self.device)
                act = self.policy.rsample(obs_t, noise[k].to(self.device) if stochastic else None).cpu().numpy()
            obs, rew, cost, term, _trunc, info = self.vec.step(act)
            if term.any():
                raise RuntimeError("MB-CGPO's windows assume fixed-horizon episodes (no termination)")
            nxt = obs.copy()
            for i, fo in info["final_obs"].items():
                nxt[i] = fo
            for key, val in zip(keys, (self.obs, act, nxt, rew, cost)):
                data[key].append(val)
            self.window_r, self.window_c = self.window_r + rew, self.window_c + cost
            episodes += info["episodes"]
            self.obs = obs
        self.real_traj = {"obs": torch.as_tensor(np.concatenate([np.stack(data["obs"]), nxt[None]])),
                          "reward": torch.as_tensor(np.stack(data["reward"])),
                          "cost": torch.as_tensor(np.stack(data["cost"])), "t0": self.t}
        return {k: np.concatenate(v) for k, v in data.items()}, {"episodes": episodes}

    def compute(self, weights: dict, model_weights: dict, iteration: int, stochastic: bool = True) -> dict:
        """Gradients of the window just collected, through the world model (eq 19-20 with D_M)."""
        t_start = time.perf_counter()
        load_weights(self, weights)
        self.model.load_state_dict(model_weights)
        env = WorldModelEnv(self.model, self.vec.act_dim, self.horizon)
        h, t0 = self.window_h, self.start_t
        noise = window_noise(self.seed, iteration, self.total_envs, self.vec.act_dim, h)[:, self.shard]
        state = torch.as_tensor(self.start_obs, device=self.device)
        noise = noise.to(self.device) if stochastic else None
        _sum_r, _sum_c, boot_r, boot_c, _, _, l_r, l_c, g, q = window_gradients(
            env, self.policy, state, t0, h, self.horizon, noise, self.critics, self.gamma)
        # J(θ) from real data: realised prefix + real window + critic tail
        j_r = (self.ret + self.window_r).mean() + boot_r.mean().item()
        j_c = (self.cost + self.window_c).mean() + boot_c.mean().item()
        self.t += h
        self.ret, self.cost = self.ret + self.window_r, self.cost + self.window_c
        if self.t >= self.horizon:
            self.t, self.ret, self.cost = 0, np.zeros_like(self.ret), np.zeros_like(self.cost)
        self.window = {"env": env, "state": state, "t0": t0, "h": h, "noise": noise,
                       "seconds": time.perf_counter() - t_start}
        return shard_result(l_r, l_c, g, q, j_r, j_c, self.real_traj)

    def evaluate(self, trial: dict | None) -> dict | None:
        """L_R, L_C of the last ``compute``'s model window re-rolled forward only with ``trial``'s
        policy, from the same real start observations through the same world model."""
        if trial is None:
            return None
        w = self.window
        return reroll_window(self, w["env"], trial, w["state"], w["t0"], w["h"], w["noise"], w["seconds"])
