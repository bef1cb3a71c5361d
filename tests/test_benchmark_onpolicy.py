"""`saferl benchmark onpolicy`: the final-performance rule and OmniSafe's table layout on
hand-made numbers, and a real tiny benchmark on Safety-Gymnasium whose table is recomputed
here from the runs' own metrics.csv."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from saferl.tools.studies import benchmark_onpolicy as bench
from saferl.tools.studies.runner import format_mean_std
from tests.conftest import needs_sg


def test_final_performance_is_the_mean_over_the_last_k_points():
    ret, cost = [float(i) for i in range(20)], [100.0 - i for i in range(20)]
    assert bench.final_performance(ret, cost) == (18.5, 81.5, 2)  # default K: 10% of 20 points
    assert bench.final_performance(ret, cost, last_k=4) == (17.5, 82.5, 4)
    assert bench.final_performance(ret[:5], cost[:5]) == (4.0, 96.0, 1)  # at least one point
    assert bench.final_performance(ret[:3], cost[:3], last_k=10) == (1.0, 99.0, 3)  # at most all of them
    assert bench.final_performance([], []) == (None, None, 0)


def test_mean_std_cell():
    assert format_mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert format_mean_std([-3.5]) == "-3.50"
    assert format_mean_std([4.0, None, 6.0]) == "5.00 ± 1.41 (2/3)"
    assert format_mean_std([None]) == "-"


def test_table_layout():
    s = {"seeds": [0, 1], "steps": 2000, "steps_per_iteration": 1000, "last_k": None}
    pg, car = "SafetyPointGoal1-v0", "SafetyCarGoal1-v0"

    def rec(task, algo, seed, r, c, status="ok"):
        return {"task": task, "algo": algo, "seed": seed, "status": status, "final_return": r, "final_cost": c,
                "cost_limit": 25.0, "total_env_steps": 2000}

    records = [rec(pg, "ppo_lag", 0, 10.0, 30.0), rec(pg, "ppo_lag", 1, 14.0, 20.0), rec(pg, "cpo", 0, -1.0, 0.0),
               rec(pg, "cpo", 1, None, None), rec(car, "ppo_lag", 0, 1.0, 2.0),
               rec(car, "cpo", 0, 0.0, 0.0, "failed: X")]
    text = bench.table(records, [pg, car], ["ppo_lag", "cpo"], s)
    head = "(cost limit 25)\n\n| Algorithm | Reward | Cost |\n|---|---|---|\n"
    # sample std over seeds; a seed without episodes is counted out as (k/n); a failed run is left out
    assert f"## {pg} {head}| PPOLag | 12.00 ± 2.83 | 25.00 ± 7.07 |\n| CPO | -1.00 (1/2) | 0.00 (1/2) |\n" in text
    assert f"## {car} {head}| PPOLag | 1.00 | 2.00 |\n\n" in text
    assert "1 run(s) failed" in text
    assert bench.label("ppo_x") == "PPO_X"  # a new algorithm needs no label to appear


USAGE_ERRORS = {
    "onpolicy": ((["--tasks", "Nope-v0"], "unknown task 'Nope-v0'"),
                 (["--algos", "sac_lag"], "sac_lag is not an on-policy"),
                 (["--seeds", "0,x"], "--seeds"),
                 (["--envs", "3"], "steps_per_iteration: must be divisible")),
    "offpolicy": ((["--tasks", "Nope-v0"], "unknown task 'Nope-v0'"),
                  (["--algos", "ppo_lag"], "ppo_lag is not an off-policy algorithm"),
                  (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
                  (["--envs", "3"], "steps_per_iteration: must be divisible")),
}


@pytest.mark.parametrize("preset", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line(tmp_path, capsys, preset):
    from saferl.cli import main

    out = tmp_path / "b"
    for argv, msg in USAGE_ERRORS[preset]:
        assert main(["benchmark", preset, "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert not out.exists()  # validated before anything is created


def _cell(text: str) -> tuple[float, float]:
    mean, std = text.split(" ± ")
    return float(mean), float(std)


def assert_final_cells(summary_row: dict, cells: list[str], finals: list[tuple[float, float]]) -> None:
    """The summary's reward and cost mean/std and the table's "mean ± std" cells equal the mean
    and sample std over seeds of the runs' own final (return, cost)."""
    for j, key in enumerate(("reward", "cost")):
        vals = [f[j] for f in finals]
        mean, std = statistics.fmean(vals), statistics.stdev(vals)
        assert math.isclose(float(summary_row[f"{key}_mean"]), mean, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(float(summary_row[f"{key}_std"]), std, rel_tol=1e-9, abs_tol=1e-9)
        shown = _cell(cells[j])
        assert abs(shown[0] - mean) <= 0.005 + 1e-9 and abs(shown[1] - std) <= 0.005 + 1e-9, (shown, mean, std)


@needs_sg()
def test_tiny_benchmark_on_safety_gym(ray_session, run_root, tmp_path, capsys):
    """PPO-Lag and TRPO-Lag on SafetyPointGoal1-v0, 2 seeds, 2,000 env steps on 1 host × 1 env
    (1,000 per iteration: one 1000-step episode ends in each of the 2 iterations). The table's
    numbers are the mean ± std over seeds of the last-K means of the runs' metrics.csv."""
    import pandas as pd

    from saferl.cli import main

    out = tmp_path / "bench"
    argv = ["benchmark", "onpolicy", "--algos", "ppo_lag,trpo_lag", "--seeds", "2", "--steps", "2000",
            "--steps-per-iteration", "1000", "--hosts", "1", "--envs", "1", "--out", str(out),
            "--set", "logging.tensorboard=false", "--parallel", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    for name in ("benchmark.md", "summary.csv", "runs.csv", "curves.csv", "curves_SafetyPointGoal1-v0.png",
                 "benchmark.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    def check(k: int) -> None:
        table = (out / "benchmark.md").read_text()
        assert "## SafetyPointGoal1-v0 (cost limit 25)\n\n| Algorithm | Reward | Cost |\n|---|---|---|\n" in table
        rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "Algorithm" not in ln]
        cells = {ln.split(" | ")[0][2:]: ln.strip("| ").split(" | ")[1:] for ln in rows}
        assert list(cells) == ["PPOLag", "TRPOLag"]
        runs = list(csv.DictReader(open(out / "runs.csv")))
        summary = {r["algo"]: r for r in csv.DictReader(open(out / "summary.csv"))}
        assert len(runs) == 4 and all(r["status"].startswith("ok") for r in runs)
        for algo, name in (("ppo_lag", "PPOLag"), ("trpo_lag", "TRPOLag")):
            finals = []
            for seed in (0, 1):
                (r,) = [r for r in runs if r["algo"] == algo and r["seed"] == str(seed)]
                assert Path(r["run_dir"]).name == f"{algo}-SafetyPointGoal1-v0-s{seed}"
                m = pd.read_csv(Path(r["run_dir"]) / "metrics.csv").dropna(subset=["episode/return"])
                assert len(m) == 2 and int(r["n_points"]) == 2 and int(r["last_k"]) == k
                finals.append((m["episode/return"].iloc[-k:].mean(), m["episode/cost"].iloc[-k:].mean()))
            assert_final_cells(summary[algo], cells[name], finals)

    check(k=1)  # default: 10% of 2 points, at least 1
    # the same --out with another K: the runs are kept (no training), the table recomputed
    assert main(argv + ["--last-k", "2"]) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 4
    check(k=2)
