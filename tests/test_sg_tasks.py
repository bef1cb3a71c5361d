"""Every Safety-Gymnasium task id is registered or refused: the static registry against the ids
Safety-Gymnasium 1.0.0 registers (enumerated in its own interpreter), config resolution of the new
tasks to each algorithm's representative config, the one-line refusal of Vision tasks, and short
real runs of newly registered tasks."""
from __future__ import annotations

import json
import os
import subprocess

import pandas as pd
import pytest

from saferl import registry
from saferl.cli import main
from saferl.config import CONFIG_DIR, ConfigError, load_config, resolve_path
from tests.conftest import ROOT, SG_PYTHON, needs_sg

# In the SG interpreter: Safety-Gymnasium's ids (less saferl's own pillar tasks) with what marks a
# refused one in its registration (observe_vision, debug), and a velocity task of a new agent
# through the env host's own construction path (registry -> make_vec_env -> envs/safety_gym.py).
ENUMERATE = r"""
import json
import numpy as np
from saferl.envs.safety_gym import PILLAR_TASKS, import_safety_gymnasium
import_safety_gymnasium()
import gymnasium
from safety_gymnasium.utils.registration import safe_registry
from saferl.actors.env_host import EnvHost

ids = {}
for i in sorted(set(safe_registry) - set(PILLAR_TASKS)):
    spec = gymnasium.registry[i]
    config = spec.kwargs.get("config", {})
    ids[i] = {"T": spec.max_episode_steps, "vision": bool(config.get("observe_vision")),
              "debug": bool(config.get("debug"))}
host = EnvHost("SafetyWalker2dVelocity-v1", 2, seed=3)
spec = {k: host.spec()[k] for k in ("obs_dim", "act_dim", "max_episode_steps")}
first = host.reset(3)
obs, rew, cost, term, trunc, info = host.step(np.zeros((2, spec["act_dim"]), np.float32))
print(json.dumps({"ids": ids, "spec": spec, "obs": [list(first.shape), list(obs.shape)],
                  "finite": bool(np.isfinite(obs).all()), "cost": cost.tolist()}))
"""


@pytest.fixture(scope="module")
def sg_registry():
    python = os.environ.get("SAFERL_SG_PYTHON") or str(SG_PYTHON)
    proc = subprocess.run([python, "-c", ENUMERATE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"SG interpreter failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_sg()
def test_registry_is_safety_gymnasiums_ids_less_the_refused(sg_registry):
    ids = sg_registry["ids"]
    ours, refused = set(registry.SG_TASKS), set(registry.UNSUPPORTED_TASKS)
    assert not ours & refused
    assert ours | refused == set(ids), sorted((ours | refused) ^ set(ids))
    for task in ours:  # registered with Safety-Gymnasium's episode length, the benchmark limit
        spec = registry.get_task(task)
        assert (spec.kind, spec.entry, spec.max_episode_steps, spec.cost_limit) == \
            ("safety_gymnasium", task, ids[task]["T"], 25.0), task
        assert not ids[task]["vision"] and not ids[task]["debug"], task
    vision = {i for i, m in ids.items() if m["vision"]}
    debug = {i for i, m in ids.items() if m["debug"]}
    assert vision and debug and vision | debug <= refused
    race = refused - vision - debug  # the only other refusal: Race's textures are not in the package
    assert race and all("Race" in i for i in race)


@needs_sg()
def test_a_new_agents_velocity_task_steps_in_the_env_host(sg_registry):
    spec, (reset_shape, obs_shape) = sg_registry["spec"], sg_registry["obs"]
    assert (spec["obs_dim"], spec["act_dim"], spec["max_episode_steps"]) == (17, 6, 1000)  # Walker2d
    assert reset_shape == obs_shape == [2, 17] and sg_registry["finite"]
    assert len(sg_registry["cost"]) == 2 and min(sg_registry["cost"]) >= 0


@pytest.mark.parametrize("name,file", [
    ("ppo_lag/SafetyDoggoGoal2-v0", "ppo_lag/SafetyPointGoal1-v0"),
    ("trpo_lag/SafetyRacecarPush0-v0", "trpo_lag/SafetyPointGoal1-v0"),
    ("cpo/SafetyAntFadingHard1-v0", "cpo/SafetyPointGoal1-v0"),
    ("ppo_lag/SafetyAntCircle0-v0", "ppo_lag/SafetyCarCircle1-v0"),  # ppo_lag has no Point Circle config
    ("sac_lag/SafetyAntCircle0-v0", "sac_lag/defaults"),  # OmniSafe's sections are PointCircle1's, not AntCircle0's
    ("ppo_lag/SafetyPointCircle1-v0", "ppo_lag/SafetyCarCircle1-v0"),
    ("cpo/SafetyWalker2dVelocity-v1", "cpo/SafetyAntVelocity-v1"),
    ("trpo/SafetyHumanoidVelocity-v0", "trpo/SafetyAntVelocity-v1"),
    ("sac_lag/SafetyWalker2dVelocity-v1", "sac_lag/defaults"),  # fallback: defaults (OmniSafe's for this task)
    ("sac_lag/SafetyCarButton1-v0", "sac_lag/SafetyCarButton1-v0"),  # shipped files stay in use
])
def test_new_tasks_use_their_familys_config(name, file):
    path, implied = resolve_path(name)
    assert path == CONFIG_DIR / f"{file}.yaml"
    cfg = load_config(name)
    task = name.split("/")[1]
    assert (cfg.algo, cfg.task, cfg.limit) == (name.split("/")[0], task, 25.0)
    assert implied == ({} if name == file else {"task": task})


def test_no_safety_gym_config_stays_a_one_line_error():
    with pytest.raises(ConfigError) as err:
        load_config("cgpo/SafetyDoggoGoal2-v0")
    assert str(err.value) == "config error: config file 'cgpo/SafetyDoggoGoal2-v0' does not exist"


def test_vision_tasks_are_refused_in_one_line_before_any_actor(capsys):
    for source in ("ppo_lag/SafetyPointGoal1Vision-v0", {"algo": "ppo_lag", "task": "SafetyCarRun0Vision-v0"}):
        with pytest.raises(ConfigError) as err:
            load_config(source)
        task = source["task"] if isinstance(source, dict) else source.split("/")[1]
        msg = str(err.value)
        assert msg.startswith(f"config error: task: {task} has image observations"), msg
        assert "flat Box" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"^SafetyDoggoGoal1Vision-v0 has image .*; use SafetyDoggoGoal1-v0$"):
        registry.get_task("SafetyDoggoGoal1Vision-v0")
    assert main(["train", "sac_lag/SafetyAntButton2Vision-v0"]) == 2  # the CLI stops at config loading
    out = capsys.readouterr().err.strip()
    assert out.startswith("config error: task: SafetyAntButton2Vision-v0 has image") and "\n" not in out


def test_list_compacts_safety_gymnasium_and_names_the_refused(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Safety{Point,Car,Doggo,Racecar,Ant}Circle{0,1,2}-v0" in out
    assert "Velocity-{v0,v1}" in out and "Safety*Vision*-v0" in out
    assert "SafetyDoggoGoal2-v0" not in out  # one line per family, not 107


@needs_sg()
def test_ppo_lag_trains_a_newly_registered_task(ray_session, run_root):
    cfg = load_config("ppo_lag/SafetyCarPush0-v0", [
        "total_env_steps=1000", "steps_per_iteration=500", "resources.num_env_hosts=1",
        "resources.envs_per_host=2", "algo_params.epochs=1", "schedule.checkpoint_every=2",
        f"run_root={run_root}"])
    from saferl.cluster.session import train

    run = train(cfg)
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 2 and (run / "config.yaml").is_file()
    assert "task: SafetyCarPush0-v0" in (run / "config.yaml").read_text()
