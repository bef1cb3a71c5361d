"""Your own environment as a task (envs/custom.py): a package written outside the repository,
refused in one line when wrong, trained end to end on a local Ray cluster when right."""
from __future__ import annotations

import numpy as np
import pytest

from saferl import registry
from saferl.config import ConfigError, load_config
from tests.conftest import temporary_package

PKG = "saferl_test_costpkg"

ENVS = '''
import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box, Discrete


class MyCostEnv(gym.Env):
    """A point on a line: reward for moving right, cost 1 per step right of `wall`."""
    observation_space = Box(-10.0, 10.0, (2,), np.float32)
    action_space = Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, wall=0.5):
        self.wall = wall

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.1, 0.1))
        return np.array([self.x, self.wall], np.float32), {}

    def step(self, action):
        self.x += 0.1 * float(action[0])
        obs = np.array([self.x, self.wall], np.float32)
        return obs, self.x, False, False, {"cost": float(self.x > self.wall), "x": self.x}


class SafetyStyleEnv(MyCostEnv):
    """Safety-Gymnasium's step: the cost is the third element."""
    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        return obs, r, info.pop("cost"), term, trunc, info


def make_env(wall=0.5):  # a factory works as well as a class
    return MyCostEnv(wall)


class NoCostEnv(MyCostEnv):
    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        info.pop("cost")
        return obs, r, term, trunc, info


class OldStepEnv(MyCostEnv):
    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        return obs, r, term or trunc, info


class DiscreteEnv(MyCostEnv):
    action_space = Discrete(3)


gym.register("SaferlTestCost-v0", entry_point=MyCostEnv)
'''


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """The package in a temporary folder outside the repository, importable in this process only."""
    with temporary_package(tmp_path, monkeypatch, PKG, ENVS) as path:
        yield path


def cfg_dict(task: str, run_root: str = "runs", **env) -> dict:
    return {"algo": "ppo_lag", "task": task, "total_env_steps": 480, "steps_per_iteration": 240,
            "run_root": run_root, "resources": {"num_env_hosts": 2, "envs_per_host": 4},
            "logging": {"tensorboard": False, "ray_metrics": False},
            "env": {"cost_limit": 2.0, "max_episode_steps": 30, **env},
            "algo_params": {"hidden": [8], "epochs": 1, "minibatch_size": 60}}


def error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("task, env, expected", [
    ("saferl_nope_pkg.envs:Env", {},
     "config error: task: saferl_nope_pkg.envs:Env: module 'saferl_nope_pkg' not found"),
    (f"{PKG}.envs:Nope", {}, f"config error: task: {PKG}.envs:Nope: module '{PKG}.envs' has no 'Nope'"),
    (f"{PKG}.envs:OldStepEnv", {}, "step returned a 4-tuple; expected (obs, reward, terminated, truncated, info)"),
    (f"{PKG}.envs:NoCostEnv", {}, "config error: env.cost_key: " + f"{PKG}.envs:NoCostEnv: step's info has no 'cost'"),
    (f"{PKG}.envs:MyCostEnv", {"cost_key": "penalty"},
     "env.cost_key: " + f"{PKG}.envs:MyCostEnv: step's info has no 'penalty' (its keys: ['cost', 'x'])"),
    (f"{PKG}.envs:DiscreteEnv", {},
     "config error: task: " + f"{PKG}.envs:DiscreteEnv: action_space is Discrete(3); saferl's policies need Box"),
    (f"{PKG}.envs:MyCostEnv", {"kwargs": {"wal": 1}}, "constructing it with env.kwargs {'wal': 1} failed: TypeError"),
])
def test_wrong_entries_are_refused_in_one_line(pkg, task, env, expected):
    assert expected in error(cfg_dict(task, **env))


def test_custom_task_needs_its_env_section_and_registered_ones_refuse_it(pkg):
    assert "task: unknown task 'Nope-v0'" in error({"algo": "ppo_lag", "task": "Nope-v0"})
    assert "env.max_episode_steps: Field required" in error({**cfg_dict(f"{PKG}.envs:MyCostEnv"),
                                                             "env": {"cost_limit": 1.0}})
    assert "env: FunctionEnv-v0 is a registered task" in error({**cfg_dict("FunctionEnv-v0")})
    assert "custom environments run on env hosts" in error({**cfg_dict(f"{PKG}.envs:MyCostEnv"), "algo": "bptt_lag"})


@pytest.mark.parametrize("entry", ["MyCostEnv", "SafetyStyleEnv", "make_env", "SaferlTestCost-v0"])
def test_each_step_style_gives_costs_and_truncation(pkg, entry):
    """Gymnasium-style (cost in info), Safety-Gymnasium-style (cost third), a factory and a
    Gymnasium id ("module:Id") all give the same costs, rewards and truncation at T."""
    from saferl.actors.env_host import make_vec_env

    cfg = load_config(cfg_dict(f"{PKG}.envs:{entry}", kwargs={"wall": 0.2}))
    assert cfg.limit == 2.0 and cfg.task_spec.kind == "custom"
    vec = make_vec_env(cfg.task, 3)
    assert (vec.obs_dim, vec.act_dim, vec.max_episode_steps) == (2, 1, 30)
    vec.reset(7)
    total_cost, episodes = np.zeros(3), []
    for t in range(30):
        _obs, _rew, cost, term, trunc, info = vec.step(np.ones((3, 1), np.float32) * 5.0)  # clipped to 1
        total_cost += cost
        episodes += info["episodes"]
        assert trunc.all() == (t == 29) and not term.any()
    assert [e["length"] for e in episodes] == [30, 30, 30]
    np.testing.assert_allclose(total_cost, [e["cost"] for e in episodes])
    for e in episodes:  # return sum_t x_t = 30 x_0 + 46.5 with x_t = x_0 + 0.1 t, |x_0| <= 0.1; cost #{t: x_t > 0.2}
        x0 = (e["return"] - 46.5) / 30
        assert abs(x0) <= 0.1 + 1e-5
        assert e["cost"] == sum(x0 + 0.1 * t > 0.2 for t in range(1, 31)), (e, x0)


def test_trains_end_to_end_on_ray_with_the_package_shipped(pkg, ray_session, run_root):
    """The env hosts (two actors) import the package through Ray's py_modules; the run trains,
    and its policy loads and evaluates here."""
    import saferl
    from saferl.cluster.placement import host_options

    cfg = load_config(cfg_dict(f"{PKG}.envs:MyCostEnv", run_root))
    assert registry.TASK_RUNTIME_ENVS[cfg.task]["py_modules"] == [str(pkg.resolve())]
    opts = host_options(cfg)["runtime_env"]  # the folder, uploaded to the cluster
    assert opts["py_modules"][0].startswith("gcs://") and "SAFERL_CUSTOM_TASKS" in opts["env_vars"]
    run = saferl.train(cfg, eval_episodes=4)
    m = run.metrics
    assert m["env_steps"].tolist() == [240, 480]
    assert (m["episode/length"] == 30).all() and m["cost_limit"].iloc[-1] == 2.0
    assert run.evaluation["episodes"] == 4 and run.evaluation["cost_limit"] == 2.0
    assert saferl.load(run).evaluate(4) == {**run.evaluation, "run_dir": run.evaluation["run_dir"]}
