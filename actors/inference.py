"""Batched policy inference for rollouts: one server acts for every env host of a run.

With ``resources.inference: server`` the env hosts do not run the policy themselves. Each step,
the server takes the observations of all hosts as one batch, runs the network on its device (the
GPU Ray granted it: ``resources.inference_gpus``; the CPU otherwise), samples the actions with
``saferl.actors.np_policy`` and hands each host its slice. This pays when the network is large
or the hosts are many: one GPU forward over every env instead of a CPU forward per host.

The driver chains the steps as Ray tasks without waiting on them (``rollout``): host obs ->
server.act -> host.advance -> ... so the objects flow host <-> server, never through the
driver, and the calls of one step overlap the submission of the next.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from saferl.actors import np_policy
from saferl.actors.process import ActorProcess
from saferl.learners.networks import pick_device

TORCH_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "elu": torch.nn.functional.elu}


class InferenceServer(ActorProcess):
    def __init__(self, act_low, act_high, device: str = "auto"):
        # Ray hides GPUs that were not granted (CUDA_VISIBLE_DEVICES), so "auto" means: the grant.
        self.device = pick_device(device)
        self.low, self.high = np.asarray(act_low, np.float32), np.asarray(act_high, np.float32)
        self.policy: dict | None = None
        self.inference_s = 0.0

    def device_name(self) -> str:
        return str(self.device)

    def set_policy(self, policy: dict, seed: int) -> None:
        """The weights of this iteration (``numpy_policy`` of the learner) on the device, and a
        fresh sampling stream (seeded by the coordinator: reproducible, resumable)."""
        dev = self.device
        self.policy = policy
        self.rng = np.random.default_rng(seed)
        if "layers" in policy:
            t = lambda a: torch.tensor(np.asarray(a, np.float32), device=dev)  # noqa: E731
            self.layers = [(t(w), t(b)) for w, b in policy["layers"]]
            self.mean, self.scale = t(policy["obs_mean"]), torch.rsqrt(t(policy["obs_var"]) + 1e-8)
        self.inference_s = 0.0

    @torch.no_grad()
    def forward(self, state: dict, obs: np.ndarray) -> np.ndarray:
        """``np_policy.mean_action`` on the device."""
        h = (torch.as_tensor(obs, dtype=torch.float32, device=self.device) - self.mean) * self.scale
        clip = float(state["obs_clip"])
        h = h.clamp(-clip, clip)
        act = TORCH_ACTIVATIONS[state.get("activation", "tanh")]
        for w, b in self.layers[:-1]:
            h = act(torch.addmm(b, h, w.T))
        w, b = self.layers[-1]
        return torch.addmm(b, h, w.T).cpu().numpy()

    def act(self, *host_obs: np.ndarray):
        """One step for every host: their observations batched, one forward, sampled; returns
        each host's (env action in the box, u, logp)."""
        t0 = time.perf_counter()
        obs = np.concatenate(host_obs)
        action, u, logp = np_policy.act(self.policy, obs, self.rng, forward=self.forward)
        action = np_policy.to_box(self.policy, action, self.low, self.high)
        cuts = np.cumsum([len(o) for o in host_obs])[:-1]
        out = list(zip(np.split(action, cuts), np.split(u, cuts), np.split(logp, cuts)))
        self.inference_s += time.perf_counter() - t0
        return out if len(out) > 1 else out[0]

    def stats(self) -> dict:
        return {"inference_s": self.inference_s}


def rollout(hosts: list, server, policy, num_steps: int, seed: int) -> list:
    """Refs of each host's (batch, summary), as ``EnvHost.rollout`` returns them, with every
    action chosen by ``server``. ``policy``: the weights or a reference to them."""
    server.set_policy.remote(policy, seed)  # an actor runs one caller's calls in order: before act
    obs = [h.begin_rollout.remote(num_steps) for h in hosts]
    for _ in range(num_steps):
        acts = server.act.options(num_returns=len(hosts)).remote(*obs)
        acts = acts if isinstance(acts, list) else [acts]
        obs = [h.advance.remote(a) for h, a in zip(hosts, acts)]
    return [h.end_rollout.options(num_returns=2).remote() for h in hosts]
