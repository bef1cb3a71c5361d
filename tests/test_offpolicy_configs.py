"""Every off-policy algorithm of the benchmark ships a config for each of CVPO's Safety-Gymnasium
tasks, at the off-policy benchmark's scale, with the same hyper-parameters on every task: CVPO's
are Table 1's, the baselines' their learners' defaults."""
from __future__ import annotations

import pytest
import yaml

from saferl import registry
from saferl.cluster.studies.benchmark_offpolicy import OFFPOLICY_ALGOS, OFFPOLICY_TASKS
from saferl.config import CONFIG_DIR, load_config

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
    else:  # the learner's defaults, written out
        assert params == cls()


@pytest.mark.parametrize("algo", OFFPOLICY_ALGOS)
def test_same_settings_on_every_task(algo):
    """The configs differ only in the task (and the header comment naming it)."""
    ref = yaml.safe_load((CONFIG_DIR / algo / f"{OFFPOLICY_TASKS[0]}.yaml").read_text())
    for task in OFFPOLICY_TASKS[1:]:
        data = yaml.safe_load((CONFIG_DIR / algo / f"{task}.yaml").read_text())
        assert data.pop("task") == task
        assert data == {k: v for k, v in ref.items() if k != "task"}, task
