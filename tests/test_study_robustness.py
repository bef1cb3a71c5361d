"""`saferl study robustness`: the random-action attack in the env host, and a small real study on
two tiny PPO-Lag runs of FunctionEnv-v0 (one iteration each, 100-step episodes)."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from saferl.actors.env_host import EnvHost
from saferl.cli import main
from saferl.learners.networks import GaussianPolicy


def recording_host(seed: int = 0, envs: int = 8) -> tuple[EnvHost, list]:
    """A FunctionEnv host whose steps are recorded as (obs before, action stepped)."""
    host = EnvHost("FunctionEnv-v0", envs, seed=seed)
    seen: list = []
    step = host.vec.step

    def record(actions):
        seen.append((host.obs.copy(), np.array(actions, copy=True)))
        return step(actions)

    host.vec.step = record
    return host, seen


def policy() -> dict:
    return GaussianPolicy(1, 1, [8]).export_numpy()


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_attack_replaces_the_fraction_alpha_of_actions_by_uniform_ones(rate):
    pol = policy()
    host, seen = recording_host()
    eps = host.evaluate(pol, 8, deterministic=True, attack_rate=rate)
    assert len(eps) == 8 and all(e["length"] == 100 for e in eps)
    obs = np.concatenate([o for o, _ in seen])
    stepped = np.concatenate([a for _, a in seen])
    own = host._act(pol, obs, deterministic=True)[0]
    replaced = ~np.isclose(stepped, own).all(-1)
    assert abs(replaced.mean() - rate) < 0.05, replaced.mean()
    if rate > 0:
        attacked = stepped[replaced]
        assert ((attacked >= host.low) & (attacked <= host.high)).all()
        assert attacked.min() < -0.8 and attacked.max() > 0.8 and abs(attacked.mean()) < 0.1  # ~U(-1, 1)
    else:
        np.testing.assert_array_equal(stepped, own)


def test_attack_is_reproducible_and_at_rate_one_ignores_the_policy():
    a, b = GaussianPolicy(1, 1, [8]).export_numpy(), GaussianPolicy(1, 1, [8]).export_numpy()
    same = [EnvHost("FunctionEnv-v0", 4, seed=3).evaluate(a, 4, True, 0.5) for _ in range(2)]
    assert same[0] == same[1]
    full = [EnvHost("FunctionEnv-v0", 4, seed=3).evaluate(p, 4, True, 1.0) for p in (a, b)]
    assert full[0] == full[1]
    plain = [EnvHost("FunctionEnv-v0", 4, seed=3).evaluate(p, 4, True) for p in (a, b)]
    assert plain[0] != plain[1]
    with pytest.raises(ValueError, match="attack_rate"):
        EnvHost("FunctionEnv-v0", 1, seed=0).evaluate(a, 1, True, 1.5)


@pytest.fixture(scope="module")
def two_runs(ray_session, tmp_path_factory):
    """Two PPO-Lag runs with the same seed (so the same evaluation seed) and different policies:
    one and two iterations."""
    from saferl.cluster.session import train
    from saferl.config import load_config

    root = tmp_path_factory.mktemp("robust")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        return [train(load_config("ppo_lag/FunctionEnv-v0", [f"total_env_steps={steps}", f"run_root={root}",
                                                              f"name=ppo{steps}"])) for steps in (2000, 4000)]


def test_robustness_study_end_to_end(two_runs, tmp_path):
    from saferl.tools.evaluate import evaluate

    out = tmp_path / "study"
    rc = main(["study", "robustness", *map(str, two_runs), "--alphas", "0,0.5,1", "--episodes", "4",
               "--out", str(out)])
    assert rc == 0
    for name in ("robustness.csv", "robustness.md", "robustness.png", "study.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "robustness.csv")))
    assert len(rows) == 6
    by = {(r["run"], float(r["alpha"])): r for r in rows}
    a, b = "ppo_lag/ppo2000", "ppo_lag/ppo4000"
    assert {k[0] for k in by} == {a, b} and {k[1] for k in by} == {0.0, 0.5, 1.0}
    assert all(r["task"] == "FunctionEnv-v0" and r["episodes"] == "4" for r in rows)
    num = ("return_mean", "return_std", "cost_mean", "cost_std", "violation_rate")
    # α = 1: every action is random, so the two policies score the same
    assert [by[a, 1.0][k] for k in num] == [by[b, 1.0][k] for k in num]
    assert by[a, 0.0]["return_mean"] != by[b, 0.0]["return_mean"], "the policies differ"
    # α = 0 is plain evaluation
    plain = evaluate(two_runs[0], 4)
    assert float(by[a, 0.0]["return_mean"]) == pytest.approx(plain["return_mean"], rel=1e-9)
    assert float(by[a, 0.0]["cost_std"]) == pytest.approx(plain["cost_std"], rel=1e-9)
    # and an α evaluated alone equals the same α within the sweep (hosts re-seeded per α)
    alone = evaluate(two_runs[1], 4, attack_rate=0.5)
    assert float(by[b, 0.5]["return_mean"]) == pytest.approx(alone["return_mean"], rel=1e-9)
    text = (out / "robustness.md").read_text()
    assert f"| α | {a} | {b} |" in text and text.count("\n| 0.5 | ") == 1


def test_bad_input_is_one_clear_line(tmp_path, two_runs, capsys):
    assert main(["study", "robustness", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(two_runs[0] / "config.yaml", bare / "config.yaml")
    assert main(["study", "robustness", str(bare), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bare) in err and "checkpoint" in err
    assert main(["study", "robustness", str(two_runs[0]), "--alphas", "0,1.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--alphas" in err and "1.5" in err
    assert not (tmp_path / "o").exists()


def test_runs_of_one_algorithm_and_task_are_pooled_in_the_plot():
    from saferl.tools.studies.robustness import _groups

    runs = [{"run": n, "algo": algo, "task": "T", "cost_limit": 8.0}
            for n, algo in (("ppo_lag/a", "ppo_lag"), ("ppo_lag/b", "ppo_lag"), ("cpo/c", "cpo"))]
    pooled = {("ppo_lag/a", 0.0): (np.array([1.0, 3.0]), np.array([0.0, 0.0])),
              ("ppo_lag/b", 0.0): (np.array([5.0, 7.0]), np.array([2.0, 2.0])),
              ("cpo/c", 0.0): (np.array([2.0]), np.array([1.0]))}
    (label, limit, curve), (label_c, _, curve_c) = _groups(runs, pooled)
    assert label == "ppo_lag on T (2 runs)" and limit == 8.0 and label_c == "cpo/c"
    assert curve[0.0] == pytest.approx((4.0, np.std([1, 3, 5, 7]), 1.0, 1.0))
    assert curve_c[0.0] == pytest.approx((2.0, 0.0, 1.0, 0.0))
