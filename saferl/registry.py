"""Registries of algorithms and tasks: the names a config may use.

Entries are plain data with lazy import paths so that ``saferl list`` and config validation stay
cheap and never import torch, Ray or a simulator.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal

EnvKind = Literal["safety_gymnasium", "gymnasium", "torch", "custom"]  # custom: envs/custom.py
AlgoKind = Literal["sampling", "gradient", "offpolicy"]


@dataclass(frozen=True)
class AlgoSpec:
    name: str
    kind: AlgoKind  # sampling: env hosts' batches go to the learner; offpolicy: through a replay
    # buffer; gradient: gradient workers return ∇J
    learner: str  # "module:Class" of the learner (its nested ``Params`` model holds hyper-parameters)
    phases: tuple[str, ...]  # schedule phases (e.g. "dual"; "world_model" runs on the world-model actor)
    paper: str
    world_model: bool = False  # gradients come from a learned model: the task need not be differentiable
    pretrain: str | None = None  # "module:function(cfg, run_dir, console) -> cfg" run before training
    step_phases: tuple[str, ...] = ()  # off-policy updates run every k-th gradient step (schedule.step_phases)

    @property
    def uses_env_hosts(self) -> bool:
        return self.kind in ("sampling", "offpolicy")

    def load(self):
        return _resolve(self.learner)

    def load_pretrain(self):
        return _resolve(self.pretrain) if self.pretrain else None


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: EnvKind
    entry: str  # safety_gymnasium / gymnasium id, or "module:Class" of a torch env
    cost_limit: float
    max_episode_steps: int
    differentiable: bool = False
    kwargs: dict = field(default_factory=dict)
    # a task without its own config file for an algorithm uses its base's (followed until a file exists;
    # e.g. a safeguarded variant its plain task's, a Safety-Gymnasium task its family representative's)
    base: str | None = None


ALGORITHMS: dict[str, AlgoSpec] = {}
TASKS: dict[str, TaskSpec] = {}
# Custom tasks (a config's ``env:`` section, envs/custom.py): the Ray runtime_env their env hosts
# get (py_modules, and this variable holding their specs, read below when an actor imports us).
TASK_RUNTIME_ENVS: dict[str, dict] = {}
CUSTOM_TASKS_ENV = "SAFERL_CUSTOM_TASKS"


def register_algo(spec: AlgoSpec) -> None:
    ALGORITHMS[spec.name] = spec


def register_task(spec: TaskSpec) -> None:
    TASKS[spec.name] = spec


register_algo(AlgoSpec("ppo_lag", "sampling", "saferl.learners.ppo_lag:PPOLag", ("dual",),
                       "Ray, Achiam & Amodei 2019 (Safety Gym); PPO: Schulman et al. 2017"))
register_algo(AlgoSpec("ppo", "sampling", "saferl.learners.ppo_lag:PPO", (),
                       "Schulman et al. 2017 (unconstrained)"))
register_algo(AlgoSpec("trpo_lag", "sampling", "saferl.learners.trpo_lag:TRPOLag", ("dual",),
                       "Ray, Achiam & Amodei 2019 (Safety Gym); TRPO: Schulman et al. 2015"))
register_algo(AlgoSpec("trpo", "sampling", "saferl.learners.trpo_lag:TRPO", (),
                       "Schulman et al. 2015 (unconstrained)"))
register_algo(AlgoSpec("cpo", "sampling", "saferl.learners.cpo:CPO", (),
                       "Achiam, Held, Tamar & Abbeel 2017 (the constraint is handled in the step: no dual phase)"))
register_algo(AlgoSpec("cppo_pid", "sampling", "saferl.learners.ppo_lag:CPPOPID", ("dual",),
                       "Stooke, Achiam & Abbeel 2020 (PID Lagrangian, Algorithm 2) on PPO-Lag"))
register_algo(AlgoSpec("rcpo", "sampling", "saferl.learners.rcpo:RCPO", ("dual",),
                       "Tessler, Mankowitz & Mannor 2019 (penalised reward r − λc, one critic), on PPO"))
register_algo(AlgoSpec("focops", "sampling", "saferl.learners.focops:FOCOPS", ("dual",),
                       "Zhang, Vuong & Ross 2020 (FOCOPS, eq 7-8; ν on the dual phase)"))
register_algo(AlgoSpec("cup", "sampling", "saferl.learners.cup:CUP", ("dual",),
                       "Yang, Ji, Dai et al. 2022 (Constrained Update Projection; ν on the dual phase)"))
register_algo(AlgoSpec("pdo", "sampling", "saferl.learners.pdo:PDO", ("dual",),
                       "Chow, Ghavamzadeh, Janson & Pavone 2018 (primal-dual policy gradient on J_R − λ(J_C − b); "
                       "λ on the dual phase)"))
register_algo(AlgoSpec("appo", "sampling", "saferl.learners.appo:APPO", ("dual",),
                       "Dai, Ji, Yang, Zheng & Pan 2023 (augmented-Lagrangian PPO; λ ← max(0, λ + σ(J_C − b)) "
                       "on the dual phase)"))
register_algo(AlgoSpec("pcpo", "sampling", "saferl.learners.pcpo:PCPO", (),
                       "Yang, Rosca, Narasimhan & Ramadge 2020 (the projection is in the step: no dual phase)"))
register_algo(AlgoSpec("trpo_unsafe", "sampling", "saferl.learners.strpo:UnsafeTRPO", (),
                       "sTRPO paper §4.1, eq 3-4: stage 1, TRPO maximising the cost with a CVaR critic"))
register_algo(AlgoSpec("strpo", "sampling", "saferl.learners.strpo:STRPO", ("dual",),
                       "sTRPO paper §4.2-4.3, eq 6-10; stage 1 (trpo_unsafe) first unless "
                       "algo_params.unsafe_policy names one", pretrain="saferl.cluster.stages:unsafe_policy_stage"))
register_algo(AlgoSpec("sac_lag", "offpolicy", "saferl.learners.sac_lag:SACLag", ("dual",),
                       "SAC: Haarnoja et al. 2018; Lagrangian as in FSRL / OmniSafe"))
register_algo(AlgoSpec("sac", "offpolicy", "saferl.learners.sac_lag:SAC", (),
                       "Haarnoja et al. 2018 (unconstrained)"))
register_algo(AlgoSpec("cvpo", "offpolicy", "saferl.learners.cvpo:CVPO", (),
                       "CVPO paper, Algorithm 2, eq 7-9 (E-step), 78-84 (M-step); the duals are solved per update"))
register_algo(AlgoSpec("fac_sis", "offpolicy", "saferl.learners.fac_sis:FACSIS", (),
                       "FAC-SIS paper, Algorithm 1, eq 2-4, 10-13 (safety-index synthesis on three timescales)",
                       step_phases=("policy", "multiplier", "safety_index")))
register_algo(AlgoSpec("fac", "offpolicy", "saferl.learners.fac_sis:FAC", (),
                       "the FAC-SIS paper's baseline: FAC with a fixed safety index (φ0, φ_h, φ_F of Table 2; "
                       "algo_params.learn_index false)", step_phases=("policy", "multiplier")))
register_algo(AlgoSpec("td3_lag", "offpolicy", "saferl.learners.td3_lag:TD3Lag", ("dual",),
                       "TD3: Fujimoto, van Hoof & Meger 2018; Lagrangian as in FSRL / OmniSafe"))
register_algo(AlgoSpec("td3", "offpolicy", "saferl.learners.td3_lag:TD3", (),
                       "Fujimoto, van Hoof & Meger 2018 (unconstrained)"))
register_algo(AlgoSpec("ddpg_lag", "offpolicy", "saferl.learners.td3_lag:DDPGLag", ("dual",),
                       "DDPG: Lillicrap et al. 2016; Lagrangian as in FSRL / OmniSafe"))
register_algo(AlgoSpec("ddpg", "offpolicy", "saferl.learners.td3_lag:DDPG", (),
                       "Lillicrap et al. 2016 (unconstrained)"))
register_algo(AlgoSpec("bptt_lag", "gradient", "saferl.learners.bptt_lag:BPTTLag", ("dual",),
                       "CGPO paper, Appendix F.1, eq 75-80"))
register_algo(AlgoSpec("shac_lag", "gradient", "saferl.learners.shac_lag:SHACLag", ("dual",),
                       "CGPO paper, Appendix F.1; SHAC: Xu et al. 2022"))
register_algo(AlgoSpec("cgpo", "gradient", "saferl.learners.cgpo:CGPO", (),
                       "CGPO paper, Algorithm 1-2, eq 6-20"))
register_algo(AlgoSpec("mb_cgpo", "gradient", "saferl.learners.cgpo:MBCGPO", ("world_model",),
                       "CGPO paper, Algorithm 3, eq 85", world_model=True))
register_algo(AlgoSpec("shac", "gradient", "saferl.learners.shac_lag:SHAC", (),
                       "Xu et al. 2022 (unconstrained)"))

# Safety-Gymnasium 1.0.0's tasks, as its safety_gymnasium/__init__.py registers them: navigation tasks
# of every agent at levels 0-2 (Run at level 0 only) with its episode lengths, and the velocity tasks.
# Cost limit 25 is the benchmark convention (OmniSafe's). Fading tasks fade their goal in
# camera images only: with these (lidar) observations they are Goal tasks.
SG_AGENTS = ("Point", "Car", "Doggo", "Racecar", "Ant")
SG_NAVIGATION: dict[str, tuple[tuple[int, ...], int]] = {  # task -> (levels, max_episode_steps)
    "Goal": ((0, 1, 2), 1000), "Button": ((0, 1, 2), 1000), "Push": ((0, 1, 2), 1000),
    "FadingEasy": ((0, 1, 2), 1000), "FadingHard": ((0, 1, 2), 1000),
    "Circle": ((0, 1, 2), 500), "Run": ((0,), 500),
}
SG_VELOCITY_AGENTS = ("Ant", "HalfCheetah", "Hopper", "Humanoid", "Swimmer", "Walker2d")  # -v0, -v1; T 1000
# Ids Safety-Gymnasium registers that cannot train here, by the part of the id that marks them (the
# test checks these plus the registered ones are exactly Safety-Gymnasium's ids). Refused in one
# line by get_task and config loading, before any actor starts.
SG_UNSUPPORTED = {
    "Vision": "has image observations (a Dict space); saferl's policies take flat Box observations",
    "Debug": "is a keyboard-controlled debug variant (actions come from the keyboard, not the policy)",
    "Race": "cannot be built: the Safety-Gymnasium 1.0.0 package lacks the Race tasks' texture files",
}
SG_TASKS: list[str] = []  # the ids registered below
UNSUPPORTED_TASKS: dict[str, str] = {}  # id -> one-line reason


def _sg_config_base(task_id: str, family: str) -> str | None:
    """Where a task without its own config file for an algorithm takes one (TaskSpec.base, followed
    until a file exists): its family's representative, then the navigation one."""
    chain = {"SafetyPointCircle1-v0": "SafetyCarCircle1-v0", "SafetyCarCircle1-v0": "SafetyPointGoal1-v0",
             "SafetyAntVelocity-v1": "SafetyHopperVelocity-v1", "SafetyHopperVelocity-v1": "SafetyPointGoal1-v0",
             "SafetyPointGoal1-v0": None}
    head = {"Circle": "SafetyPointCircle1-v0", "Velocity": "SafetyAntVelocity-v1"}.get(family, "SafetyPointGoal1-v0")
    return chain.get(task_id, head)


def _refuse(task_id: str, marker: str, use: str | None = None) -> None:
    UNSUPPORTED_TASKS[task_id] = f"{task_id} {SG_UNSUPPORTED[marker]}" + (f"; use {use}" if use else "")


for _agent in SG_AGENTS:
    _variants = ("Vision", "Debug") if _agent in ("Point", "Car", "Racecar") else ("Vision",)  # as SG makes them
    for _task, (_levels, _steps) in SG_NAVIGATION.items():
        for _level in _levels:
            _id = f"Safety{_agent}{_task}{_level}-v0"
            register_task(TaskSpec(_id, "safety_gymnasium", _id, 25.0, _steps, base=_sg_config_base(_id, _task)))
            SG_TASKS.append(_id)
            for _v in _variants:
                _refuse(_id.replace("-v0", f"{_v}-v0"), _v, use=_id)
    for _level in (0, 1, 2):
        for _v in ("", *_variants):
            _refuse(f"Safety{_agent}Race{_level}{_v}-v0", "Race")
for _agent in SG_VELOCITY_AGENTS:
    for _version in (0, 1):
        _id = f"Safety{_agent}Velocity-v{_version}"
        register_task(TaskSpec(_id, "safety_gymnasium", _id, 25.0, 1000, base=_sg_config_base(_id, "Velocity")))
        SG_TASKS.append(_id)

# Point-robot hazard tasks with the geometry tail safety-index learners read (the FAC-SIS paper's
# Hazards Goal / Push): FAC-SIS asks for zero violations, so the limit is 0.
# Pillars variants: envs/safety_gym.py builds them (Safety-Gymnasium has no constrained pillars).
for _id in ("SafetyPointGoal1", "SafetyPointPush1", "SafetyPointPillarsGoal1", "SafetyPointPillarsPush1"):
    register_task(TaskSpec(f"{_id}-SIS-v0", "safety_gymnasium", f"{_id}-v0", 0.0, 1000, kwargs={"geometry": True}))

# CGPO's FunctionEnv (CGPO paper, Appendix C / F.4.1): J_C = sum_{t<100} f(x_t) <= 8.
register_task(TaskSpec("FunctionEnv-v0", "torch", "saferl.envs.function_env:FunctionEnv", 8.0, 100,
                       differentiable=True))
register_task(TaskSpec("FunctionEnvFloor-v0", "torch", "saferl.envs.function_env:FunctionEnv", 8.0,
                       100, differentiable=False, kwargs={"floor": True}))

# CGPO's differentiable Brax tasks (CGPO paper, Appendix E, Table 4: limits and episode lengths).
# CartPole's cost is −x² with J_C <= −50 (the cart must stay away from the origin).
for _id, _cls, _limit, _steps in [
    ("BraxCartPole-v0", "BraxCartPole", -50.0, 300),
    ("BraxReacher-v0", "BraxReacher", 400.0, 300),
    ("BraxHalfCheetahVel-v0", "BraxHalfCheetahVel", 400.0, 200),
    ("BraxAntVel-v0", "BraxAntVel", 1000.0, 300),
]:
    register_task(TaskSpec(_id, "torch", f"saferl.envs.brax_tasks:{_cls}", _limit, _steps,
                           differentiable=True))
# CartPole whose fallen pole (past 1.4 rad, short of the ±π/2 hinge limit) is put back upright within
# the fixed horizon: a continuing stand-in for Brax's termination (envs/brax_tasks.py: BraxCartPole).
register_task(TaskSpec("BraxCartPole-v1", "torch", "saferl.envs.brax_tasks:BraxCartPole", -50.0, 300,
                       differentiable=True, kwargs={"pole_reset": 1.4}))

# FAC-SIS's custom point/hazard task (FAC-SIS paper, App. E.2): goal (0, 5), one hazard of radius 0.5,
# 120 steps, three initial distributions (Table 1). Safety is state-wise (never enter the hazard),
# so the limit is 0; the observation ends with the geometry tail a safety index reads.
for _d in (1, 2, 3):
    register_task(TaskSpec(f"PointHazard-D{_d}-v0", "torch", "saferl.envs.point_hazard:PointHazardEnv", 0.0, 120,
                           differentiable=True, kwargs={"distribution": _d},
                           base=None if _d == 1 else "PointHazard-D1-v0"))  # D2, D3 use D1's configs

# Non-differentiable Swimmer (CGPO paper, Appendix F.4.1): for MB-CGPO and sampling baselines.
register_task(TaskSpec("SwimmerVelocity-v0", "gymnasium", "Swimmer-v5", 150.0, 300,
                       kwargs={"cost": "speed"}))

# SafeGBPO's balancing tasks (SafeGBPO paper, Appendix 7.1): T 240. The cost is the safety monitor,
# 1 per step on which the state leaves the RCI set or the feasible state box; the paper's
# safeguards guarantee no violation ever, so the limit is 0 (any cost is a failure, not a budget).
for _id, _cls in [("SafeGBPOPendulum-v0", "SafeGBPOPendulum"),
                  ("SafeGBPOQuadrotor-v0", "SafeGBPOQuadrotor")]:
    register_task(TaskSpec(_id, "torch", f"saferl.envs.safegbpo_tasks:{_cls}", 0.0, 240,
                           differentiable=True))

# SafeGBPO safeguarded tasks (SafeGBPO paper, §5-6): the policy's action passes through a safeguard onto
# the safe action set. The next-state set is the Taylor expansion at the current state (paper
# eq 12-14: exact, as both tasks are affine in action and noise), so the guarantee holds for the
# real step; a linearisation at the origin (the fixed point the reference code's wrappers use) left ~6% of Pendulum
# steps outside the RCI set here. The variants are the paper's Tables 3-5: base boundary
# projection (BP) and ray mask (RM: linear map, zonotopic safe centre), and the modifications.
SAFEGUARD_VARIANTS: dict[str, dict] = {
    "BP": {"kind": "boundary_projection"},
    "BPReg": {"kind": "boundary_projection", "c_reg": 0.1},
    "RM": {"kind": "ray_mask_linear", "centre": "zonotopic"},
    "RMReg": {"kind": "ray_mask_linear", "centre": "zonotopic", "c_reg": 0.1},
    "RMPass": {"kind": "ray_mask_linear", "centre": "zonotopic", "passthrough": True},
    "RMHyp": {"kind": "ray_mask_hyperbolic", "centre": "zonotopic"},
    "RMHypReg": {"kind": "ray_mask_hyperbolic", "centre": "zonotopic", "c_reg": 0.1},
    "RMOrth": {"kind": "ray_mask_linear", "centre": "orthogonal"},
}
for _base, _sys in [("SafeGBPOPendulum", "pendulum"), ("SafeGBPOQuadrotor", "quadrotor")]:
    for _tag, _kw in SAFEGUARD_VARIANTS.items():
        register_task(TaskSpec(f"{_base}-{_tag}-v0", "torch", "saferl.envs.safeguards:SafeguardedEnv", 0.0, 240,
                               differentiable=True, kwargs={"task": _sys, "linearise": "state", **_kw},
                               base=f"{_base}-v0"))


def _register_custom_from_environment() -> None:
    import json
    import os

    for spec in json.loads(os.environ.get(CUSTOM_TASKS_ENV) or "[]"):
        register_task(TaskSpec(**spec))


_register_custom_from_environment()


def get_algo(name: str) -> AlgoSpec:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


def task_error(name: str) -> str:
    """One line for a name that is no registered task: a refused Safety-Gymnasium id says why,
    otherwise the closest known names (``saferl list`` shows them all)."""
    if name in UNSUPPORTED_TASKS:
        return UNSUPPORTED_TASKS[name]
    import difflib

    close = difflib.get_close_matches(name, list(TASKS), n=5, cutoff=0.8)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown task {name!r}{hint}; `saferl list` shows the {len(TASKS)} known ones"


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(task_error(name))
    return TASKS[name]
