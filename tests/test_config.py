"""Config validation: every bad input is one line naming the field; registries list names."""
from __future__ import annotations

import pytest

from saferl.cli import main
from saferl.config import CONFIG_DIR, ConfigError, load_config, parse_overrides


def err(source, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


BASE = {"algo": "ppo_lag", "task": "FunctionEnv-v0", "resources": {"num_env_hosts": 1, "envs_per_host": 8}}


def test_every_shipped_config_validates():
    files = sorted(CONFIG_DIR.glob("*/*.yaml"))
    assert len(files) >= 8
    for f in files:
        cfg = load_config(f)
        assert f.parent.name == cfg.algo and f.stem == cfg.task


def test_unknown_key_names_the_field():
    assert "resources.num_env_host" in err(BASE, "resources.num_env_host=2")
    assert "algo_params.clip_ratioo" in err(BASE, "algo_params.clip_ratioo=0.1")


def test_bad_values_name_the_field():
    assert "resources.num_env_hosts" in err(BASE, "resources.num_env_hosts=-1")
    assert "resources.num_gpus_per_learner" in err(BASE, "resources.num_gpus_per_learner=abc")
    assert "algo_params.clip" in err(BASE, "algo_params.clip=-0.2")
    assert "schedule.phases" in err(BASE, "schedule.phases.safety_index=3")
    assert "unknown algorithm 'nope'" in err({**BASE, "algo": "nope"})
    assert "unknown task 'Nope-v0'" in err({**BASE, "task": "Nope-v0"})
    assert "does not exist" in err("no/such/config.yaml")
    assert "steps_per_iteration" in err(BASE, "steps_per_iteration=1001")


def test_gradient_algorithm_refuses_non_differentiable_task():
    assert "not differentiable" in err({"algo": "bptt_lag", "task": "SafetyPointGoal1-v0"})


def test_fractional_gpus_and_overrides():
    cfg = load_config(BASE, ["resources.num_gpus_per_learner=0.25", "algo_params.hidden=[16, 16]", "seed=3"])
    assert cfg.resources.num_gpus_per_learner == 0.25 and cfg.seed == 3
    assert cfg.learner_params().hidden == [16, 16]
    assert cfg.limit == 8.0  # the task's registered limit
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_cli_reports_one_line_and_exit_2(capsys):
    assert main(["train", "ppo_lag/FunctionEnv-v0", "--set", "resources.envs_per_host=0"]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("config error: resources.envs_per_host") and "\n" not in out


def test_list_shows_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ppo_lag", "bptt_lag", "SafetyPointGoal1-v0", "FunctionEnv-v0"):
        assert name in out


def test_gradient_estimator_config_validation():
    assert load_config("cgpo/FunctionEnv-v0").learner_params().gradient_estimator == "fobg"
    zobg = load_config("cgpo/FunctionEnvFloor-v0")  # the shipped CGPO-ZoBG config: no analytic gradient needed
    assert zobg.learner_params().gradient_estimator == "zobg"
    msg = err("cgpo/FunctionEnv-v0", "algo_params.gradient_estimator=sobg")
    assert "algo_params.gradient_estimator" in msg and "'fobg' or 'zobg'" in msg
    msg = err("cgpo/FunctionEnv-v0", "algo_params.gradient_estimator=zobg", "algo_params.stochastic=false")
    assert "gradient_estimator: zobg needs stochastic: true" in msg
    assert "algo_params.gradient_estimator" in err("mb_cgpo/FunctionEnvFloor-v0",
                                                            "algo_params.gradient_estimator=zobg")
    assert "not differentiable" in err("cgpo/FunctionEnvFloor-v0", "algo_params.gradient_estimator=fobg")
    # the exception is CGPO's option on a torch task only: other gradient algorithms reject the key
    assert "algo_params.gradient_estimator" in err(
        {"algo": "bptt_lag", "task": "FunctionEnvFloor-v0", "algo_params": {"gradient_estimator": "zobg"}})
    assert "not differentiable" in err(
        {"algo": "cgpo", "task": "SwimmerVelocity-v0", "algo_params": {"gradient_estimator": "zobg"}})
