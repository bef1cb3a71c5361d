"""Policy inference in numpy, run inside env hosts.

Env hosts step their envs and act locally, so a rollout is one Ray call, not one per step, and
the Safety-Gymnasium interpreter needs no torch. The weights come from
``saferl.learners.networks.GaussianPolicy.export_numpy`` (tested to agree with the torch forward).
"""
from __future__ import annotations

import numpy as np

LOG_2PI = float(np.log(2.0 * np.pi))


def normalise(state: dict, obs: np.ndarray) -> np.ndarray:
    z = (obs - state["obs_mean"]) / np.sqrt(state["obs_var"] + 1e-8)
    return np.clip(z, -state["obs_clip"], state["obs_clip"])


def mean_action(state: dict, obs: np.ndarray) -> np.ndarray:
    h = normalise(state, obs.astype(np.float32))
    layers = state["layers"]
    for w, b in layers[:-1]:
        h = np.tanh(h @ w.T + b)
    w, b = layers[-1]
    return h @ w.T + b


def act(state: dict, obs: np.ndarray, rng: np.random.Generator, deterministic: bool = False):
    """Returns (env action, Gaussian sample u, log N(u; mean, std)). With ``squash`` the env
    action is tanh(u) and the log-prob is of u (learners that need it apply the correction)."""
    mu = mean_action(state, obs)
    log_std = state["log_std"]
    if deterministic:
        u = mu
    else:
        u = mu + np.exp(log_std) * rng.standard_normal(mu.shape).astype(np.float32)
    logp = -0.5 * (((u - mu) / np.exp(log_std)) ** 2 + 2 * log_std + LOG_2PI).sum(-1)
    action = np.tanh(u) if state["squash"] else u
    return action.astype(np.float32), u.astype(np.float32), logp.astype(np.float32)
