"""Your own environment as a saferl task (docs/custom_envs.md).

A config names a task outside saferl's registry and gives what the registry would:

    task: mypkg.envs:MyCostEnv        # "module:attribute" (a class or factory), or a Gymnasium id
    env:
      cost_limit: 25.0                # the constraint's threshold b on the episode cost
      max_episode_steps: 200          # episodes are truncated here (T)
      kwargs: {hazard_radius: 0.3}    # passed to the class / factory / gymnasium.make
      cost_key: cost                  # Gymnasium-style step: the info key holding the cost

The environment may step either way:
  * Gymnasium-style, ``step(a) -> (obs, reward, terminated, truncated, info)`` with the
    per-step cost in ``info[cost_key]``;
  * Safety-Gymnasium-style, ``step(a) -> (obs, reward, cost, terminated, truncated, info)``.
``reset(seed=...)`` returns ``(obs, info)`` or ``obs``. Observation and action spaces must be
``Box``es (flattened to vectors here).

``register_custom`` (called when a config is validated, in the driver) imports the entry,
builds one env, resets and steps it once with the action box's midpoint, and refuses a wrong
entry with one line naming the field (``task`` or ``env.cost_key``), before any actor starts.
It registers a ``TaskSpec`` of kind ``custom`` and the Ray ``runtime_env`` that brings the
entry's top-level package (``py_modules``) and the spec (``SAFERL_CUSTOM_TASKS``, read by
``saferl.registry`` at import) to every env host.

Numpy and the standard library only at module level; gymnasium is imported when needed.
"""
from __future__ import annotations

import importlib
import json
import sys
import sysconfig
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from saferl import registry

ENV_VAR = registry.CUSTOM_TASKS_ENV


class CustomEnvError(ValueError):
    """A custom task that cannot be used; ``str(err)`` is one line starting with the field."""


def _resolve(entry: str, field: str = "task"):
    """(factory, None) for ``module:attribute``; (None, gym id) for a Gymnasium id."""
    module, sep, attr = entry.partition(":")
    if sep:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise CustomEnvError(f"{field}: {entry}: module {err.name!r} not found (is the folder holding "
                                 f"{module.split('.')[0]!r} on sys.path / PYTHONPATH?)") from None
        except Exception as err:  # noqa: BLE001 — the user's module failed while importing
            raise CustomEnvError(f"{field}: {entry}: importing {module!r} failed: "
                                 f"{err.__class__.__name__}: {_first_line(err)}") from None
        if hasattr(mod, attr):
            target = getattr(mod, attr)
            if not callable(target):
                raise CustomEnvError(f"{field}: {entry}: {attr!r} is not a class or factory")
            return target, None
    import gymnasium as gym

    if entry in gym.registry or (sep and attr in gym.registry):
        return None, entry
    if sep:
        raise CustomEnvError(f"{field}: {entry}: module {module!r} has no {attr!r} (and it is no Gymnasium id)")
    return None, None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _is_box(space) -> bool:
    try:
        from gymnasium.spaces import Box
    except ImportError:  # pragma: no cover — gymnasium is part of the main stack
        Box = ()
    return isinstance(space, Box) or (type(space).__name__ == "Box" and hasattr(space, "low")
                                      and hasattr(space, "high") and hasattr(space, "shape"))


class CustomEnv:
    """One user environment behind the single-env adapter protocol of ``envs/vector.py``:
    flat float32 observations, actions clipped to the box, the cost from the step tuple or
    ``info[cost_key]``, and truncation at ``max_episode_steps``."""

    def __init__(self, entry: str, max_episode_steps: int, cost_key: str = "cost", env_kwargs: dict | None = None,
                 render_mode: str | None = None):
        factory, gym_id = _resolve(entry)
        kwargs = dict(env_kwargs or {})
        if render_mode:
            kwargs["render_mode"] = render_mode
        try:
            if factory is not None:
                self.env = factory(**kwargs)
            elif gym_id is not None:
                import gymnasium as gym

                self.env = gym.make(gym_id, **kwargs)
            else:
                raise CustomEnvError(f"task: {entry}: neither 'module:Class' nor a registered Gymnasium id")
        except CustomEnvError:
            raise
        except Exception as err:  # noqa: BLE001 — the user's constructor
            raise CustomEnvError(f"task: {entry}: constructing it with env.kwargs {kwargs} failed: "
                                 f"{err.__class__.__name__}: {_first_line(err)}") from None
        self.entry, self.cost_key, self.max_episode_steps = entry, cost_key, int(max_episode_steps)
        for name in ("observation_space", "action_space"):
            space = getattr(self.env, name, None)
            if space is None:
                raise CustomEnvError(f"task: {entry}: the environment has no {name}")
            if not _is_box(space):
                raise CustomEnvError(f"task: {entry}: {name} is {space}; saferl's policies need Box "
                                     "(continuous) observation and action spaces")
        obs_space, act_space = self.env.observation_space, self.env.action_space
        self.obs_dim = int(np.prod(obs_space.shape))
        self.act_dim = int(np.prod(act_space.shape))
        self.act_shape = tuple(act_space.shape)
        self.act_low = np.asarray(act_space.low, np.float32).reshape(-1)
        self.act_high = np.asarray(act_space.high, np.float32).reshape(-1)
        self.t = 0

    def _obs(self, obs) -> np.ndarray:
        x = np.asarray(obs, np.float32).reshape(-1)
        if x.shape[0] != self.obs_dim:
            raise CustomEnvError(f"task: {self.entry}: observation has {x.shape[0]} values, observation_space "
                                 f"says {self.obs_dim}")
        return x

    def reset(self, seed: int | None = None) -> np.ndarray:
        self.t = 0
        try:
            out = self.env.reset(seed=seed)
        except TypeError:  # reset() without a seed argument
            out = self.env.reset()
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            out = out[0]
        return self._obs(out)

    def step(self, action: np.ndarray):
        a = np.clip(np.asarray(action, np.float32).reshape(-1), self.act_low, self.act_high).reshape(self.act_shape)
        out = self.env.step(a)
        if not isinstance(out, tuple) or len(out) not in (5, 6):
            got = f"a {len(out)}-tuple" if isinstance(out, tuple) else type(out).__name__
            raise CustomEnvError(f"task: {self.entry}: step returned {got}; expected (obs, reward, terminated, "
                                 "truncated, info) with the cost in info, or (obs, reward, cost, terminated, "
                                 "truncated, info)")
        if len(out) == 6:
            obs, reward, cost, term, trunc, info = out
        else:
            obs, reward, term, trunc, info = out
            if not isinstance(info, dict) or self.cost_key not in info:
                keys = sorted(info) if isinstance(info, dict) else type(info).__name__
                raise CustomEnvError(f"env.cost_key: {self.entry}: step's info has no {self.cost_key!r} "
                                     f"(its keys: {keys}); return the cost there or as the third element")
            cost = info[self.cost_key]
        self.t += 1
        trunc = bool(trunc) or (self.t >= self.max_episode_steps and not bool(term))
        return self._obs(obs), float(reward), float(cost), bool(term), trunc, info

    def render(self):
        return self.env.render()

    def close(self) -> None:
        getattr(self.env, "close", lambda: None)()


def _shipped_path(entry: str) -> str | None:
    """The file or folder of the entry's top-level package, to ship to the env hosts with Ray's
    ``py_modules``; None for installed packages, saferl itself and Gymnasium ids without a module."""
    module, sep, _ = entry.partition(":")
    if not sep:
        return None
    top = sys.modules.get(module.split(".")[0])
    if top is None:
        return None
    path = Path(getattr(top, "__file__", None) or next(iter(getattr(top, "__path__", [])), ""))
    if not str(path):
        return None
    path = path.parent if path.name == "__init__.py" else path
    path = path.resolve()
    installed = [Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")]
    if top.__name__ == "saferl" or any(path.is_relative_to(p) for p in installed):
        return None
    return str(path)


def register_custom(task: str, cost_limit: float, max_episode_steps: int, env_kwargs: dict,
                    cost_key: str, algo_kind: str) -> registry.TaskSpec:
    """Check the custom task by building and stepping one env here, then register it (and the
    runtime_env its env hosts get). Raises ``CustomEnvError`` (one line naming the field)."""
    if algo_kind == "gradient":
        raise CustomEnvError(f"task: {task}: custom environments run on env hosts (sampling and off-policy "
                             "algorithms); gradient algorithms need a differentiable torch task")
    env = CustomEnv(task, max_episode_steps, cost_key, env_kwargs)
    try:
        env.reset(seed=0)
        mid = np.where(np.isfinite(env.act_low) & np.isfinite(env.act_high), (env.act_low + env.act_high) / 2, 0.0)
        try:
            env.step(mid.astype(np.float32))
        except CustomEnvError:
            raise
        except Exception as err:  # noqa: BLE001 — the user's step
            raise CustomEnvError(f"task: {task}: step failed: {err.__class__.__name__}: {_first_line(err)}") from None
    finally:
        env.close()
    spec = registry.TaskSpec(task, "custom", task, float(cost_limit), int(max_episode_steps),
                             kwargs={"cost_key": cost_key, "env_kwargs": dict(env_kwargs)})
    registry.register_task(spec)
    shipped = _shipped_path(task)
    registry.TASK_RUNTIME_ENVS[task] = {
        **({"py_modules": [shipped]} if shipped else {}),
        "env_vars": {ENV_VAR: json.dumps([asdict(spec)])},
    }
    return spec


def runtime_env(task: str) -> dict[str, Any]:
    """The env hosts' Ray ``runtime_env`` for a registered custom task, with its package uploaded
    to the cluster (a local folder in an actor's ``py_modules`` must first become a ``gcs://``
    URI; Ray does this itself only for job-level runtime_envs). Needs Ray to be up."""
    env = {k: (list(v) if isinstance(v, list) else dict(v))
           for k, v in registry.TASK_RUNTIME_ENVS.get(task, {}).items()}
    if env.get("py_modules"):
        import tempfile

        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed  # (ray is pinned)

        env = upload_py_modules_if_needed(env, include_gitignore=False, scratch_dir=tempfile.gettempdir())
    return env
