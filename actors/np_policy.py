"""Policy inference in numpy, run inside env hosts.

Env hosts step their envs and act locally, so a rollout is one Ray call, not one per step, and
the Safety-Gymnasium interpreter needs no torch. The weights come from
``saferl.learners.networks.GaussianPolicy.export_numpy`` (tested to agree with the torch forward).
``forward`` (the network: numpy ``mean_action`` by default) is where the batched inference
server (``saferl.actors.inference``) puts its torch forward on the GPU; the sampling around it
is this module's in both cases.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from saferl.batch import NumpyPolicy, merge_moments

LOG_2PI = float(np.log(2.0 * np.pi))
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))}


def normalise(state: NumpyPolicy, obs: np.ndarray) -> np.ndarray:
    z = (obs - state["obs_mean"]) / np.sqrt(state["obs_var"] + 1e-8)
    return np.clip(z, -state["obs_clip"], state["obs_clip"])


class StepStatistics:
    """Observation statistics updated at every step of a rollout (``obs_norm_per_step``), as
    OmniSafe's ``ObsNormalize`` pushes each observation into its running moments before normalising
    it. They start from the policy's (the learner's, up to its last update) and merge each step's
    observations by the learner's rule (``saferl.batch.merge_moments``), so after a rollout they
    are what the learner's update on the same observations gives, up to rounding."""

    def __init__(self, policy: NumpyPolicy):
        self.policy: NumpyPolicy = dict(policy)  # type: ignore[assignment]
        self.mean = np.asarray(policy["obs_mean"], np.float64)
        self.var = np.asarray(policy["obs_var"], np.float64)
        self.count = float(policy["obs_count"])

    def push(self, obs: np.ndarray) -> NumpyPolicy:
        """Merge ``obs`` [n, d] into the moments; returns the policy with them, to act on ``obs``."""
        x = np.asarray(obs, np.float64).reshape(-1, self.mean.shape[0])
        self.mean, self.var, self.count = merge_moments(self.mean, self.var, self.count, x.shape[0], x.mean(0),
                                                        x.var(0))
        self.policy["obs_mean"], self.policy["obs_var"] = self.mean.astype(np.float32), self.var.astype(np.float32)
        return self.policy


def mean_action(state: NumpyPolicy, obs: np.ndarray) -> np.ndarray:
    h = normalise(state, obs.astype(np.float32))
    layers = state["layers"]
    act = ACTIVATIONS[state.get("activation", "tanh")]
    for w, b in layers[:-1]:
        h = act(h @ w.T + b)
    w, b = layers[-1]
    return h @ w.T + b


def mean_and_log_std(state: NumpyPolicy, obs: np.ndarray, forward=mean_action):
    """The Gaussian's mean and log σ: a state-independent log σ, or (``std_head``, SAC) the
    network's second half, clamped."""
    out = forward(state, obs)
    if not state.get("std_head"):
        return out, state["log_std"]
    mu, log_std = np.split(out, 2, axis=-1)
    return mu, np.clip(log_std, *state["log_std_bounds"])


def act(state: NumpyPolicy, obs: np.ndarray, rng: np.random.Generator, deterministic: bool = False,
        forward=mean_action):
    """Returns (env action, Gaussian sample u, log N(u; mean, std)). With ``squash`` the env
    action is tanh(u) and the log-prob is of u (learners that need it apply the correction).
    ``{"uniform": True}`` is the warm-up policy of off-policy learners: tanh(u) uniform in the
    box, log-prob 0. A deterministic actor (``action_noise`` σ: TD3, DDPG) acts with
    clip(tanh(μ(s)) + N(0, σ²), −1, 1), or tanh(μ(s)) when deterministic; u = artanh(action)."""
    if state.get("uniform"):
        a = rng.uniform(-1.0, 1.0, (obs.shape[0], state["act_dim"])).astype(np.float32)
        return a, *_pre_squash(a)
    if "action_noise" in state:
        a = np.tanh(forward(state, obs))
        if not deterministic:
            a = np.clip(a + state["action_noise"] * rng.standard_normal(a.shape), -1.0, 1.0)
        a = a.astype(np.float32)
        return a, *_pre_squash(a)
    if state.get("cholesky_head"):
        return _act_cholesky(state, obs, rng, deterministic, forward)
    mu, log_std = mean_and_log_std(state, obs, forward)
    u = mu if deterministic else mu + np.exp(log_std) * rng.standard_normal(mu.shape).astype(np.float32)
    logp = -0.5 * (((u - mu) / np.exp(log_std)) ** 2 + 2 * log_std + LOG_2PI).sum(-1)
    action = np.tanh(u) if state["squash"] else u
    return action.astype(np.float32), u.astype(np.float32), logp.astype(np.float32)


def mean_and_tril(state: NumpyPolicy, obs: np.ndarray, forward=mean_action):
    """μ and the Cholesky factor L of a full-covariance Gaussian over u (CVPO's actor):
    the lower triangle row-major, its diagonal softplus(·) + ``min_diag``."""
    out = forward(state, obs)
    n = state["act_dim"]
    mu, entries = out[:, :n], out[:, n:]
    rows, cols = np.tril_indices(n)
    entries = np.where(rows == cols, np.logaddexp(0.0, entries) + state["min_diag"], entries)
    tril = np.zeros((out.shape[0], n, n), np.float32)
    tril[:, rows, cols] = entries
    return mu, tril


def _act_cholesky(state: NumpyPolicy, obs: np.ndarray, rng: np.random.Generator, deterministic: bool, forward):
    mu, tril = mean_and_tril(state, obs, forward)
    eps = np.zeros_like(mu) if deterministic else rng.standard_normal(mu.shape).astype(np.float32)
    u = mu + np.einsum("bij,bj->bi", tril, eps)
    log_det = np.log(np.diagonal(tril, axis1=1, axis2=2)).sum(-1)
    logp = -0.5 * (eps ** 2).sum(-1) - log_det - 0.5 * mu.shape[1] * LOG_2PI
    return np.tanh(u).astype(np.float32), u.astype(np.float32), logp.astype(np.float32)


def _pre_squash(a: np.ndarray):
    """u with tanh(u) = a (a clipped to ±(1 − 1e-6)), and a log-prob of 0 (no density is used)."""
    u = np.arctanh(np.clip(a, -1 + 1e-6, 1 - 1e-6))
    return u.astype(np.float32), np.zeros(a.shape[0], np.float32)


def to_box(state: NumpyPolicy, action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Squashed actions in [−1, 1] mapped onto the task's box (others are the env's to clip)."""
    if state.get("squash") or state.get("uniform"):
        return low + (action + 1.0) * 0.5 * (high - low)
    return action
