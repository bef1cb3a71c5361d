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

Geometry (``make_env(..., geometry=True)``, the ``-SIS`` tasks of safety-index learners): the
observation gains the tail of ``saferl.envs.point_hazard`` — robot position and planar velocity,
then position and radius of every constrained obstacle group (hazards, and pillars where they are
constrained) — and ``info["geometry"]`` holds the same as plain arrays (``robot_pos``,
``robot_vel``, ``obstacle_pos`` [H, 2], ``obstacle_size`` [H]); ``n_hazards`` is H.

Fast resets: a navigation task (Goal/Button/Push/Circle) rebuilds its MuJoCo model from XML on
every reset, and ~95% of that (~0.95 s of ~1 s here) is MuJoCo decoding the 24 MB of skybox PNGs
(``star_hd.*.png``), a purely visual asset. Unless the env renders (or is a Vision task), the
adapter's resets swap that skybox for a plain built-in one: physics and observations are
unchanged (the test checks identical trajectories), a reset takes a few ms instead of ~1 s. See
:func:`_install_fast_reset`; ``make_env(..., fast_reset=False)`` keeps the original assets.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import io
import os
import sys
from typing import Any

import numpy as np

__all__ = ["SafetyGymEnv", "import_safety_gymnasium", "make_env"]


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
    if "safety_gymnasium" not in sys.modules:
        _patch_dataclasses_for_ndarray_defaults()
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                import safety_gymnasium  # noqa: F401
        finally:
            kept = [ln for ln in captured.getvalue().splitlines(True)
                    if not any(noise in ln for noise in _IMPORT_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
        _register_pillar_tasks(sys.modules["safety_gymnasium"])
    _install_fast_reset()
    return sys.modules["safety_gymnasium"]


# The FAC-SIS paper trains on point-robot Goal and Push tasks whose obstacles are pillars
# (static, physical, penalised on contact). Safety-Gymnasium registers none with constrained
# pillars, so these are its level-0 Goal / Push tasks plus PILLARS constrained pillars, on level 1's
# arena; the numbers are ours (the paper gives none).
PILLAR_TASKS = {"SafetyPointPillarsGoal1-v0": "goal", "SafetyPointPillarsPush1-v0": "push"}
PILLARS = {"num": 4, "size": 0.2}


def _register_pillar_tasks(sg) -> None:
    from safety_gymnasium import tasks
    from safety_gymnasium.assets.geoms import Pillars
    from safety_gymnasium.tasks.safe_navigation.goal.goal_level0 import GoalLevel0
    from safety_gymnasium.tasks.safe_navigation.push.push_level0 import PushLevel0

    def with_pillars(base):
        class PillarsLevel1(base):
            def __init__(self, config) -> None:
                super().__init__(config=config)
                self.placements_conf.extents = [-1.5, -1.5, 1.5, 1.5]
                self._add_geoms(Pillars(is_constrained=True, **PILLARS))
        return PillarsLevel1

    # the builder maps "SafetyPointPillarsGoal1-v0" to the task class PillarsGoalLevel1
    tasks.PillarsGoalLevel1, tasks.PillarsPushLevel1 = with_pillars(GoalLevel0), with_pillars(PushLevel0)
    for env_id in PILLAR_TASKS:
        sg.register(id=env_id, entry_point="safety_gymnasium.builder:Builder", max_episode_steps=1000,
                    kwargs={"config": {"agent_name": "Point"}, "task_id": env_id})


# True while a SafetyGymEnv made with fast_reset=True resets (per thread: a context variable).
_FAST_RESET = contextvars.ContextVar("saferl_sg_fast_reset", default=False)
# Replaces assets.yaml's skybox (six star_hd PNGs, ~0.95 s to decode on every world build).
_PLAIN_SKYBOX = {"@type": "skybox", "@builtin": "gradient", "@rgb1": "0.4 0.6 0.8",
                 "@rgb2": "0 0 0", "@width": "32", "@height": "32"}


def _install_fast_reset() -> None:
    """Give ``safety_gymnasium.world`` a ``yaml`` whose ``load`` caches the parsed asset config
    (World.build re-reads configs/assets.yaml on every reset) and, while ``_FAST_RESET`` is set,
    hands out the plain skybox. Nothing else in World.build changes."""
    import safety_gymnasium.world as world

    real_yaml = world.yaml
    if getattr(real_yaml, "_saferl_fast_reset", False):
        return
    cache: dict[str, Any] = {}

    class _CachingYaml:
        _saferl_fast_reset = True
        FullLoader = real_yaml.FullLoader

        @staticmethod
        def load(stream, Loader):  # noqa: N803  (yaml's own argument name)
            name = getattr(stream, "name", None)
            if not isinstance(name, str):
                return real_yaml.load(stream, Loader=Loader)
            if name not in cache:
                cache[name] = real_yaml.load(stream, Loader=Loader)
            config = copy.deepcopy(cache[name])
            if _FAST_RESET.get() and "skybox" in config.get("textures", {}):
                config["textures"]["skybox"] = dict(_PLAIN_SKYBOX)
            return config

    world.yaml = _CachingYaml


class SafetyGymEnv:
    """A thin adapter over one ``safety_gymnasium.make(task_id)`` environment."""

    def __init__(self, env: Any, task_id: str, seed: int, render_mode: str | None = None,
                 fast_reset: bool = False, geometry: bool = False):
        self._env = env
        self.geometry = geometry
        self.task_id = task_id
        self.render_mode = render_mode
        self.fast_reset = fast_reset
        obs_space, act_space = env.observation_space, env.action_space
        if not hasattr(obs_space, "low") or not hasattr(act_space, "low"):
            raise TypeError(
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
        self.n_hazards = 0
        if geometry:
            self.n_hazards = sum(g.num for g in self._obstacles())
            self.obs_dim += 4 + 3 * self.n_hazards

    def _obstacles(self) -> list:
        task = self._env.unwrapped.task
        groups = [g for g in (getattr(task, n, None) for n in ("hazards", "pillars"))
                  if g is not None and getattr(g, "is_constrained", False)]
        if not groups:
            raise ValueError(f"{self.task_id}: no constrained hazards or pillars for a geometry tail")
        return groups

    def _geometry(self) -> dict:
        task, groups = self._env.unwrapped.task, self._obstacles()
        pos = np.concatenate([np.asarray(g.pos, np.float64).reshape(-1, 3)[:, :2] for g in groups])
        size = np.concatenate([np.full(g.num, float(g.size)) for g in groups])
        return {"robot_pos": np.asarray(task.agent.pos, np.float64)[:2].copy(),
                "robot_vel": np.asarray(task.agent.vel, np.float64)[:2].copy(),
                "obstacle_pos": pos, "obstacle_size": size}

    def _observe(self, obs) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32).reshape(-1)
        if not self.geometry:
            return obs
        g = self._geometry()
        tail = [g["robot_pos"], g["robot_vel"], np.column_stack([g["obstacle_pos"], g["obstacle_size"]]).reshape(-1)]
        return np.concatenate([obs, *tail]).astype(np.float32)

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode. The first reset without a seed uses make_env's seed; a later
        ``None`` continues the env's random stream."""
        if seed is None and not self._seeded:
            seed = self._seed
        if seed is not None:
            self._seeded = True
        token = _FAST_RESET.set(self.fast_reset)
        try:
            obs, _info = self._env.reset(seed=None if seed is None else int(seed))
        finally:
            _FAST_RESET.reset(token)
        return self._observe(obs)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(self.act_dim), self._low,
                    self._high)
        obs, reward, cost, terminated, truncated, info = self._env.step(
            a.astype(self._act_dtype, copy=False).reshape(self._act_shape))
        if self.geometry:
            info = {**info, "geometry": self._geometry()}
        return (self._observe(obs), float(reward), float(cost), bool(terminated), bool(truncated), info)

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
             fast_reset: bool | None = None, geometry: bool = False, **make_kwargs: Any) -> SafetyGymEnv:
    """Make one Safety-Gymnasium task, e.g. ``make_env("SafetyPointGoal1-v0", seed=0)``.

    ``fast_reset`` (default: on unless rendering or a Vision task) swaps the skybox for a plain
    one on resets (module docstring). ``make_kwargs`` go to ``safety_gymnasium.make`` (e.g.
    ``max_episode_steps``). The env is seeded on its first ``reset`` (with ``seed`` unless reset
    is given one)."""
    if render_mode is not None:
        make_kwargs["render_mode"] = render_mode
        if not os.environ.get("DISPLAY"):  # headless: MuJoCo's default (glfw) needs a display
            os.environ.setdefault("MUJOCO_GL", "egl")
    sg = import_safety_gymnasium()
    env = sg.make(task_id, **make_kwargs)
    env.action_space.seed(int(seed))
    if fast_reset is None:
        fast_reset = render_mode is None and "Vision" not in task_id
    return SafetyGymEnv(env, task_id, seed, render_mode, fast_reset, geometry)
