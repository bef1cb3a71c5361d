"""`saferl study cgpo-table1` (CGPO paper, Table 1): the F.2 metrics against hand-computed examples,
and the whole study end-to-end on FunctionEnv-v0 with a tiny budget (slow)."""
from __future__ import annotations

import csv
import math

import pytest

from saferl.tools.studies import cgpo_table1 as study
from saferl.tools.studies.cgpo_table1 import conv_steps, format_cell, read_curve, vio_ratio

# A run that improves, then settles at R ≈ 10 while its cost crosses the limit b = 8.
STEPS = [100, 200, 300, 400, 500, 600]
RETURNS = [0.0, 5.0, 9.0, 10.0, 10.5, 10.2]  # range 10.5 -> threshold 0.1 · 10.5 = 1.05
COSTS = [20.0, 12.0, 9.0, 7.0, 8.0, 7.5]     # soft limit b + m = 8 + 0.05 · 8 = 8.4


def test_conv_steps_hand_example():
    # k = 0, 1, 2 violate (20, 12, 9 > 8.4); k = 3: window [400, 600] has R ∈ {10, 10.5, 10.2},
    # range 0.5 ≤ 1.05, and C_3 = 7 ≤ 8.4 -> converged at x = 400.
    assert conv_steps(STEPS, RETURNS, COSTS, 8.0, window=200, tol=0.1, margin=0.05) == 400


def test_conv_steps_needs_flat_window_feasible_point_and_full_window():
    # a tighter threshold (0.105 < 0.5): never flat enough
    assert conv_steps(STEPS, RETURNS, COSTS, 8.0, window=200, tol=0.01, margin=0.05) is None
    # the soft margin: C_3 = 8.3 ≤ 8.4 still counts as feasible ...
    costs = COSTS[:3] + [8.3] + COSTS[4:]
    assert conv_steps(STEPS, RETURNS, costs, 8.0, window=200, tol=0.1, margin=0.05) == 400
    # ... 8.5 does not, and k = 4's window [500, 700] is not fully observed (last x = 600)
    costs = COSTS[:3] + [8.5] + COSTS[4:]
    assert conv_steps(STEPS, RETURNS, costs, 8.0, window=200, tol=0.1, margin=0.05) is None
    # without the margin 8.3 > 8 violates
    costs = COSTS[:3] + [8.3] + COSTS[4:]
    assert conv_steps(STEPS, RETURNS, costs, 8.0, window=200, tol=0.1, margin=0.0) is None
    # a wider window from k = 2: [300, 600] has range 10.5 − 9 = 1.5 > 1.05, and k = 3's window
    # [400, 700] is not fully observed
    assert conv_steps(STEPS, RETURNS, COSTS, 8.0, window=300, tol=0.1, margin=0.05) is None
    # with a looser threshold (τ = 0.2 -> 2.1) and feasible costs, k = 2's window [300, 500] qualifies
    assert conv_steps(STEPS, RETURNS, [1.0] * 6, 8.0, window=200, tol=0.2, margin=0.05) == 300
    assert conv_steps([], [], [], 8.0, window=10) is None
    # a window holding one point shows no variation: it never converges
    assert conv_steps(STEPS, RETURNS, [1.0] * 6, 8.0, window=50, tol=0.1) is None


def test_conv_steps_negative_limit():
    # CartPole: J_C = Σ −x² ≤ −50; soft limit −50 + 0.05 · 50 = −47.5
    steps, returns = [1, 2, 3, 4], [0.0, 100.0, 100.0, 100.0]
    assert conv_steps(steps, returns, [-40.0, -48.0, -60.0, -60.0], -50.0, window=1, tol=0.1) == 2
    assert conv_steps(steps, returns, [-40.0, -47.0, -60.0, -60.0], -50.0, window=1, tol=0.1) == 3


def test_vio_ratio_hand_example():
    # b = 8, band w = 0.2 · 8 = 1.6 -> critical updates start at C_i ∈ [6.4, 9.6]: i = 1 (7.5),
    # 2 (8.6), 3 (7.9), 4 (8.2); not i = 0 (5) or 5 (12), and the last point starts no update.
    # They produce C = 8.6 (> 8.4: violation), 7.9, 8.2, 12 (violation): 2 of 4 = 50 %.
    costs = [5.0, 7.5, 8.6, 7.9, 8.2, 12.0, 6.0]
    assert vio_ratio(costs, 8.0, band=0.2, margin=0.05) == (50.0, 4, 2)
    # no margin: 8.2 violates too
    assert vio_ratio(costs, 8.0, band=0.2, margin=0.0) == (75.0, 4, 3)
    # band 0.05 · 8 = 0.4: only i = 3 (7.9 -> 8.2, within the margin) and i = 4 (8.2 -> 12, violation)
    assert vio_ratio(costs, 8.0, band=0.05, margin=0.05) == (50.0, 2, 1)
    # nothing near the limit: undefined (the paper's "-†")
    assert vio_ratio([1.0, 2.0, 1.5], 8.0) == (None, 0, 0)
    assert vio_ratio([8.0], 8.0) == (None, 0, 0)


def test_vio_ratio_negative_limit():
    # b = −50: band 10, soft limit −47.5. Updates from −45 (-> −46 violates), −46 (-> −60),
    # −60 (|−60 + 50| = 10, in the band; -> −52), −52 (-> −40 violates): 2 of 4.
    assert vio_ratio([-45.0, -46.0, -60.0, -52.0, -40.0], -50.0, band=0.2, margin=0.05) == (50.0, 4, 2)


def test_read_curve_skips_rows_without_episodes_and_dedupes_resumed_iterations(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [
        {"iteration": 1, "env_steps": 80, "j_c": 3.0},
        {"iteration": 2, "env_steps": 160, "episode/return": 1.0, "episode/cost": 9.0},
        {"iteration": 3, "env_steps": 240, "episode/return": 2.0, "episode/cost": 8.0},
        {"iteration": 3, "env_steps": 240, "episode/return": 2.5, "episode/cost": 7.5},  # logged again after a resume
        {"iteration": 4, "env_steps": 320, "episode/return": 3.0, "episode/cost": 7.0},
    ]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["iteration", "env_steps", "j_c", "episode/return", "episode/cost"])
        w.writeheader()
        w.writerows(rows)
    assert read_curve(path) == ([160.0, 240.0, 320.0], [1.0, 2.5, 3.0], [9.0, 7.5, 7.0])


def test_format_cell():
    assert format_cell([1e6, 2e6], "steps") == "1.50e+06 ± 7.07e+05"
    assert format_cell([10.0, None], "ratio") == "10.00 (1/2)"
    assert format_cell([3.0], "ratio") == "3.00"
    assert format_cell([None, None], "steps") == "-"


def test_unknown_task_is_one_line_error(tmp_path, capsys):
    from saferl.cli import main

    out = tmp_path / "study"
    assert main(["study", "cgpo-table1", "--tasks", "NoSuchTask-v0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'NoSuchTask-v0'" in err and "FunctionEnv-v0" in err
    assert not out.exists()  # validated before anything is created


# slow: the fast checks are the table, plot, Conv. Steps and Vio. Ratio tests on records below
@pytest.mark.slow
def test_study_end_to_end_function_env(ray_session, run_root, tmp_path, capsys):
    """Two algorithms on FunctionEnv-v0, 8,000 env steps with 8 envs (10 episodes per env), in
    the test session's Ray; then a second call on the same --out keeps the runs and only
    recomputes the metrics."""
    from saferl.cli import main

    out = tmp_path / "study"
    argv = ["study", "cgpo-table1", "--tasks", "FunctionEnv-v0", "--algos", "cgpo,ppo_lag", "--seeds", "1",
            "--budget", "8000", "--envs", "8", "--out", str(out), "--set", "logging.tensorboard=false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[1/2] start cgpo on FunctionEnv-v0 seed 0" in printed and "[2/2] done ppo_lag" in printed
    for name in ("runs.csv", "curves.csv", "table1.md", "curves.png", "study.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    table = (out / "table1.md").read_text()
    assert "| Algorithms | FunctionEnv-v0 Conv. Steps ↓ | FunctionEnv-v0 Vio. Ratio (%) ↓ |" in table
    body = [line for line in table.splitlines() if line.startswith("| ") and "Algorithms" not in line]
    assert [line.split(" | ")[0] for line in body] == ["| CGPO", "| PPO-Lag"]

    with open(out / "runs.csv", newline="") as fh:
        runs = {r["algo"]: r for r in csv.DictReader(fh)}
    assert set(runs) == {"cgpo", "ppo_lag"}
    for r in runs.values():
        assert r["status"] == "ok" and r["task"] == "FunctionEnv-v0" and r["seed"] == "0"
        assert int(r["total_env_steps"]) == 8000 and int(r["num_envs"]) == 8
        assert int(r["n_points"]) == 10  # one episode of every env per 800 steps
        # the recorded metrics are the metric functions applied to the run's own metrics.csv
        x, ret, cost = read_curve(study.Path(r["run_dir"]) / "metrics.csv")
        conv = conv_steps(x, ret, cost, 8.0, window=800, tol=0.1, margin=0.05)
        vio, n_crit, n_vio = vio_ratio(cost, 8.0, band=0.2, margin=0.05)
        assert (float(r["conv_steps"]) if r["conv_steps"] else None) == conv
        assert (float(r["vio_ratio"]) if r["vio_ratio"] else None) == vio
        assert (int(r["n_critical"]), int(r["n_violations"])) == (n_crit, n_vio)
        assert math.isclose(float(r["final_cost"]), cost[-1])

    # same --out, another metric setting: no training, same runs, recomputed outputs
    assert main(argv + ["--conv-tol", "1.0", "--vio-band", "10"]) == 0
    assert "finished earlier, kept" in capsys.readouterr().out
    with open(out / "runs.csv", newline="") as fh:
        again = {r["algo"]: r for r in csv.DictReader(fh)}
    for algo, r in again.items():
        assert r["run_dir"] == runs[algo]["run_dir"]
        # τ = 1: any fully observed window is flat enough, so the first feasible point converges
        x, ret, cost = read_curve(study.Path(r["run_dir"]) / "metrics.csv")
        assert (float(r["conv_steps"]) if r["conv_steps"] else None) == conv_steps(
            x, ret, cost, 8.0, window=800, tol=1.0, margin=0.05)
        assert int(r["n_critical"]) == 9  # band 10 × |b| covers every update


def test_table_and_plot_from_records(tmp_path):
    """Table 1's layout (mean ± std over seeds, (k/n), the paper's rows for Brax tasks) and the
    plot's multi-seed path, from synthetic records (no training)."""
    import argparse

    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--tasks", "BraxCartPole-v1,FunctionEnv-v0", "--algos", "shac_lag,cgpo",
                              "--seeds", "2"])
    s = study._settings(args)
    records, curves = [], []
    for task, b in (("BraxCartPole-v1", -50.0), ("FunctionEnv-v0", 8.0)):
        for algo, conv, vio in (("shac_lag", (2e6, 4e6), (50.0, 30.0)), ("cgpo", (1e6, None), (None, None))):
            for seed in (0, 1):
                records.append({"task": task, "algo": algo, "seed": seed, "status": "ok", "cost_limit": b,
                                "conv_steps": conv[seed], "vio_ratio": vio[seed]})
                curves += [(task, algo, seed, 100.0 * (i + 1) + seed, float(i), b + 5 - i) for i in range(10)]
    study._write_table(tmp_path, records, args, s)
    study._plot(tmp_path, curves, records, args)
    table = (tmp_path / "table1.md").read_text()
    assert ("| Algorithms | CartPole Conv. Steps ↓ | CartPole Vio. Ratio (%) ↓ | FunctionEnv-v0 Conv. Steps ↓ "
            "| FunctionEnv-v0 Vio. Ratio (%) ↓ |") in table
    # CartPole's cells carry the task's deviation next to the number; FunctionEnv's (no paper task) none
    mark = "(task differs: reward reshaped, fallen pole reset)"
    assert (f"| SHAC-Lag | 3.00e+06 ± 1.41e+06 {mark} | 40.00 ± 14.14 {mark} | 3.00e+06 ± 1.41e+06 "
            "| 40.00 ± 14.14 |") in table
    assert f"| CGPO | 1.00e+06 (1/2) {mark} | - {mark} | 1.00e+06 (1/2) | - |" in table
    assert f"| CGPO | 1.77e+06 {mark} | 3.96 {mark} |" in table  # the paper's CartPole numbers, marked
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_default_rows_are_the_papers_and_every_config_validates(tmp_path):
    """Without --algos the study runs Table 1's rows (PDO, APPO, CPO, CUP, BPTT-Lag, SHAC-Lag, CGPO)
    on the four Brax tasks, each from a shipped config (validated here, nothing trained)."""
    import argparse

    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args([])
    assert args.algos == ["pdo", "appo", "cpo", "cup", "bptt_lag", "shac_lag", "cgpo"]
    assert [study.ALGO_LABELS[a] for a in args.algos] == list(study.PAPER_TABLE1)  # the paper's row order
    jobs = study._plan(args, study._settings(args), tmp_path / "out")
    assert len(jobs) == 4 * 7 and {(j["algo"], j["task"]) for j in jobs} == {
        (a, t) for a in args.algos for t in study.PAPER_TASKS}
    assert all(j["cfg"].total_env_steps == 50_000 for j in jobs)


def test_deviating_tasks_are_marked_next_to_every_number(tmp_path):
    """CartPole (reward reshaped) and Reacher (limit unreachable) carry their mark in every cell, ours
    and the paper's; HalfCheetah none; a cost limit other than Table 4's is marked too; runs.csv
    names the deviation per run."""
    import argparse

    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    tasks = "BraxCartPole-v1,BraxReacher-v0,BraxHalfCheetahVel-v0"
    args = parser.parse_args(["--tasks", tasks, "--algos", "pdo,appo,cgpo"])
    s = study._settings(args)
    limits = {"BraxCartPole-v1": -50.0, "BraxReacher-v0": 400.0, "BraxHalfCheetahVel-v0": 300.0}
    records = [{"task": t, "algo": a, "seed": 0, "status": "ok", "cost_limit": b, "conv_steps": 1e4,
                "vio_ratio": 20.0} for t, b in limits.items() for a in ("pdo", "appo", "cgpo")]
    study._write_table(tmp_path, records, args, s)
    study._write_runs(tmp_path, records)
    table = (tmp_path / "table1.md").read_text()
    reshaped = "(task differs: reward reshaped, fallen pole reset)"
    unreachable = "(limit unreachable under the written cost)"
    other_limit = "(limit differs: 300 here, 400 in the paper)"
    ours_md, paper_md = table.split("## The paper's numbers")
    ours, paper = ([ln for ln in md.splitlines() if ln.startswith("| ") and "Algorithms" not in ln]
                   for md in (ours_md, paper_md))
    assert [ln.split(" | ")[0] for ln in ours] == ["| PDO", "| APPO", "| CGPO"]
    assert [ln.split(" | ")[0] for ln in paper] == ["| PDO", "| APPO", "| CPO", "| CUP", "| BPTT-Lag",
                                                    "| SHAC-Lag", "| CGPO"]
    for line in ours + paper:
        cells = line.strip("| ").split(" | ")[1:]
        assert len(cells) == 6
        assert all(c.endswith(reshaped) for c in cells[0:2]), line
        assert all(c.endswith(unreachable) for c in cells[2:4]), line
    for line in ours:  # our HalfCheetah runs used another limit than the paper's
        assert all(c.endswith(other_limit) for c in line.strip("| ").split(" | ")[5:7]), line
    assert f"| APPO | 5.95e+06 {reshaped} | 6.59 {reshaped} |" in table
    assert f"| CPO | 6.72e+06 {reshaped} | 5.96 {reshaped} | 1.98e+06 " in table
    assert "-† " + other_limit in table  # CPO on HalfCheetah: the paper's "-†", marked
    assert "50,000 env steps per run, not the paper's 5 seeds" in table
    with open(tmp_path / "runs.csv", newline="") as fh:
        notes = {r["task"]: r["task_deviation"] for r in csv.DictReader(fh)}
    assert notes == {"BraxCartPole-v1": "task differs: reward reshaped, fallen pole reset",
                     "BraxReacher-v0": "limit unreachable under the written cost",
                     "BraxHalfCheetahVel-v0": "limit differs: 300 here, 400 in the paper"}
