"""``saferl sweep`` (cluster/sweep.py): the search space, the trials' resources, the summary,
and a tiny grid × seeds on Ray Tune, resumed."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from saferl.cli import main
from saferl.cluster import sweep
from saferl.config import ConfigError, load_config


def test_grid_and_random_space():
    grid = sweep.parse_grid(["algo_params.lr=1e-4,3e-4", "cost_limit=5,10"])
    assert grid == {"algo_params.lr": [1e-4, 3e-4], "cost_limit": [5, 10]}
    rand = sweep.parse_random(["algo_params.cost_lr=0.01:0.1:log", "seed_x=0:1"])
    assert rand == {"algo_params.cost_lr": (0.01, 0.1, True), "seed_x": (0.0, 1.0, False)}
    combos = sweep.combinations(grid, {"algo_params.cost_lr": rand["algo_params.cost_lr"]}, samples=3)
    assert len(combos) == 4 * 3
    draws = [c["algo_params.cost_lr"] for c in combos]
    assert all(0.01 <= d <= 0.1 for d in draws)
    assert len(set(draws)) == 3 and all(draws[i] == draws[4 * (i // 4)] for i in range(12))  # shared by the grid
    assert sweep.combinations(grid, {}, 5) == [{"algo_params.lr": a, "cost_limit": b}
                                               for a in (1e-4, 3e-4) for b in (5, 10)]
    assert sweep.overrides_of({"algo_params.hidden": [8, 8], "cost_limit": 5}, 2) == [
        "algo_params.hidden=[8, 8]", "cost_limit=5", "seed=2"]
    for bad in (["lr"], ["lr="], ["=1,2"]):
        with pytest.raises(ConfigError, match="--grid"):
            sweep.parse_grid(bad)
    for bad in (["lr=1"], ["lr=2:1"], ["lr=0:1:log"], ["lr=a:b"], ["lr=1:2:lin"]):
        with pytest.raises(ConfigError, match="--random"):
            sweep.parse_random(bad)


def test_trial_resources_follow_the_config():
    cfg = load_config("ppo_lag/FunctionEnv-v0", ["resources.num_env_hosts=3", "resources.envs_per_host=4",
                                                 "steps_per_iteration=2400", "resources.num_gpus_per_learner=0.5",
                                                 "resources.num_cpus_per_host=2"])
    assert sweep.trial_resources(cfg) == [{}, {"CPU": 1.0, "GPU": 0.5}] + [{"CPU": 2.0}] * 3
    cfg = load_config("mb_cgpo/SwimmerVelocity-v0", ["resources.num_gpus_per_host=0.25"])
    n = cfg.resources.num_env_hosts
    assert sweep.trial_resources(cfg)[2:] == [{"CPU": cfg.resources.num_cpus_per_host, "GPU": 0.25}] * (n + 1)


def test_asha_scheduler_on_a_named_metric():
    spec = {"asha": "episode/return", "asha_grace": 50, "iterations": 10}
    asha = sweep.asha_scheduler(spec)
    assert ((asha._metric, asha._mode, asha._time_attr, asha._max_t)
            == ("episode/return", "max", "training_iteration", 11))
    assert asha._brackets[0]._rungs[-1][0] == 11  # grace capped at max_t
    assert sweep.asha_scheduler({**spec, "asha": "episode/cost"})._mode == "min"
    assert sweep.asha_scheduler({**spec, "asha": "episode/cost:max"})._mode == "max"
    assert sweep.asha_scheduler({**spec, "asha": None}) is None
    with pytest.raises(ConfigError, match="--asha"):
        sweep.asha_scheduler({**spec, "asha": "episode/return:up"})


def test_summary_mean_std_limit_and_best(tmp_path):
    spec = {"combos": [{"lr": 1}, {"lr": 2}, {"lr": 3}]}
    t = lambda c, s, r, cost, status="finished": {"combo": c, "seed": s, "status": status, "return": r,  # noqa: E731
                                                  "cost": cost, "cost_limit": 10.0}
    trials = [t(0, 0, 5, 4), t(0, 1, 7, 8),          # within: cost 6 ± 2
              t(1, 0, 20, 9), t(1, 1, 30, 15),       # higher return, cost 12 > 10
              t(2, 0, 9, 10), t(2, 1, 0, 0, "stopped")]  # only seed 0 finished: cost 10 = limit
    out = sweep.summarise(tmp_path, spec, trials, 10.0)
    rows = {r["combo"]: r for r in out["summary"]}
    assert (rows[0]["return_mean"], rows[0]["return_std"], rows[0]["cost_mean"], rows[0]["cost_std"]) == (6, 1, 6, 2)
    assert [rows[k]["satisfied"] for k in range(3)] == [True, False, True] and rows[2]["seeds"] == 1
    assert out["best"]["combo"] == 2 and out["best"]["params"] == {"lr": 3}
    assert json.loads((tmp_path / "best.json").read_text())["return_mean"] == 9
    md = (tmp_path / "summary.md").read_text()
    assert "| c002 | 3 | 1 | 9 ± 0 | 10 ± 0 | 10 | **yes** (best) |" in md and "c002-s1 stopped" in md
    assert (tmp_path / "return_vs_cost.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "trials.csv")) == 6
    none = sweep.summarise(tmp_path, spec, [t(0, 0, 5, 40)], 10.0)
    assert none["best"] is None and math.isnan(none["summary"][1]["return_mean"])


def test_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["sweep", "ppo_lag/FunctionEnv-v0", "--out", str(tmp_path / "a")]) == 2
    assert "needs --grid, --random or --seeds" in capsys.readouterr().err
    assert main(["sweep", "ppo_lag/FunctionEnv-v0", "--grid", "resources.num_env_hosts=1,-1",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: resources.num_env_hosts") and "combination 1" in err and "\n" not in err
    assert main(["sweep", "--resume", str(tmp_path / "nothing")]) == 2
    assert "holds no sweep" in capsys.readouterr().err


TINY = ["total_env_steps=400", "steps_per_iteration=200", "resources.envs_per_host=4",
        "algo_params.hidden=[8]", "algo_params.epochs=1", "algo_params.minibatch_size=100",
        "logging.tensorboard=false", "logging.ray_metrics=false"]


def _sweep(tmp_path, seeds: int, capsys) -> tuple:
    out = tmp_path / "sweep"
    args = ["sweep", "ppo_lag/FunctionEnv-v0", "--grid", "cost_limit=0.001,1000", "--seeds", str(seeds),
            "--eval-episodes", "4", "--out", str(out), *[a for o in TINY for a in ("--set", o)]]
    assert main(args) == 0
    trials = pd.read_csv(out / "trials.csv")
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == [f"c{c:03d}-s{s}" for c in range(2) for s in range(seeds)]
    assert len(trials) == 2 * seeds and (trials["status"] == "finished").all()
    assert (trials["iterations"] == 3).all()  # 2 logged rows + the evaluation
    for run in runs:  # 2 logged rows each, the trial's seed and limit in its config
        m = pd.read_csv(out / "runs" / run / "metrics.csv")
        assert m["env_steps"].tolist() == [200, 400]
        cfg = load_config(out / "runs" / run / "config.yaml")
        assert cfg.seed == int(run[-1]) and cfg.limit == (0.001 if run.startswith("c000") else 1000)
    summary = pd.read_csv(out / "summary.csv")
    # FunctionEnv's episode cost (1-D, T = 100) is far above 0.001 and far below 1000 at any
    # policy this budget reaches: only the loose limit holds, and it is named best
    assert summary["satisfied"].tolist() == [False, True] and (summary["seeds"] == seeds).all()
    by = trials.groupby("combo")["cost"]
    assert summary["cost_mean"].tolist() == pytest.approx(by.mean().tolist())
    assert summary["cost_std"].tolist() == pytest.approx(by.std(ddof=0).fillna(0).tolist())
    assert json.loads((out / "best.json").read_text())["params"] == {"cost_limit": 1000}
    assert "best within the cost limit: {'cost_limit': 1000}" in capsys.readouterr().out
    assert (out / "return_vs_cost.png").is_file() and (out / "tune").is_dir()

    stamps = {r: (out / "runs" / r / "metrics.csv").stat().st_mtime_ns for r in runs}
    assert main(["sweep", "--resume", str(out)]) == 0  # finished: nothing runs again
    assert {r: (out / "runs" / r / "metrics.csv").stat().st_mtime_ns for r in runs} == stamps
    assert pd.read_csv(out / "summary.csv").equals(summary)
    return trials, summary


def test_grid_on_ray_tune_and_resume(ray_session, tmp_path, monkeypatch, capsys):
    """2 combinations (two cost limits) = 2 Tune trials of PPO-Lag on FunctionEnv, side by side;
    resuming the finished sweep runs nothing again."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _sweep(tmp_path, 1, capsys)


@pytest.mark.slow
def test_grid_times_seeds_on_ray_tune_and_resume(ray_session, tmp_path, monkeypatch, capsys):
    """2 combinations × 2 seeds = 4 trials: mean ± std over the seeds in the table."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _trials, summary = _sweep(tmp_path, 2, capsys)
    assert (summary["cost_std"] > 0).all()  # two seeds, two different policies


@pytest.mark.slow
def test_interrupted_sweep_resumes_its_runs_from_their_checkpoints(tmp_path):
    """Ctrl-C in the middle of the first trial: exit 130 with the resume command; `--resume`
    continues that trial's run from its last checkpoint (its first rows are kept) and runs the
    trial that had not started."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    sets = ["total_env_steps=6000", "steps_per_iteration=200", "schedule.checkpoint_every=2", *TINY[2:]]
    cmd = [sys.executable, "-m", "saferl.cli", "sweep", "ppo_lag/FunctionEnv-v0", "--grid", "cost_limit=0.001,1000",
           "--eval-episodes", "2", "--max-concurrent", "1", "--out", str(out), *[a for o in sets for a in ("--set", o)]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = out / "runs" / "c000-s0" / "checkpoints"  # only the latest few are kept: any from iteration 4 on
    deadline = time.monotonic() + 900
    while (not any(int(p.stem[5:]) >= 4 for p in ckpts.glob("ckpt_*.pt")) and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and f"saferl sweep --resume {out}" in err, err[-2000:]
    before = pd.read_csv(out / "runs" / "c000-s0" / "metrics.csv")
    assert 4 <= len(before) < 30 and not (out / "runs" / "c001-s0").exists()

    assert subprocess.run([sys.executable, "-m", "saferl.cli", "sweep", "--resume", str(out)], env=env,
                          capture_output=True, timeout=900).returncode == 0
    after = pd.read_csv(out / "runs" / "c000-s0" / "metrics.csv")
    assert after["env_steps"].iloc[-1] == 6000 and after.iloc[:4].equals(before.iloc[:4])
    assert after["iteration"].tolist()[:4] == [1, 2, 3, 4]  # not started over
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["status"] == "finished").all() and len(trials) == 2
