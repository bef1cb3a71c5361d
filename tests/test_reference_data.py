"""``saferl benchmark reference --check-data``: saferl's side in the Safety-Gymnasium interpreter,
the comparison (one distribution passes, a shifted one is reported) and the CLI's plumbing with a
stand-in reference (OmniSafe itself is never a test dependency; the results page records the real
check)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from saferl.config import REPO_ROOT
from saferl.tools.studies import reference_data as rd
from tests.conftest import check_with_stand_in, needs_sg

TASK = "SafetyHopperVelocity-v1"  # Hopper: 11 observations, 3 actions
SAC_SHAPES = [(256, 11), (256,), (256, 256), (256,), (6, 256), (6,)]  # OmniSafe's gaussian_sac actor


def _weights(seed: int = 0) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [(g.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32) for s in SAC_SHAPES]


def _saferl_side(tmp_path, name: str, seed: int, steps: int) -> dict:
    from saferl.cluster.placement import sg_python
    from saferl.config import load_config
    from saferl.tools.studies.runner import shipped_config

    folder = tmp_path / name
    folder.mkdir()
    with open(folder / "policy.pkl", "wb") as fh:
        pickle.dump(rd.saferl_policy("sac_lag", [], TASK, _weights()), fh)
    cfg = load_config(shipped_config("sac_lag", TASK)[0])
    subprocess.run([sg_python(cfg), "-m", rd.HOST_MODULE, "--task", TASK, "--policy", str(folder / "policy.pkl"),
                    "--steps", str(steps), "--seed", str(seed), "--out", str(folder)], cwd=REPO_ROOT, check=True)
    return rd.load_side(folder)


@needs_sg()
def test_two_samples_of_the_same_data_path_pass_and_a_shifted_one_does_not(tmp_path):
    a = _saferl_side(tmp_path, "a", 0, 3000)
    b = _saferl_side(tmp_path, "b", 7, 3000)
    for side in (a, b):
        for d in side.values():
            assert len(d["obs"]) == 3000 and d["obs"].shape[1] == 11 and len(d["ep_return"]) > 50
            assert np.abs(d["act"]).max() <= 1.0
            assert rd.terminal_gap(d) > 0.1  # saferl stores the ended episode's last observation
    same = rd.compare(a, b)
    assert same["same_distribution"], same["worst_p"]
    shifted = {p: {**d, "ep_return": d["ep_return"] + 3.0} for p, d in b.items()}  # a reward off by ~0.1 a step
    assert not rd.compare(a, shifted)["same_distribution"]
    reset = {p: {**d, "obs": d["obs"] + 0.01} for p, d in b.items()}  # another reset distribution
    result = rd.compare(a, reset)
    assert not result["same_distribution"]
    assert result["phases"]["uniform"]["tests"]["observation at an episode's start"] < 1e-3


def test_an_actor_of_other_shapes_is_a_one_line_error():
    from saferl.config import ConfigError

    with pytest.raises(ConfigError, match="other shapes"):
        rd.saferl_policy("sac_lag", ["algo_params.hidden=[64,64]"], TASK, _weights())


def test_episode_bounds_split_at_a_cut_bootstrap_and_at_a_time_limit():
    obs = np.arange(8, dtype=np.float32)[:, None]
    nxt = obs + 1
    nxt[2] = 100.0  # a time limit: the stored next observation is not the next step's
    done = np.zeros(8, np.float32)
    done[5] = 1.0
    assert rd.episode_bounds({"obs": obs, "next_obs": nxt, "done": done}) == [(0, 3), (3, 6), (6, 8)]


STAND_IN = textwrap.dedent('''\
    """Stands in for the reference interpreter: a reference whose episodes all last 5 steps."""
    import json, sys
    import numpy as np
    argv = sys.argv[2:]
    out = argv[argv.index("--out") + 1]
    n = int(argv[argv.index("--steps") + 1])
    g = np.random.default_rng(0)
    np.savez(out + "/actor.npz", *[np.zeros(s, np.float32) for s in {shapes}])
    obs = g.standard_normal((n, 11)).astype(np.float32)
    done = (np.arange(n) % 5 == 4).astype(np.float32)
    for phase in ("uniform", "policy"):
        np.savez(out + f"/{{phase}}.npz", obs=obs, act=np.zeros((n, 3), np.float32), reward=np.ones(n, np.float32),
                 cost=np.zeros(n, np.float32), done=done, next_obs=np.roll(obs, -1, 0),
                 ep_return=np.full(n // 5, 5.0), ep_cost=np.zeros(n // 5), ep_length=np.full(n // 5, 5))
    open("argv.json", "w").write(json.dumps(argv))
''')


@needs_sg()
def test_check_data_cli_writes_the_tables_and_the_verdict(tmp_path):
    out, _ = check_with_stand_in(tmp_path, STAND_IN.format(shapes=SAC_SHAPES), TASK, "--check-data",
                                 "--data-steps", "1000")
    table = (out / "data_check.md").read_text()
    assert "## uniform" in table and "## policy" in table and "**the data differ**" in table
    assert "| episode length | 5.000 ± 0.000 |" in table and "configs/sac_lag/" in table
    saved = json.loads((out / "data_check.json").read_text())
    assert saved["same_distribution"] is False and saved["tests"] == 10
    assert len(np.load(out / "saferl" / "policy.npz")["reward"]) == 1000


def _saferl_run(tmp_path, algo: str = "sac_lag"):
    """A run directory of ``algo`` on Hopper with one checkpoint (no training): its learner."""
    from saferl.cluster import rundir
    from saferl.config import load_config
    from saferl.tools.studies.reference_update import box_learner
    from saferl.tools.studies.runner import shipped_config

    cfg = load_config(shipped_config(algo, TASK)[0], [f"run_root={tmp_path / 'runs'}"])
    learner = box_learner(algo, [], TASK, 11, 3)
    run = rundir.new_run_dir(cfg)
    rundir.save_checkpoint(run, 1, {"algo": algo, "task": TASK, "learner": learner.state_dict(),
                                    "schedule": {"iteration": 1, "env_steps": 2000}}, keep=1)
    return run, learner


def test_policy_from_takes_the_actor_of_a_runs_newest_checkpoint(tmp_path):
    run, learner = _saferl_run(tmp_path)
    weights, what = rd.checkpoint_actor(run, "sac_lag", TASK)
    assert [w.shape for w in weights] == SAC_SHAPES and "2,000 env steps" in what
    assert all(np.array_equal(w, p.detach().numpy()) for w, p in zip(weights, learner.policy.parameters()))


def test_policy_from_a_run_of_another_algorithm_or_no_run_is_a_one_line_error(tmp_path):
    from saferl.config import ConfigError

    run, _ = _saferl_run(tmp_path, "td3_lag")
    with pytest.raises(ConfigError, match="a td3_lag run on SafetyHopperVelocity-v1, not sac_lag"):
        rd.checkpoint_actor(run, "sac_lag", TASK)
    with pytest.raises(ConfigError, match="not a run directory"):
        rd.checkpoint_actor(tmp_path, "sac_lag", TASK)


@needs_sg()
def test_check_data_with_policy_from_sends_the_checkpoints_actor_to_the_reference(tmp_path):
    run, learner = _saferl_run(tmp_path)
    out, sent = check_with_stand_in(tmp_path, STAND_IN.format(shapes=SAC_SHAPES), TASK, "--check-data",
                                    "--data-steps", "500", "--policy-from", str(run))
    with np.load(sent[sent.index("--actor") + 1]) as z:
        assert np.array_equal(z["arr_0"], learner.policy.net[0].weight.detach().numpy())
    assert f"the actor of `{run.name}`'s checkpoint at 2,000 env steps" in (out / "data_check.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--algo", "ppo_lag"], "--check-data compares sac_lag"),
    (["--algo", "sac_lag", "--data-steps", "0"], "--data-steps must be > 0")])
def test_check_data_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    from saferl.cli import main

    rc = main(["benchmark", "reference", *argv, "--check-data", "--reference-python", sys.executable,
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
