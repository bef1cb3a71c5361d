"""saferl.envs.safety_gym and saferl.envs.np_compat, checked inside the Safety-Gymnasium interpreter.

pytest runs in the main interpreter (numpy 2), where safety_gymnasium cannot be imported, so the
checks run in a subprocess of ``.venv-sg/bin/python`` (override: ``SAFERL_SG_PYTHON``) and report
back as JSON. All tasks share one subprocess to pay the import once (~10 s in all).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SG_PYTHON = Path(os.environ.get("SAFERL_SG_PYTHON", REPO / ".venv-sg" / "bin" / "python"))

TASKS = [
    "SafetyPointGoal1-v0", "SafetyCarGoal1-v0", "SafetyPointButton1-v0",
    "SafetyCarCircle1-v0", "SafetyAntVelocity-v1", "SafetyHopperVelocity-v1",
]

pytestmark = pytest.mark.skipif(
    not SG_PYTHON.exists(), reason=f"no Safety-Gymnasium interpreter at {SG_PYTHON} "
    "(build it with deploy/setup.sh)")


def run_sg(code: str, *args: str, timeout: float = 120) -> dict:
    """Run ``code`` in the SG interpreter; it must print one JSON object on its last line."""
    proc = subprocess.run([str(SG_PYTHON), "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"SG interpreter failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


ADAPTER_CHECK = r"""
import json, sys
import numpy as np
from saferl.envs.safety_gym import make_env

out = {}
for task in sys.argv[1:]:
    env = make_env(task, seed=0)
    r = {"obs_dim": env.obs_dim, "act_dim": env.act_dim,
         "act_low": [env.act_low.dtype.name, list(env.act_low.shape), env.act_low.tolist()],
         "act_high": [env.act_high.dtype.name, list(env.act_high.shape), env.act_high.tolist()],
         "max_episode_steps": env.max_episode_steps}
    obs0 = env.reset(seed=0)
    r["reset"] = [type(obs0).__name__, obs0.dtype.name, list(obs0.shape)]
    # out-of-box actions: the adapter clips them
    actions = np.random.default_rng(0).uniform(-2, 2, (5, env.act_dim))
    steps, traj = [], [obs0]
    for a in actions:
        obs, rew, cost, term, trunc, info = env.step(a)
        traj.append(obs)
        steps.append([type(obs).__name__, obs.dtype.name, list(obs.shape), type(rew).__name__,
                      type(cost).__name__, cost, type(term).__name__, type(trunc).__name__,
                      type(info).__name__, bool(np.all(np.isfinite(obs)))])
    r["steps"] = steps
    r["reseed_same"] = bool(np.array_equal(env.reset(seed=0), obs0))
    env.close()
    if task == sys.argv[1]:  # a fresh instance with the same seed (first resets are slow)
        other = make_env(task, seed=0)
        r["fresh_same"] = bool(np.array_equal(other.reset(seed=0), obs0))
        r["fresh_default_seed_same"] = bool(np.array_equal(make_env(task, seed=0).reset(None), obs0))
        other.close()
        # the plain-skybox fast reset must not change what the agent sees
        orig = make_env(task, seed=0, fast_reset=False)
        same = [np.array_equal(orig.reset(seed=0), traj[0])]
        same += [np.array_equal(orig.step(a)[0], o) for a, o in zip(actions, traj[1:])]
        r["fast_reset_same_traj"] = bool(all(same)) and env.fast_reset and not orig.fast_reset
        orig.close()
    out[task] = r
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def adapter_results() -> dict:
    return run_sg(ADAPTER_CHECK, *TASKS, timeout=180)


@pytest.mark.parametrize("task", TASKS)
def test_adapter_protocol(adapter_results: dict, task: str) -> None:
    r = adapter_results[task]
    assert r["obs_dim"] > 0 and r["act_dim"] > 0 and r["max_episode_steps"] > 0
    for name in ("act_low", "act_high"):
        assert r[name][:2] == ["float32", [r["act_dim"]]], name
    assert all(lo < hi for lo, hi in zip(r["act_low"][2], r["act_high"][2]))
    assert r["reset"] == ["ndarray", "float32", [r["obs_dim"]]]
    for (otype, odtype, oshape, rtype, ctype, cost, ttype, trtype, itype, finite) in r["steps"]:
        assert (otype, odtype, oshape) == ("ndarray", "float32", [r["obs_dim"]])
        assert (rtype, ctype, ttype, trtype, itype) == ("float", "float", "bool", "bool", "dict")
        assert cost >= 0.0 and finite
    assert r["reseed_same"], "reset(seed=0) twice gave different first observations"


def test_same_seed_same_first_obs(adapter_results: dict) -> None:
    r = adapter_results[TASKS[0]]
    assert r["fresh_same"], "two envs reset with seed 0 gave different first observations"
    assert r["fresh_default_seed_same"], "first reset(None) did not use make_env's seed"


def test_fast_reset_keeps_observations(adapter_results: dict) -> None:
    assert adapter_results[TASKS[0]]["fast_reset_same_traj"]


NP2_LOAD = r"""
import json, pickle, sys
import numpy as np
with open(sys.argv[1], "rb") as f:
    blobs = pickle.load(f)
try:
    pickle.loads(blobs["in_band"])
    before = "loaded"
except ModuleNotFoundError as e:
    before = str(e)
from saferl.envs.np_compat import alias_numpy2_modules
alias_numpy2_modules()
objs = [pickle.loads(blobs["in_band"]),
        pickle.loads(blobs["out_of_band"], buffers=blobs["buffers"])]
print(json.dumps({"numpy": np.__version__, "before": before,
                  "loaded": [[[a.dtype.str, list(a.shape), a.tolist()] for a in o] for o in objs]}))
"""


def test_numpy2_pickles_load_in_sg_interpreter(tmp_path: Path) -> None:
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("the main interpreter is expected to run numpy 2")
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.5, -2.0]),
              np.array([3, 4], dtype=np.int64), np.zeros((0, 4), dtype=np.float32),
              np.arange(6, dtype=np.float64).reshape(2, 3).T]  # non-contiguous
    buffers: list[bytes] = []
    blobs = {
        "in_band": pickle.dumps(arrays, protocol=5),
        # what Ray does: protocol 5 with out-of-band buffers (numpy._core.numeric._frombuffer)
        "out_of_band": pickle.dumps(arrays, protocol=5,
                                    buffer_callback=lambda b: buffers.append(b.raw().tobytes())),
    }
    blobs["buffers"] = buffers
    path = tmp_path / "np2.pkl"
    path.write_bytes(pickle.dumps(blobs, protocol=4))
    r = run_sg(NP2_LOAD, str(path))
    assert r["numpy"].startswith("1."), r["numpy"]
    assert "numpy._core" in r["before"], f"expected the numpy-2 pickle to fail unaliased: {r}"
    want = [[a.dtype.str, list(a.shape), a.tolist()] for a in arrays]
    assert r["loaded"] == [want, want]


GEOMETRY_CHECK = r"""
import json, numpy as np
from saferl.actors.env_host import make_vec_env
from saferl.envs.safety_gym import make_env
out = {}
for task, base in [("SafetyPointGoal1-SIS-v0", "SafetyPointGoal1-v0"),
                   ("SafetyPointPush1-SIS-v0", "SafetyPointPush1-v0"),
                   ("SafetyPointPillarsGoal1-SIS-v0", "SafetyPointPillarsGoal1-v0")]:
    env, plain = make_env(base, seed=3, geometry=True), make_env(base, seed=3)
    o, p = env.reset(3), plain.reset(3)
    rows = []
    for t in range(30):
        a = np.array([1.0, 0.5 if t < 15 else -0.5])
        o, *_, info = env.step(a)
        p, *_ = plain.step(a)
        g = info["geometry"]
        tail = np.concatenate([g["robot_pos"], g["robot_vel"],
                               np.column_stack([g["obstacle_pos"], g["obstacle_size"]]).reshape(-1)])
        rows.append([float(np.abs(o[:plain.obs_dim] - p).max()), float(np.abs(o[plain.obs_dim:] - tail).max())])
    task_obj = env._env.unwrapped.task
    vec = make_vec_env(task, 2)
    out[task] = {"n": env.n_hazards, "obs_dim": env.obs_dim, "plain_dim": plain.obs_dim,
                 "err": np.max(rows, 0).tolist(),
                 "hazards": sum(int(g.num) for g in (getattr(task_obj, n, None) for n in ("hazards", "pillars"))
                                if g is not None and g.is_constrained),
                 "pillars": int(getattr(getattr(task_obj, "pillars", None), "num", 0)),
                 "vec_n": vec.n_hazards, "vec_dim": vec.obs_dim,
                 "moved": float(np.linalg.norm(g["robot_vel"]))}
print(json.dumps(out))
"""


def test_geometry_tail_is_the_info_arrays_after_the_plain_observation() -> None:
    res = run_sg(GEOMETRY_CHECK, timeout=240)
    for task, r in res.items():
        assert r["n"] == r["hazards"] == r["vec_n"] > 0, task  # constrained obstacles only (hazards here)
        assert r["obs_dim"] == r["vec_dim"] == r["plain_dim"] + 4 + 3 * r["n"], task
        # plain part untouched; tail = info (float32)
        assert r["err"][0] == 0.0 and r["err"][1] < 1e-5, (task, r["err"])
        assert r["moved"] > 0, task
    assert res["SafetyPointPillarsGoal1-SIS-v0"]["n"] == res["SafetyPointPillarsGoal1-SIS-v0"]["pillars"] == 4
