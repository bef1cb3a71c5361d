"""Single Safety-Gymnasium environment behind saferl's small numpy env protocol.

This is the only module of saferl that imports ``safety_gymnasium``, and it is imported only in
the Safety-Gymnasium interpreter (``.venv-sg``: numpy 1.26, mujoco 2.3.3, gymnasium 0.28.1; see
deploy/requirements-sg.txt). It imports numpy and the standard library at module level and
``safety_gymnasium`` lazily, in :func:`make_env`.

Protocol of :class:`SafetyGymEnv` (what the numpy vectoriser relies on):
  attributes ``obs_dim``, ``act_dim``, ``act_low``/``act_high`` (float32 ``[act_dim]``),
  ``max_episode_steps``;
  ``reset(seed) -> obs`` (float32 ``[obs_dim]``);
  ``step(action) -> (obs, reward, cost, terminated, truncated, info)`` with python
  float/float/bool/bool, actions clipped to the box, no auto-reset;
  ``render() -> rgb frame | None``; ``close()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
from typing import Any

import numpy as np

__all__ = ["SafetyGymEnv", "make_env", "import_safety_gymnasium"]


def _patch_dataclasses_for_ndarray_defaults() -> None:
    """Let ``@dataclass`` accept numpy-array defaults, as it did before Python 3.11.

    safety_gymnasium 1.0.0 declares fields such as ``color: np.array = COLOR['goal']``. Python
    3.11 rejects every unhashable default, so ``import safety_gymnasium`` fails with
    ``ValueError: mutable default <class 'numpy.ndarray'> for field color is not allowed: use
    default_factory``. We wrap ``dataclasses._get_field`` (same signature prefix on 3.10-3.13) so
    an ndarray class attribute becomes ``field(default_factory=<copy of it>)`` first. Only
    classes that would otherwise raise are affected; each instance gets its own copy.
    """
    get_field = getattr(dataclasses, "_get_field", None)
    if get_field is None or getattr(get_field, "_saferl_ndarray_patch", False):
        return

    def _get_field(cls, a_name, *args, **kwargs):
        default = cls.__dict__.get(a_name, dataclasses.MISSING)
        if isinstance(default, np.ndarray):
            setattr(cls, a_name, dataclasses.field(default_factory=default.copy))
        return get_field(cls, a_name, *args, **kwargs)

    _get_field._saferl_ndarray_patch = True  # type: ignore[attr-defined]
    dataclasses._get_field = _get_field  # type: ignore[attr-defined]


# gymnasium-robotics 1.2.2 prints this notice to stderr on every import; it concerns Adroit
# tasks only, which saferl does not use.
_IMPORT_NOISE = ("reward functions were updated in v1.2.1",)


def import_safety_gymnasium():
    """Import ``safety_gymnasium`` with the Python 3.11 dataclass shim applied first."""
    if "safety_gymnasium" in sys.modules:
        return sys.modules["safety_gymnasium"]
    _patch_dataclasses_for_ndarray_defaults()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            import safety_gymnasium
    finally:
        kept = [ln for ln in captured.getvalue().splitlines(True)
                if not any(noise in ln for noise in _IMPORT_NOISE)]
        if kept:
            sys.stderr.write("".join(kept))
    return safety_gymnasium


class SafetyGymEnv:
    """A thin adapter over one ``safety_gymnasium.make(task_id)`` environment."""

    def __init__(self, env: Any, task_id: str, seed: int, render_mode: str | None = None):
        self._env = env
        self.task_id = task_id
        self.render_mode = render_mode
        obs_space, act_space = env.observation_space, env.action_space
        if not hasattr(obs_space, "low") or not hasattr(act_space, "low"):
            raise NotImplementedError(
                f"{task_id}: only Box observation/action spaces are supported, got "
                f"{obs_space} / {act_space}")
        self.obs_dim = int(np.prod(obs_space.shape))
        self.act_dim = int(np.prod(act_space.shape))
        self._act_shape = tuple(act_space.shape)
        self._act_dtype = act_space.dtype
        # Clip against the space's own bounds/dtype (float64 for navigation tasks, float32 for
        # velocity tasks); expose float32 copies.
        self._low = np.asarray(act_space.low, dtype=np.float64).reshape(-1)
        self._high = np.asarray(act_space.high, dtype=np.float64).reshape(-1)
        self.act_low = self._low.astype(np.float32)
        self.act_high = self._high.astype(np.float32)
        self.max_episode_steps = _max_episode_steps(env)
        self._seed = int(seed)
        self._seeded = False

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode. The first reset without a seed uses make_env's seed; a later
        ``None`` continues the env's random stream."""
        if seed is None and not self._seeded:
            seed = self._seed
        if seed is not None:
            self._seeded = True
        obs, _info = self._env.reset(seed=None if seed is None else int(seed))
        return np.asarray(obs, dtype=np.float32).reshape(self.obs_dim)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(self.act_dim), self._low,
                    self._high)
        obs, reward, cost, terminated, truncated, info = self._env.step(
            a.astype(self._act_dtype, copy=False).reshape(self._act_shape))
        return (np.asarray(obs, dtype=np.float32).reshape(self.obs_dim), float(reward),
                float(cost), bool(terminated), bool(truncated), info)

    def render(self) -> np.ndarray | None:
        """An rgb frame (uint8 ``[H, W, 3]``) if made with ``render_mode="rgb_array"``.

        Without a display, make_env defaults ``MUJOCO_GL`` to ``egl`` (Mesa's software EGL works
        on a CPU-only machine; ``osmesa`` is not installed here)."""
        if self.render_mode != "rgb_array":
            return None
        return self._env.render()

    def close(self) -> None:
        self._env.close()


def _max_episode_steps(env: Any) -> int:
    """The step limit of the SafeTimeLimit wrapper safety_gymnasium.make applies (1000 for the
    registered tasks)."""
    e = env
    while e is not None:
        limit = getattr(e, "_max_episode_steps", None)
        if limit is not None:
            return int(limit)
        e = getattr(e, "env", None)
    spec = getattr(env, "spec", None)
    if spec is not None and spec.max_episode_steps is not None:
        return int(spec.max_episode_steps)
    raise ValueError("environment has no episode step limit")


def make_env(task_id: str, seed: int, render_mode: str | None = None,
             **make_kwargs: Any) -> SafetyGymEnv:
    """Make one Safety-Gymnasium task, e.g. ``make_env("SafetyPointGoal1-v0", seed=0)``.

    ``make_kwargs`` go to ``safety_gymnasium.make`` (e.g. ``max_episode_steps``). The env is
    seeded on its first ``reset`` (with ``seed`` unless reset is given one)."""
    if render_mode is not None:
        make_kwargs["render_mode"] = render_mode
        if not os.environ.get("DISPLAY"):  # headless: MuJoCo's default (glfw) needs a display
            os.environ.setdefault("MUJOCO_GL", "egl")
    sg = import_safety_gymnasium()
    env = sg.make(task_id, **make_kwargs)
    env.action_space.seed(int(seed))
    return SafetyGymEnv(env, task_id, seed, render_mode)
