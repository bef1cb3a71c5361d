"""`saferl benchmark offpolicy`: the cumulative cost (CVPO's Figure 4) on hand-made metrics, the
warm-up rule and usage errors, and a real tiny benchmark (CVPO and SAC-Lag on the torch task
PointHazard-D1-v0) whose table and cumulative costs are recomputed here from the runs' metrics.csv."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from saferl.config import load_config
from saferl.tools.studies import benchmark as shared
from saferl.tools.studies import benchmark_offpolicy as bench
from saferl.tools.studies import benchmark_onpolicy
from tests.test_benchmark_onpolicy import assert_final_cells


def _metrics(path: Path, rows: list[dict]) -> Path:
    cols = ["iteration", "env_steps", "episode/return", "episode/cost", "episode/count", "loss_q"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


def test_cumulative_cost_sums_episode_count_times_cost(tmp_path):
    rows = [{"iteration": 1, "env_steps": 100, "episode/return": 1.0, "episode/cost": 3.0, "episode/count": 2},
            {"iteration": 2, "env_steps": 200, "loss_q": 0.5},  # no episode finished: no point
            {"iteration": 3, "env_steps": 300, "episode/return": 2.0, "episode/cost": 0.5, "episode/count": 4},
            {"iteration": 4, "env_steps": 400, "episode/return": 9.0, "episode/cost": 9.0, "episode/count": 9},
            # a resume logged iteration 4 again: the last row wins
            {"iteration": 4, "env_steps": 400, "episode/return": 3.0, "episode/cost": 1.0, "episode/count": 1}]
    got = shared.read_cumulative_cost(_metrics(tmp_path / "m.csv", rows))
    assert got == [(100.0, 2, 3.0, 1.0, 6.0), (300.0, 4, 0.5, 2.0, 8.0), (400.0, 1, 1.0, 3.0, 9.0)]


def test_figure_points_are_means_over_seeds_at_shared_steps():
    def pt(seed, x, cum, ret, algo="cvpo"):
        return {"task": "T", "algo": algo, "seed": seed, "env_steps": x, "cumulative_cost": cum,
                "episode_return": ret}

    rows = [pt(0, 100, 2.0, 1.0), pt(0, 200, 4.0, 3.0), pt(1, 100, 6.0, 5.0), pt(1, 200, 10.0, 7.0),
            pt(1, 300, 11.0, 8.0), pt(0, 100, 1.0, 1.0, "sac")]  # seed 0 of cvpo has no step 300
    means = shared.mean_cumulative_cost(rows)
    assert means == [
        {"task": "T", "algo": "cvpo", "env_steps": 100, "seeds": 2, "cumulative_cost": 4.0, "episode_return": 3.0},
        {"task": "T", "algo": "cvpo", "env_steps": 200, "seeds": 2, "cumulative_cost": 7.0, "episode_return": 5.0},
        {"task": "T", "algo": "sac", "env_steps": 100, "seeds": 1, "cumulative_cost": 1.0, "episode_return": 1.0}]


def test_presets_share_the_implementation_and_keep_their_lists():
    assert bench.OFFPOLICY_ALGOS == ("cvpo", "sac_lag", "td3_lag", "ddpg_lag", "sac")
    assert set(shared.BENCHMARKS) == {"onpolicy", "offpolicy", "reference"}
    assert shared.load("offpolicy").PRESET is bench.PRESET
    assert shared.load("onpolicy").PRESET is benchmark_onpolicy.PRESET
    s = {"seeds": [0], "steps": 10, "steps_per_iteration": 5, "last_k": None}
    rec = {"task": "T", "algo": "cvpo", "seed": 0, "status": "ok", "final_return": 1.0, "final_cost": 2.0,
           "cost_limit": 25.0, "total_env_steps": 10}
    assert bench.table([rec], ["T"], ["cvpo"], s).startswith("# Off-policy benchmark\n")
    assert "| CVPO | 1.00 | 2.00 |" in bench.table([rec], ["T"], ["cvpo"], s)
    assert benchmark_onpolicy.table([rec], ["T"], ["cvpo"], s).startswith("# On-policy benchmark\n")


def _settings(argv: list[str]):
    from saferl.cli import build_parser

    args = build_parser().parse_args(["benchmark", "offpolicy", *argv])
    return args, shared.settings(bench.PRESET, args)


def test_warmup_is_the_configs_at_most_a_tenth_of_the_budget(tmp_path):
    def warmups(argv):
        _, s = _settings(argv)
        jobs = shared.plan(bench.PRESET, s, tmp_path)
        return {j["algo"]: j["cfg"].learner_params().warmup_steps for j in jobs}, jobs

    got, jobs = warmups(["--seeds", "1"])  # the reduced default: 10,000 steps
    assert got == dict.fromkeys(bench.OFFPOLICY_ALGOS, 1000)
    assert {j["task"] for j in jobs} == {"SafetyPointCircle1-v0"}
    assert all(j["cfg"].schedule.log_every == 1 for j in jobs)  # the cumulative cost needs every row
    assert all((j["cfg"].resources.num_env_hosts, j["cfg"].resources.envs_per_host) == (1, 2) for j in jobs)
    got, _ = warmups(["--seeds", "1", "--steps", "1000000", "--hosts", "config", "--envs", "config"])
    own = {a: load_config(f"{a}/SafetyPointCircle1-v0").learner_params().warmup_steps for a in bench.OFFPOLICY_ALGOS}
    assert got == own and own["sac_lag"] == 10000 and own["cvpo"] == 5000  # the configs' own (OmniSafe's, CVPO's)
    got, _ = warmups(["--seeds", "1", "--warmup-steps", "300"])
    assert got == dict.fromkeys(bench.OFFPOLICY_ALGOS, 300)
    got, _ = warmups(["--seeds", "1", "--set", "algo_params.warmup_steps=7"])  # --set wins
    assert got == dict.fromkeys(bench.OFFPOLICY_ALGOS, 7)


# slow: the preset shares benchmark.py with the on-policy one, whose tiny run stays in the default
# run; test_presets_share_the_implementation_and_keep_their_lists is the fast check
@pytest.mark.slow
def test_tiny_benchmark_on_point_hazard(ray_session, run_root, tmp_path, capsys):
    """CVPO and SAC-Lag on PointHazard-D1-v0 (120-step episodes, episode limit 2), 2 seeds, 1,440
    env steps on 1 host × 4 envs (480 per iteration: 4 episodes end in each of the 3 iterations),
    warm-up 480, utd 0.05. The table is recomputed from metrics.csv, and so is every run's
    cumulative cost Σ episode/count × episode/cost and the figure's means over seeds."""
    import pandas as pd

    from saferl.cli import main

    task, out = "PointHazard-D1-v0", tmp_path / "bench"
    argv = ["benchmark", "offpolicy", "--algos", "cvpo,sac_lag", "--tasks", task, "--seeds", "2",
            "--steps", "1440", "--steps-per-iteration", "480", "--hosts", "1", "--envs", "4", "--warmup-steps", "480",
            "--out", str(out), "--parallel", "2", "--set", "cost_limit=2", "--set", "algo_params.utd=0.05",
            "--set", "logging.tensorboard=false"]
    assert main(argv) == 0
    capsys.readouterr()
    for name in ("benchmark.md", "summary.csv", "runs.csv", "curves.csv", f"curves_{task}.png", "benchmark.json",
                 "cumulative_cost.csv", "cumulative_cost_mean.csv", "cumulative_cost.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    settings = json.loads((out / "benchmark.json").read_text())
    assert all("algo_params.warmup_steps=480" in r["overrides"] for r in settings["runs"])

    table = (out / "benchmark.md").read_text()
    assert table.startswith("# Off-policy benchmark\n")
    assert f"## {task} (cost limit 2)\n\n| Algorithm | Reward | Cost |\n|---|---|---|\n" in table
    cells = {ln.split(" | ")[0][2:]: ln.strip("| ").split(" | ")[1:]
             for ln in table.splitlines() if ln.startswith("| ") and "Algorithm" not in ln}
    assert list(cells) == ["CVPO", "SACLag"]
    runs = list(csv.DictReader(open(out / "runs.csv")))
    summary = {r["algo"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    cumulative = list(csv.DictReader(open(out / "cumulative_cost.csv")))
    means = list(csv.DictReader(open(out / "cumulative_cost_mean.csv")))
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs)
    for algo, name in (("cvpo", "CVPO"), ("sac_lag", "SACLag")):
        finals, sums = [], {}
        for seed in (0, 1):
            (r,) = [r for r in runs if r["algo"] == algo and r["seed"] == str(seed)]
            assert Path(r["run_dir"]).name == f"{algo}-{task}-s{seed}"
            m = pd.read_csv(Path(r["run_dir"]) / "metrics.csv")
            assert len(m) == 3  # every iteration logged
            m = m.dropna(subset=["episode/return"])
            assert len(m) == 3 and int(r["n_points"]) == 3 and int(r["last_k"]) == 1  # 10% of 3, at least 1
            finals.append((m["episode/return"].iloc[-1], m["episode/cost"].iloc[-1]))
            # cumulative cost: Σ so far of (episodes finished) × (their mean cost)
            expect = (m["episode/count"] * m["episode/cost"]).cumsum().tolist()
            mine = sorted((float(c["env_steps"]), c) for c in cumulative
                          if c["algo"] == algo and c["seed"] == str(seed))
            assert [x for x, _ in mine] == m["env_steps"].astype(float).tolist()
            assert [int(c["episodes"]) for _, c in mine] == m["episode/count"].astype(int).tolist()
            assert all(int(c) >= 4 for c in m["episode/count"])  # 4 envs × one 120-step episode each
            for (_, c), e in zip(mine, expect):
                assert math.isclose(float(c["cumulative_cost"]), e, rel_tol=1e-9, abs_tol=1e-9)
            assert math.isclose(float(r["cumulative_cost"]), expect[-1], rel_tol=1e-9, abs_tol=1e-9)
            sums[seed] = dict(zip(m["env_steps"].astype(float), zip(expect, m["episode/return"])))
        assert_final_cells(summary[algo], cells[name], finals)
        # the figure's points: the mean over both seeds at every step both logged
        mine = [p for p in means if p["algo"] == algo]
        shared_steps = sorted(set(sums[0]) & set(sums[1]))
        assert [float(p["env_steps"]) for p in mine] == shared_steps and all(p["seeds"] == "2" for p in mine)
        for p, x in zip(mine, shared_steps):
            assert math.isclose(float(p["cumulative_cost"]), (sums[0][x][0] + sums[1][x][0]) / 2, abs_tol=1e-9)
            assert math.isclose(float(p["episode_return"]), (sums[0][x][1] + sums[1][x][1]) / 2, abs_tol=1e-9)
