"""`saferl study cgpo-gradients` (CGPO Fig. 10 and Fig. 6): the arms' configs, one-line usage
errors, the table / CSV / plot writer on synthetic runs (numbers recomputed here by hand), and a
real tiny study end to end."""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
from pathlib import Path

import pytest

from saferl.tools.studies import cgpo_gradients as study


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    study.add_arguments(p)
    return p.parse_args(argv)


def test_arms_and_their_configs(tmp_path):
    assert study.arm_keys(["fig10"]) == ["fobg", "zobg"]
    assert study.arm_keys(["zobg-nd", "FIG10"]) == ["fobg", "zobg", "zobg-nd"]
    assert study.arm_keys(["all"]) == list(study.ARMS)
    s = study._settings(parse(["--seeds", "0,3", "--steps", "4000", "--hosts", "2", "--envs", "4"]))
    jobs = {(j["arm"], j["seed"]): j for j in study.plan(s, tmp_path)}
    assert len(jobs) == 2 * len(study.ARMS)
    want = {"fobg": ("cgpo", "FunctionEnv-v0", "fobg"), "zobg": ("cgpo", "FunctionEnv-v0", "zobg"),
            "mb-cgpo": ("mb_cgpo", "FunctionEnvFloor-v0", "fobg"), "zobg-nd": ("cgpo", "FunctionEnvFloor-v0", "zobg")}
    for (arm, seed), job in jobs.items():
        cfg = job["cfg"]
        assert (cfg.algo, cfg.task, cfg.learner_params().gradient_estimator) == want[arm]
        assert (cfg.total_env_steps, cfg.resources.num_env_hosts, cfg.resources.envs_per_host) == (4000, 2, 4)
        assert cfg.seed == seed and cfg.schedule.log_every == 1
    # study.json's command reproduces the settings
    cmd = shlex.split(study.command(s, tmp_path))
    assert cmd[:3] == ["saferl", "study", "cgpo-gradients"]
    assert study._settings(parse(cmd[3:])) == s


def test_usage_errors_are_one_line(tmp_path, capsys):
    from saferl.cli import main

    out = tmp_path / "s"
    for argv, msg in ((["--arms", "fobg,bogus"], "--arms 'bogus': unknown arm"),
                      (["--nd-task", "Nope-v0"], "--nd-task: unknown task 'Nope-v0'"),
                      (["--steps", "0"], "--steps must be > 0"),
                      (["--task", "FunctionEnvFloor-v0", "--arms", "fobg"], "not differentiable"),
                      (["--nd-task", "FunctionEnv-v0", "--arms", "mb-cgpo"],
                       "no shipped config configs/mb_cgpo/FunctionEnv-v0.yaml"),
                      (["--set", "algo_params.gradient_estimator=sobg"], "algo_params.gradient_estimator")):
        assert main(["study", "cgpo-gradients", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert not out.exists()  # validated before anything is created


# synthetic runs: 10 episode rows each, x = 1000 (i + 1), budget 10,000 (Conv. Steps window 1,000)
FLAT = [20, 18, 16, 14, 12, 8, 8, 8, 8, 8]  # settles at the limit 8 from the 6th point
FALLING = [20, 19, 18, 17, 16, 15, 14, 13, 12, 11]  # never reaches the limit
RATES = {"fobg": [1, 1, 1, 1, 1, 0, 0, 0.5, 0, 0], "zobg": [1] * 10}


def write_metrics(path: Path, values: list[float], rates: list[float], rhos: list[float]) -> None:
    path.mkdir(parents=True)
    with open(path / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["iteration", "env_steps", "episode/return", "episode/cost", "episode/violation_rate",
                    "episode/count", "cgpo/radius", "cgpo/reduction_ratio"])
        for i, (v, r, rho) in enumerate(zip(values, rates, rhos)):
            w.writerow([i + 1, 1000 * (i + 1), v, v, r, 32, 1e-3, rho])


def test_table_csv_and_plot_on_synthetic_runs(tmp_path):
    s = study._settings(parse(["--arms", "fig10", "--seeds", "2", "--steps", "10000"]))
    rhos = {"fobg": [1.0, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0, 0.98, 1.02, 1.0],
            "zobg": [0.2, -0.5, 0.4, 0.1, -1.0, 0.3, 0.0, 0.5, -0.2, 0.1]}
    records, curves, rho_rows = [], [], []
    for arm in ("fobg", "zobg"):
        for seed in (0, 1):
            values = [v + seed for v in (FLAT if arm == "fobg" else FALLING)]  # seed 1: one above
            run_dir = tmp_path / f"{arm}-s{seed}"
            write_metrics(run_dir, values, RATES[arm], rhos[arm])
            record = {"status": "ok", "run_dir": str(run_dir), "seed": seed, "task": "FunctionEnv-v0", "algo": "cgpo",
                      "cost_limit": 8.0, "total_env_steps": 10_000, "num_envs": 32}
            record, curve, rho = study.measure(record, {"arm": arm, "label": study.ARMS[arm][0], "figure": "10"}, None)
            records.append(record)
            curves += curve
            rho_rows += rho
    study.write_outputs(tmp_path, records, s)
    study.plot(tmp_path, curves, rho_rows, records, s)
    assert (tmp_path / "gradients.png").stat().st_size > 0
    summary = {r["arm"]: r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    fobg, zobg = summary["fobg"], summary["zobg"]
    # final = the last point (10% of 10); over seeds 8 and 9
    assert float(fobg["final_return_mean"]) == 8.5 and float(fobg["final_cost_std"]) == pytest.approx(0.5 ** 0.5)
    assert float(zobg["final_cost_mean"]) == 11.5
    # violation share = violating / finished episodes: 5.5 of 10 rows of 32 for FoBG
    assert float(fobg["violation_share_mean"]) == pytest.approx(0.55) and float(zobg["violation_share_mean"]) == 1.0
    # Conv. Steps: seed 0 settles at 8 ≤ b + 5% from x = 6,000; seed 1 at 9 never meets the constraint
    runs = {(r["arm"], int(r["seed"])): r for r in csv.DictReader(open(tmp_path / "runs.csv"))}
    assert float(runs["fobg", 0]["conv_steps"]) == 6000 and runs["fobg", 1]["conv_steps"] == ""
    assert float(fobg["conv_steps_mean"]) == 6000 and zobg["conv_steps_mean"] == ""
    # Vio. Ratio: seed 0's updates starting at 8 end at 8 (0%); seed 1's start at 9 and end at 9 > 8.4 (100%)
    assert float(runs["fobg", 0]["vio_ratio"]) == 0.0 and float(runs["fobg", 1]["vio_ratio"]) == 100.0
    # update efficiency: ρ's median and IQR
    assert float(fobg["median_rho_mean"]) == pytest.approx(statistics.median(rhos["fobg"]))
    q = statistics.quantiles(rhos["zobg"], n=4, method="inclusive")
    assert float(zobg["rho_iqr_mean"]) == pytest.approx(q[2] - q[0])
    table = (tmp_path / "gradients.md").read_text()
    assert "| 10 | CGPO (FoBG) | FunctionEnv-v0 | 8.50 ± 0.71 | 8.50 ± 0.71 (8) | 55% ± 0% |" in table
    assert "| 10 | CGPO-ZoBG | FunctionEnv-v0 | 11.50 ± 0.71 |" in table and "| 6.00e+03 (1/2) |" not in table
    assert "| 6e+03 (1/2) |" in table


@pytest.mark.slow
def test_a_tiny_study_end_to_end(ray_session, tmp_path, monkeypatch):
    """Every arm, one seed, 10 updates of 8 envs (one episode): the outputs exist and the table's
    ρ is the runs' own metrics.csv, recomputed here. (Slow: four Ray runs; the fast companions
    are the tests above.)"""
    from saferl.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "s"
    argv = ["study", "cgpo-gradients", "--seeds", "1", "--steps", "800", "--envs", "8", "--out", str(out),
            "--set", "algo_params.critic_iterations=1"]
    assert main(argv) == 0
    runs = {r["arm"]: r for r in csv.DictReader(open(out / "runs.csv"))}
    assert set(runs) == set(study.ARMS) and all(r["status"] == "ok" for r in runs.values())
    for r in runs.values():
        metrics = list(csv.DictReader(open(Path(r["run_dir"]) / "metrics.csv")))
        assert len(metrics) == 10
        rho = statistics.median(float(m["cgpo/reduction_ratio"]) for m in metrics)
        assert math.isfinite(rho) and float(r["median_rho"]) == pytest.approx(rho)
    assert json.loads((out / "study.json").read_text())["command"].startswith("saferl study cgpo-gradients")
    for name in ("gradients.md", "gradients.png", "curves.csv", "summary.csv"):
        assert (out / name).stat().st_size > 0, name
