"""Typed run configuration: one schema for every algorithm and task.

A config is a YAML file (``configs/<algo>/<task>.yaml``, merged over the algorithm's shared
``configs/<algo>/defaults.yaml``) plus ``--set key.sub=value`` overrides.
Every error is reported as one line naming the field, e.g.
``config error: resources.num_env_hosts: Input should be greater than 0 (got -1)``.
Algorithm hyper-parameters live in ``algo_params`` and are validated by the learner's own
``Params`` model, so each algorithm documents its knobs next to its update rule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saferl import registry

REPO_ROOT = Path(__file__).resolve().parent.parent
# Installed, the shipped configs are package data (saferl/configs); in a checkout they sit beside
# the package, like cluster/ and the other top-level folders (saferl/__init__.py).
_PACKAGED = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else REPO_ROOT / "configs"
DEFAULTS = "defaults.yaml"  # per algorithm folder: the settings its task files share
FALLBACK = "fallback"  # a defaults.yaml key: "defaults" makes it the config of tasks without a file


class ConfigError(ValueError):
    """A user-facing configuration problem; ``str(err)`` is one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(Strict):
    num_env_hosts: int = Field(1, gt=0, description="env-host (or gradient-worker) actors")
    envs_per_host: int = Field(8, gt=0, description="vectorised envs inside each host")
    num_cpus_per_host: float = Field(1.0, gt=0)
    num_gpus_per_learner: float = Field(0.0, ge=0, description="fractions allowed, e.g. 0.5")
    num_gpus_per_host: float = Field(0.0, ge=0, description="for gradient workers; fractions allowed")
    max_actor_restarts: int = Field(
        10, ge=-1, description="times Ray restarts a dead env host, gradient worker or world-model "
        "actor (the coordinator restores it and retries the iteration); -1 = unlimited, 0 = none")
    iteration_attempts: int = Field(
        4, gt=0, description="attempts of one iteration while its actors keep dying (each failed one is "
        "discarded and retried) before the run fails")
    restart_timeout_s: float = Field(
        120.0, gt=0, description="seconds a restarting actor may take to answer again (a lost node's "
        "actors are re-created on the surviving nodes) before the run fails")
    inference: Literal["host", "server"] = Field(
        "host", description="who runs the policy during rollouts: each env host (numpy, one Ray call per "
        "rollout), or one batched inference server for all hosts (torch; on a GPU with inference_gpus)")
    inference_gpus: float = Field(0.0, ge=0, description="GPUs of the inference server; fractions allowed")
    sg_python: str | None = Field(
        None, description="Safety-Gymnasium interpreter; None = $SAFERL_SG_PYTHON or the "
        ".venv-sg beside the running interpreter's venv")


class Schedule(Strict):
    """Intervals in iterations. Each algorithm phase (e.g. ``dual``) runs when
    ``iteration % every == 0``; the coordinator owns this, learners never count."""
    phases: dict[str, int] = Field(
        default_factory=dict, description="phase -> interval; unlisted phases run every iteration")
    step_phases: dict[str, int] = Field(
        default_factory=dict, description="off-policy learners' sub-updates -> interval in gradient steps "
        "(e.g. FAC-SIS: policy 3, multiplier 12, safety_index 24); an algorithm with step phases needs all listed")
    dual_before_update: bool = Field(
        False, description="sampling algorithms: run the dual phase on this iteration's episodes before the "
        "policy update, as OmniSafe and the Safety Gym reference code do; false: after it, so λ reaches the "
        "next update")
    pipeline: bool = Field(
        False, description="off-policy algorithms: the env hosts collect the next iteration's transitions while "
        "the learner updates on this one's (acting with the weights from before this update: a policy lag of one "
        "iteration); false: rollout and update alternate")
    log_every: int = Field(1, gt=0)
    checkpoint_every: int = Field(10, gt=0)
    keep_checkpoints: int = Field(3, gt=0)

    @field_validator("phases", "step_phases")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        for name, every in v.items():
            if every <= 0:
                raise ValueError(f"phase {name!r} interval must be > 0 (got {every})")
        return v


class Logging(Strict):
    csv: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = "saferl"
    ray_metrics: bool = Field(True, description="publish the headline metrics as Ray Gauges (Prometheus "
                              "export, the Ray dashboard's Grafana panels); only when running under Ray")


class Checks(Strict):
    """Bad input from environments (see README, Reliability: Bad input)."""
    on_invalid: Literal["abort", "skip_episode"] = Field(
        "abort", description="an env step with a NaN/Inf observation, reward or cost: abort the run with "
        "one line naming the env and step, or skip_episode: reset that env, mask its partial episode "
        "out of the batch and count it (health/skipped_episodes)")


class CustomEnv(Strict):
    """A task outside the registry (``task: module:Class`` or a Gymnasium id; docs/custom_envs.md)."""
    cost_limit: float = Field(description="the constraint's threshold on the episode cost")
    max_episode_steps: int = Field(gt=0, description="episode length T (episodes are truncated there)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the class / factory / gymnasium.make")
    cost_key: str = Field("cost", description="Gymnasium-style step: the info key holding the per-step cost")


class RunConfig(Strict):
    algo: str
    task: str
    seed: int = 0
    total_env_steps: int = Field(100_000, gt=0, description="budget in environment steps")
    steps_per_iteration: int = Field(
        2048, gt=0, description="env steps per iteration over all hosts (sampling and off-policy algorithms; "
        "gradient algorithms step num_env_hosts × envs_per_host envs over their horizon)")
    cost_limit: float | None = Field(None, description="None = the task's registered limit")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_root: str = "runs"
    name: str | None = None
    resources: Resources = Field(default_factory=Resources)
    schedule: Schedule = Field(default_factory=Schedule)
    logging: Logging = Field(default_factory=Logging)
    checks: Checks = Field(default_factory=Checks)
    env: CustomEnv | None = Field(None, description="a custom task's cost limit, episode length, kwargs")
    algo_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("algo")
    @classmethod
    def _known_algo(cls, v: str) -> str:
        registry.get_algo(v)  # the error lists the known names
        return v

    @model_validator(mode="after")
    def _compatible(self) -> RunConfig:
        self._custom_task()
        algo, task = registry.get_algo(self.algo), registry.get_task(self.task)
        # CGPO-ZoBG (algo_params.gradient_estimator: zobg) only rolls the torch simulator forward
        zobg = self.algo_params.get("gradient_estimator") == "zobg" and task.kind == "torch"
        if algo.kind == "gradient" and not task.differentiable and not algo.world_model and not zobg:
            raise ValueError(f"task: {self.task} is not differentiable; {self.algo} needs analytic "
                             "gradients through the simulator")
        if algo.world_model and task.kind == "safety_gymnasium":
            raise ValueError(f"task: {self.algo} steps its real env inside torch gradient workers; "
                             "Safety-Gymnasium tasks live in another interpreter")
        unknown = set(self.schedule.phases) - set(algo.phases)
        if unknown:
            raise ValueError(f"schedule.phases: {self.algo} has no phase {sorted(unknown)}; "
                             f"it has {list(algo.phases)}")
        unknown = set(self.schedule.step_phases) - set(algo.step_phases)
        if unknown:
            raise ValueError(f"schedule.step_phases: {self.algo} has no step phase {sorted(unknown)}; "
                             f"it has {list(algo.step_phases) or 'none'}")
        lagrange = self.algo_params.get("lagrange")
        if isinstance(lagrange, dict) and lagrange.get("per_gradient_step") and algo.kind != "offpolicy":
            raise ValueError(f"algo_params.lagrange.per_gradient_step: {self.algo} is {algo.kind}; only "
                             "off-policy learners count the gradient steps between dual phases")
        if self.schedule.dual_before_update and (algo.kind != "sampling" or "dual" not in algo.phases):
            raise ValueError(f"schedule.dual_before_update: only for sampling algorithms with a dual phase; "
                             f"{self.algo} is {algo.kind} with phases {list(algo.phases) or 'none'}")
        if self.schedule.pipeline and algo.kind != "offpolicy":
            raise ValueError(f"schedule.pipeline: only for off-policy algorithms (their replay decouples "
                             f"collection from updates); {self.algo} is {algo.kind}")
        missing = [k for k in algo.step_phases if k not in self.schedule.step_phases]
        if missing:  # unlisted, they would all run every gradient step: the timescales would collapse
            raise ValueError(f"schedule.step_phases: {self.algo} needs an interval in gradient steps for each of "
                             f"{list(algo.step_phases)}; missing {missing} (FAC-SIS Table 4: policy 3, "
                             f"multiplier 12, safety_index 24)")
        res = self.resources
        if res.inference_gpus and res.inference != "server":
            raise ValueError("resources.inference_gpus: GPUs for inference need resources.inference: server")
        if res.inference == "server" and self.algo_params.get("obs_norm_per_step"):
            raise ValueError("algo_params.obs_norm_per_step: the hosts' per-step statistics need them to act "
                             "themselves; not with resources.inference: server "
                             "(set algo_params.obs_norm_per_step=false to serve inference)")
        if res.inference == "server" and not algo.uses_env_hosts:
            raise ValueError(f"resources.inference: {self.algo} computes gradients in its workers; "
                             "it has no rollouts to serve")
        n_envs = res.num_env_hosts * res.envs_per_host
        if algo.uses_env_hosts and self.steps_per_iteration % n_envs:
            raise ValueError(f"steps_per_iteration: must be divisible by num_env_hosts × "
                             f"envs_per_host = {n_envs} (got {self.steps_per_iteration})")
        return self

    def _custom_task(self) -> None:
        """A registered task, or (with an ``env:`` section) a custom one, checked and registered
        here by building and stepping one env (envs/custom.py)."""
        known = registry.TASKS.get(self.task)
        if self.task in registry.UNSUPPORTED_TASKS:  # e.g. a Safety-Gymnasium Vision task
            raise ValueError(f"task: {registry.task_error(self.task)}")
        if self.env is None:
            if known is None:
                raise ValueError(f"task: {registry.task_error(self.task)} "
                                 "(or your own: 'module:Class' or a Gymnasium id with an env: section)")
            if known.kind == "custom":
                raise ValueError(f"env: {self.task} is a custom task: give env.cost_limit and env.max_episode_steps")
            return
        if known is not None and known.kind != "custom":
            raise ValueError(f"env: {self.task} is a registered task (cost limit {known.cost_limit:g}, "
                             f"T {known.max_episode_steps}); the env section is for tasks outside the registry")
        from saferl.envs.custom import register_custom

        e = self.env
        register_custom(self.task, e.cost_limit, e.max_episode_steps, e.kwargs, e.cost_key,
                        registry.get_algo(self.algo).kind)

    # -- derived values --------------------------------------------------------------------
    @property
    def task_spec(self) -> registry.TaskSpec:
        return registry.get_task(self.task)

    @property
    def algo_spec(self) -> registry.AlgoSpec:
        return registry.get_algo(self.algo)

    @property
    def limit(self) -> float:
        return self.task_spec.cost_limit if self.cost_limit is None else self.cost_limit

    def phase_every(self, phase: str) -> int:
        return self.schedule.phases.get(phase, 1)

    def learner_params(self):
        """The algorithm's validated hyper-parameters (errors name ``algo_params.<field>``)."""
        params_cls = self.algo_spec.load().Params
        try:
            return params_cls(**self.algo_params)
        except ValidationError as err:
            raise ConfigError(_one_line(err, prefix="algo_params")) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _one_line(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r})"
        parts.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return "config error: " + "; ".join(parts)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["resources.num_env_hosts=2", "algo_params.lr=1e-3"]`` -> nested dict (YAML-typed values)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"config error: --set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: --set {key}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def resolve_path(name_or_path: str) -> tuple[Path, dict]:
    """A config path, or a short name ``algo/task`` found under ``configs/``; returns the file
    and the fields to override in it. A task without its own file uses its base task's (followed
    until one exists) with ``task`` replaced: e.g. ``shac/SafeGBPOPendulum-RM-v0`` the plain
    task's, ``ppo_lag/SafetyDoggoGoal2-v0`` the algorithm's SafetyPointGoal1-v0 config.
    ``load_config`` merges the file over the ``defaults.yaml`` beside it. A ``defaults.yaml`` with
    ``fallback: defaults`` is itself the config of every Safety-Gymnasium task without a file (its
    task files hold per-task sections, as OmniSafe's off-policy configs do, that other tasks must
    not take)."""
    p = Path(name_or_path)
    for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            if cand.name == DEFAULTS:
                raise ConfigError(f"config error: {name_or_path} holds the settings the configs beside it share, "
                                  f"not a task; name one of them, e.g. {cand.parent.name}/<task>")
            return cand, {}
    algo, _, task = name_or_path.removesuffix(".yaml").rpartition("/")
    if task in registry.UNSUPPORTED_TASKS:
        raise ConfigError(f"config error: task: {registry.task_error(task)}")
    defaults = CONFIG_DIR / algo / DEFAULTS
    if (task in registry.TASKS and registry.TASKS[task].kind == "safety_gymnasium" and defaults.is_file()
            and _read_yaml(defaults).get(FALLBACK) == "defaults"):
        return defaults, {"task": task}
    base = registry.TASKS[task].base if task in registry.TASKS else None
    while base:
        if (CONFIG_DIR / algo / f"{base}.yaml").is_file():
            return CONFIG_DIR / algo / f"{base}.yaml", {"task": task}
        base = registry.TASKS[base].base
    raise ConfigError(f"config error: config file {name_or_path!r} does not exist")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config error: {path}: not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping")
    return data


def read_config_file(path: Path) -> dict:
    """A config file's fields: the file merged over the ``defaults.yaml`` beside it (deep, the
    file winning), so ``configs/<algo>/<task>.yaml`` states only how its task differs."""
    defaults = path.parent / DEFAULTS
    data = _read_yaml(path)
    merged = _merge(_read_yaml(defaults), data) if defaults.is_file() else data
    merged.pop(FALLBACK, None)
    return merged


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Load, merge overrides, validate (including the algorithm's hyper-parameters)."""
    if isinstance(source, dict):
        data = source
    else:
        path, implied = resolve_path(str(source))
        data = {**read_config_file(path), **implied}
    data = _merge(data, parse_overrides(overrides or []))
    try:
        cfg = RunConfig(**data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
    cfg.learner_params()  # validate hyper-parameters now, not minutes later inside an actor
    return cfg
