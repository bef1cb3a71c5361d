"""Every off-policy algorithm of the benchmark ships a config for each of CVPO's Safety-Gymnasium
tasks, at the off-policy benchmark's scale: CVPO's are Table 1's on every task, SAC's its learner's
defaults, the Lagrangian baselines' OmniSafe 0.5's (its defaults and per-task sections)."""
from __future__ import annotations

import pytest

from saferl import registry
from saferl.config import CONFIG_DIR, load_config
from saferl.tools.studies.benchmark_offpolicy import OFFPOLICY_ALGOS, OFFPOLICY_TASKS

PAIRS = [(algo, task) for algo in OFFPOLICY_ALGOS for task in OFFPOLICY_TASKS]


def test_the_benchmark_lists_registered_off_policy_algorithms_and_cvpos_tasks():
    assert len(set(OFFPOLICY_ALGOS)) == len(OFFPOLICY_ALGOS) == 5
    for algo in OFFPOLICY_ALGOS:
        assert registry.get_algo(algo).kind == "offpolicy", algo
    assert {(t.split("-")[0][6:]) for t in OFFPOLICY_TASKS} == {
        "PointGoal1", "CarGoal1", "PointButton1", "CarButton1", "PointCircle1", "CarCircle1"}
    for task in OFFPOLICY_TASKS:
        spec = registry.get_task(task)
        assert spec.kind == "safety_gymnasium" and spec.cost_limit == 25.0 and spec.entry == task, task
    # the real episode lengths (Safety-Gymnasium's max_episode_steps)
    assert registry.get_task("SafetyCarButton1-v0").max_episode_steps == 1000
    assert registry.get_task("SafetyPointCircle1-v0").max_episode_steps == 500


@pytest.mark.parametrize("algo,task", PAIRS, ids=[f"{a}/{t}" for a, t in PAIRS])
def test_shipped_config_loads_and_validates(algo, task):
    assert (CONFIG_DIR / algo / f"{task}.yaml").is_file(), f"missing configs/{algo}/{task}.yaml"
    cfg = load_config(f"{algo}/{task}")
    assert (cfg.algo, cfg.task) == (algo, task)
    params = cfg.learner_params()
    cls = registry.get_algo(algo).load().Params
    assert isinstance(params, cls)
    assert (cfg.total_env_steps, cfg.steps_per_iteration) == (1_000_000, 2_000)
    assert (cfg.resources.num_env_hosts, cfg.resources.envs_per_host) == (2, 10)
    assert cfg.schedule.phases == ({"dual": 1} if registry.get_algo(algo).phases else {})  # sac, cvpo: none
    assert cfg.limit == 25.0
    assert params.hidden == [256, 256]
    if algo == "cvpo":  # Table 1 (the learner's defaults), with our update-to-data ratio
        assert params == cls(utd=0.1)
        assert (params.batch_size, params.particles, params.mstep_iters, params.kl_estep, params.kl_mean,
                params.kl_cov, params.policy_lr, params.critic_lr, params.tau) == (
                    300, 32, 6, 0.1, 1e-3, 1e-4, 0.002, 1e-3, 0.005)
    elif algo in OMNISAFE:  # OmniSafe 0.5's <Algo>.yaml, its defaults and the task's section
        assert params == cls(**omnisafe_settings(algo, task))
    else:  # the learner's defaults, written out
        assert params == cls()


# OmniSafe 0.5's off-policy configs (omnisafe/configs/off-policy/{SACLag,TD3Lag,DDPGLag}.yaml) in
# saferl's names: the defaults, then the sections of Goal1 and Circle1 (Button1 has none).
OMNISAFE_COMMON = {"batch_size": 256, "utd": 1.0, "buffer_capacity": 1_000_000, "tau": 0.005, "gamma": 0.99,
                   "max_grad_norm": 40.0, "hidden": [256, 256], "init": "kaiming_uniform"}
OMNISAFE = {"sac_lag": {"warmup_steps": 10_000, "policy_delay": 2, "auto_alpha": False, "init_alpha": 0.2,
                        "cost_target": "mean"},  # its code, not a key: the cost critic's step is DDPG's
            "td3_lag": {"warmup_steps": 25_000, "policy_delay": 2, "exploration_noise": 0.1, "target_noise": 0.2,
                        "noise_clip": 0.5},
            "ddpg_lag": {"warmup_steps": 25_000, "policy_delay": 1, "exploration_noise": 0.1}}
OMNISAFE_LAGRANGE = {"kind": "adam", "init": 0.001, "lr": 1e-5, "window": 50, "warmup": 101, "per_gradient_step": True}
OMNISAFE_TASK_SECTIONS = {"policy_lr": 5e-6, "critic_lr": 1e-3, "lagrange": {"init": 0.0, "lr": 5e-7}}


def omnisafe_settings(algo: str, task: str) -> dict:
    out = {**OMNISAFE_COMMON, **OMNISAFE[algo], "policy_lr": 3e-4, "critic_lr": 3e-4,
           "lagrange": dict(OMNISAFE_LAGRANGE)}
    out["cost_normalize"] = True  # defaults: True; the Goal1 / Circle1 sections of SACLag and TD3Lag: False
    if "Goal1" in task or "Circle1" in task:
        out.update(policy_lr=5e-6, critic_lr=1e-3)
        out["cost_normalize"] = algo == "ddpg_lag"
        out["lagrange"].update(OMNISAFE_TASK_SECTIONS["lagrange"])
        if algo == "sac_lag":
            out["init_alpha"] = 1e-5
    return out


def test_omnisafe_settings_reach_the_learners():
    """A few values against OmniSafe's yaml by name, so a slip in the table above cannot hide."""
    goal = load_config("sac_lag/SafetyPointGoal1-v0").learner_params()
    assert (goal.policy_lr, goal.critic_lr, goal.init_alpha, goal.lagrange.lr, goal.lagrange.init) == (
        0.000005, 0.001, 0.00001, 0.0000005, 0.0)
    button = load_config("ddpg_lag/SafetyCarButton1-v0").learner_params()
    assert (button.n_critics, button.policy_delay, button.warmup_steps, button.lagrange.lr) == (1, 1, 25000, 1e-5)


def settings(algo: str, task: str) -> dict:
    """The loaded config (defaults.yaml merged with the task's file) without its task."""
    data = load_config(f"{algo}/{task}").model_dump(mode="json")
    assert data.pop("task") == task
    return data


@pytest.mark.parametrize("algo", OFFPOLICY_ALGOS)
def test_same_settings_on_every_task(algo):
    """The configs differ only in the task; the OmniSafe baselines within the tasks OmniSafe
    configures alike (Goal1 and Circle1; Button1)."""
    groups = ([[t for t in OFFPOLICY_TASKS if "Button" in t], [t for t in OFFPOLICY_TASKS if "Button" not in t]]
              if algo in OMNISAFE else [OFFPOLICY_TASKS])
    for group in groups:
        ref = settings(algo, group[0])
        for task in group[1:]:
            assert settings(algo, task) == ref, task


@pytest.mark.parametrize("algo", sorted(OMNISAFE))
def test_tasks_without_a_file_take_omnisafes_defaults_not_goal1s_section(algo):
    """OmniSafe's per-task sections are Goal1's and Circle1's; every other Safety-Gymnasium task (the
    velocity tasks, Push, Goal2, ...) runs its defaults. A task without a config file therefore takes
    ``defaults.yaml`` here (``fallback: defaults``), not the Goal1 file other algorithms fall back to."""
    for task in ("SafetyHopperVelocity-v1", "SafetyAntVelocity-v1", "SafetyPointPush1-v0", "SafetyCarGoal2-v0"):
        cfg = load_config(f"{algo}/{task}")
        assert cfg.task == task and cfg.schedule.phases == {"dual": 1}
        assert cfg.learner_params() == registry.get_algo(algo).load().Params(
            **omnisafe_settings(algo, "SafetyPointButton1-v0")), task
    # elsewhere the base task's file stays the fallback (a safeguarded pendulum takes the plain one's)
    assert load_config(f"{algo}/SafeGBPOPendulum-RM-v0").learner_params() == load_config(
        f"{algo}/SafeGBPOPendulum-v0").learner_params()
