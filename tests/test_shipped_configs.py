"""Every on-policy algorithm of the benchmark ships a config for every Safety-Gymnasium task, at
OmniSafe's benchmark scale, with the same hyper-parameters on every task."""
from __future__ import annotations

import pytest

from saferl import registry
from saferl.config import CONFIG_DIR, load_config
from saferl.tools.studies.benchmark_onpolicy import ONPOLICY_ALGOS, SAFETY_GYM_TASKS

PAIRS = [(algo, task) for algo in ONPOLICY_ALGOS for task in SAFETY_GYM_TASKS]


def test_the_benchmark_lists_registered_on_policy_algorithms_and_safety_gym_tasks():
    assert len(set(ONPOLICY_ALGOS)) == len(ONPOLICY_ALGOS) and len(SAFETY_GYM_TASKS) == 6
    for algo in ONPOLICY_ALGOS:
        assert registry.get_algo(algo).kind == "sampling", algo
    for task in SAFETY_GYM_TASKS:
        spec = registry.get_task(task)
        assert spec.kind == "safety_gymnasium" and spec.cost_limit == 25.0, task


@pytest.mark.parametrize("algo,task", PAIRS, ids=[f"{a}/{t}" for a, t in PAIRS])
def test_shipped_config_loads_and_validates(algo, task):
    assert (CONFIG_DIR / algo / f"{task}.yaml").is_file(), f"missing configs/{algo}/{task}.yaml"
    cfg = load_config(f"{algo}/{task}")
    assert (cfg.algo, cfg.task) == (algo, task)
    assert isinstance(cfg.learner_params(), registry.get_algo(algo).load().Params)
    epoch = 15_000 if algo == "strpo" else 20_000  # sTRPO: the paper's epoch
    assert (cfg.total_env_steps, cfg.steps_per_iteration) == (10_000_000, epoch)  # OmniSafe's budget
    assert set(cfg.schedule.phases) == set(registry.get_algo(algo).phases)  # e.g. ppo: no dual phase
    assert cfg.limit == 25.0


def settings(algo: str, task: str) -> dict:
    """The loaded config (defaults.yaml merged with the task's file) without its task."""
    data = load_config(f"{algo}/{task}").model_dump(mode="json")
    assert data.pop("task") == task
    return data


@pytest.mark.parametrize("algo", ONPOLICY_ALGOS)
def test_same_settings_on_every_task(algo):
    """The benchmark runs one set of hyper-parameters on every task: the configs differ only in the task."""
    ref = settings(algo, SAFETY_GYM_TASKS[0])
    for task in SAFETY_GYM_TASKS[1:]:
        assert settings(algo, task) == ref, task


def own_settings_tasks(algo: str) -> list[str]:
    """The tasks whose configs keep the settings of their recorded runs, not OmniSafe's."""
    brax = ["BraxAntVel-v0", "BraxCartPole-v1", "BraxHalfCheetahVel-v0", "BraxReacher-v0"]
    return ["FunctionEnv-v0"] + (brax if algo == "cpo" else [])


@pytest.mark.parametrize("algo", ["ppo_lag", "trpo_lag", "trpo", "cpo", "pcpo"])
def test_the_omnisafe_configs_initialise_as_omnisafe(algo):
    """The configs that follow OmniSafe key by key take its weight_initialization_mode (PyTorch's
    kaiming_uniform), its learnt log σ from 0 and its critic L2 norm and gradient clip; the other
    tasks keep the learner's defaults (orthogonal, log σ −0.5, no critic norm or clip)."""
    for task in SAFETY_GYM_TASKS:
        p = load_config(f"{algo}/{task}").learner_params()
        assert (p.init, p.init_log_std) == ("kaiming_uniform", 0.0), task
        assert (p.critic_norm_coef, p.max_grad_norm) == (0.001, 40.0), task
        assert algo == "ppo_lag" or p.clip_critic_grad, task
    for task in own_settings_tasks(algo):
        p = load_config(f"{algo}/{task}").learner_params()
        assert p.init == "orthogonal" and p.critic_norm_coef == 0.0, task
        assert algo == "ppo_lag" or (p.init_log_std == -0.5 and not p.clip_critic_grad), task


OMNISAFE_NORMALISER = ("ppo_lag", "trpo_lag", "cpo", "pcpo", "trpo")


@pytest.mark.parametrize("algo", OMNISAFE_NORMALISER)
def test_the_omnisafe_configs_normalise_observations_as_omnisafe(algo):
    """The configs that take OmniSafe's settings merge each step's observations into the statistics
    before acting (its ObsNormalize, clip 5); FunctionEnv keeps the statistics of the last update."""
    for task in SAFETY_GYM_TASKS:
        p = load_config(f"{algo}/{task}").learner_params()
        assert (p.normalise_obs, p.obs_clip, p.obs_norm_per_step) == (True, 5.0, True), task
    assert not load_config(f"{algo}/FunctionEnv-v0").learner_params().obs_norm_per_step


@pytest.mark.parametrize("algo", ["trpo_lag", "trpo", "cpo", "pcpo"])
def test_the_omnisafe_trust_regions_measure_kl_as_omnisafe(algo):
    """OmniSafe's second-order methods average the KL over action dimensions and reject a step
    whose KL exceeds δ; their configs do the same on every Safety-Gymnasium task."""
    for task in SAFETY_GYM_TASKS:
        p = load_config(f"{algo}/{task}").learner_params()
        assert (p.kl_action_dims, p.kl_tolerance, p.target_kl) == ("mean", 0.0, 0.01), task


@pytest.mark.parametrize("algo", ["cpo", "pcpo"])
def test_the_omnisafe_constraint_value_and_search_on_safety_gym_tasks(algo):
    """OmniSafe's CPO and PCPO take c = J_C − d over its 50-episode window and search 20 (CPO) or 200
    (PCPO, with no reward-improvement test) fractions; the Brax (Table 1) and FunctionEnv configs
    keep c on the surrogate's per-step scale from the batch's own episodes."""
    for task in SAFETY_GYM_TASKS:
        p = load_config(f"{algo}/{task}").learner_params()
        assert (p.constraint_scale, p.cost_window) == ("episode", 50), task
        assert p.max_backtracks == (20 if algo == "cpo" else 200), task
        assert algo == "cpo" or (p.line_search and not p.improvement_required), task
    for task in own_settings_tasks(algo):
        p = load_config(f"{algo}/{task}").learner_params()
        assert (p.constraint_scale, p.cost_window) == ("per_step", 0), task
