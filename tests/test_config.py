"""Config validation: every bad input is one line naming the field; registries list names."""
from __future__ import annotations

import json

import pytest
import yaml

from saferl.cli import main
from saferl.config import CONFIG_DIR, DEFAULTS, ConfigError, load_config, parse_overrides


def err(source, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


BASE = {"algo": "ppo_lag", "task": "FunctionEnv-v0", "resources": {"num_env_hosts": 1, "envs_per_host": 8}}


def test_every_shipped_config_validates():
    files = sorted(f for f in CONFIG_DIR.glob("*/*.yaml") if f.name != DEFAULTS)
    assert len(files) >= 8
    for f in files:
        cfg = load_config(f)
        assert f.parent.name == cfg.algo and f.stem == cfg.task


# -- configs/<algo>/defaults.yaml ---------------------------------------------------------------

def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


def test_every_algorithm_folder_has_defaults_and_its_task_files_state_only_differences():
    folders = sorted(d for d in CONFIG_DIR.iterdir() if d.is_dir())
    assert folders
    for folder in folders:
        defaults = yaml.safe_load((folder / DEFAULTS).read_text())
        assert defaults["algo"] == folder.name and "task" not in defaults, folder.name
        shared = _leaves(defaults)
        for f in folder.glob("*.yaml"):
            if f.name != DEFAULTS:
                repeated = sorted(k for k, v in _leaves(yaml.safe_load(f.read_text())).items() if shared.get(k) == v)
                assert not repeated, f"{folder.name}/{f.name} repeats defaults.yaml's {repeated}"


def test_a_task_file_overrides_its_defaults_key_by_key(tmp_path):
    folder = tmp_path / "ppo_lag"
    folder.mkdir()
    (folder / DEFAULTS).write_text("algo: ppo_lag\nseed: 3\nresources: {num_env_hosts: 1, envs_per_host: 8}\n"
                                   "algo_params: {hidden: [16, 16], epochs: 4, lagrange: {kind: lagrange, lr: 0.1}}\n")
    (folder / "mine.yaml").write_text("task: FunctionEnv-v0\nseed: 5\nalgo_params: {epochs: 2, lagrange: {lr: 0.2}}\n")
    cfg = load_config(folder / "mine.yaml")
    assert (cfg.algo, cfg.task, cfg.seed, cfg.resources.envs_per_host) == ("ppo_lag", "FunctionEnv-v0", 5, 8)
    assert cfg.algo_params == {"hidden": [16, 16], "epochs": 2, "lagrange": {"kind": "lagrange", "lr": 0.2}}
    assert load_config(folder / "mine.yaml", ["algo_params.epochs=7"]).learner_params().epochs == 7  # --set wins
    # the shipped ones: FunctionEnv's own network over PPO-Lag's default one, the dual phase inherited
    defaults = yaml.safe_load((CONFIG_DIR / "ppo_lag" / DEFAULTS).read_text())
    own = yaml.safe_load((CONFIG_DIR / "ppo_lag" / "FunctionEnv-v0.yaml").read_text())
    assert own["algo_params"]["hidden"] != defaults["algo_params"]["hidden"] and "schedule" not in own
    shipped = load_config("ppo_lag/FunctionEnv-v0")
    assert shipped.algo_params["hidden"] == own["algo_params"]["hidden"]
    assert shipped.schedule.phases == defaults["schedule"]["phases"]


def test_a_task_without_its_own_file_uses_its_base_over_the_defaults():
    doggo = load_config("ppo_lag/SafetyDoggoGoal2-v0").model_dump()
    point = load_config("ppo_lag/SafetyPointGoal1-v0").model_dump()
    assert doggo.pop("task") == "SafetyDoggoGoal2-v0" and point.pop("task") == "SafetyPointGoal1-v0"
    assert doggo == point and doggo["schedule"]["phases"] == {"dual": 1}  # the last from defaults.yaml


def test_defaults_are_not_a_task(capsys):
    for name in ("ppo_lag/defaults", str(CONFIG_DIR / "ppo_lag" / DEFAULTS)):
        assert "not a task" in err(name)
    assert main(["train", "ppo_lag/defaults"]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("config error: ppo_lag/defaults") and "\n" not in out
    assert "task: Field required" in err(yaml.safe_load((CONFIG_DIR / "ppo_lag" / DEFAULTS).read_text()))


def test_top_level_configs_have_no_defaults():
    """configs/quickstart.yaml is whole: nothing of configs/ppo_lag/defaults.yaml reaches it."""
    own = yaml.safe_load((CONFIG_DIR / "quickstart.yaml").read_text())
    cfg = load_config("quickstart")
    assert (cfg.algo, cfg.algo_params, cfg.total_env_steps) == ("ppo_lag", own["algo_params"], own["total_env_steps"])


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


def test_dual_before_update_needs_a_sampling_algorithm_with_a_dual_phase():
    assert load_config("ppo_lag/FunctionEnv-v0").schedule.dual_before_update  # OmniSafe's order, shipped
    for name in ("ppo/FunctionEnv-v0", "sac_lag/SafeGBPOPendulum-v0"):
        with pytest.raises(ConfigError, match=r"schedule.dual_before_update: only for sampling algorithms"):
            load_config(name, ["schedule.dual_before_update=true"])


def test_per_gradient_step_only_for_off_policy_learners():
    """λ's step per gradient step counts the off-policy learners' steps; elsewhere there are none
    to count, so λ would never move: refused when the config loads, naming the field."""
    on = ["algo_params.lagrange.per_gradient_step=true"]
    assert load_config("sac_lag/SafeGBPOPendulum-v0", on).learner_params().lagrange.per_gradient_step
    for name in ("ppo_lag/FunctionEnv-v0", "shac_lag/FunctionEnv-v0"):
        with pytest.raises(ConfigError, match=r"^config error: algo_params.lagrange.per_gradient_step: \w+ is "):
            load_config(name, on)


def test_pipeline_is_for_off_policy_algorithms():
    assert load_config("sac_lag/PointHazard-D1-v0", ["schedule.pipeline=true"]).schedule.pipeline
    for name in ("ppo_lag/FunctionEnv-v0", "cgpo/FunctionEnv-v0"):
        with pytest.raises(ConfigError, match=r"schedule.pipeline: only for off-policy algorithms"):
            load_config(name, ["schedule.pipeline=true"])


def test_per_step_normaliser_needs_hosts_that_act():
    per_step = "algo_params.obs_norm_per_step=true"
    assert load_config("ppo_lag/FunctionEnv-v0", [per_step]).learner_params().obs_norm_per_step
    with pytest.raises(ConfigError, match=r"algo_params.obs_norm_per_step: .*not with resources.inference: server"):
        load_config("ppo_lag/FunctionEnv-v0", [per_step, "resources.inference=server"])
