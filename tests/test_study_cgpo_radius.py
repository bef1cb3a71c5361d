"""`saferl study cgpo-radius` (CGPO Fig. 7 and Fig. 14): the variants' radius settings, one-line
usage errors, the radius statistics read back from metrics.csv, and a real tiny study whose
table is recomputed here from the runs' own metrics.csv."""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

import pytest

from saferl.tools.studies import cgpo_radius as study


def settings(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    study.add_arguments(p)
    return study._settings(p.parse_args(argv))


def test_variants_and_their_radius_settings(tmp_path):
    assert study.variant_keys(["fig7"]) == ["adaptive", "fixed-1e-4", "fixed-1e-3", "fixed-1e-2"]
    assert study.variant_keys(["eta2-0.9", "Adaptive", "beta-0.5-2"]) == ["adaptive", "beta-0.5-2", "eta2-0.9"]
    assert study.variant_keys(["all"]) == list(study.VARIANTS)
    s = settings(["--variants", "all", "--seeds", "0,2", "--steps", "4000", "--envs", "4", "--hosts", "1"])
    jobs = {(j["variant"], j["seed"]): j["cfg"] for j in study.plan(s, tmp_path)}
    assert len(jobs) == 2 * len(study.VARIANTS)
    radius = {k: c.learner_params().radius for k, c in jobs.items()}
    assert (radius["adaptive", 0].init, radius["adaptive", 0].lower, radius["adaptive", 0].upper) == (1e-3, 1e-4, 1e-2)
    for x in (1e-4, 1e-3, 1e-2):
        r = radius[f"fixed-{x:.0e}".replace("e-0", "e-"), 2]
        assert r.init == r.lower == r.upper == x
    assert radius["lower-1e-5", 0].lower == 1e-5 and radius["upper-1", 0].upper == 1.0
    assert (radius["beta-0.9-1.1", 0].beta1, radius["beta-0.9-1.1", 0].beta2) == (0.9, 1.1)
    assert radius["eta1-0.5", 0].eta1 == 0.5 and radius["eta2-0.5", 0].eta2 == 0.5
    cfg = jobs["adaptive", 2]
    assert cfg.total_env_steps == 4000 and cfg.resources.envs_per_host == 4 and cfg.schedule.log_every == 1
    assert study.plot_rows(list(study.VARIANTS))[0] == ["adaptive", "fixed-1e-4", "fixed-1e-3", "fixed-1e-2"]


def test_usage_errors_are_one_line(tmp_path, capsys):
    from saferl.cli import main

    out = tmp_path / "s"
    for argv, msg in ((["--variants", "adaptive,bogus"], "--variants 'bogus': unknown variant"),
                      (["--task", "Nope-v0"], "unknown task 'Nope-v0'"),
                      (["--steps", "0"], "--steps must be > 0"),
                      (["--task", "PointHazard-D1-v0"], "no shipped config configs/cgpo/PointHazard-D1-v0.yaml"),
                      (["--set", "algo_params.radius.init=1.0"], "algo_params.radius")):
        assert main(["study", "cgpo-radius", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert not out.exists()  # validated before anything is created


def test_radius_statistics_from_metrics(tmp_path):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["iteration", "env_steps", "cgpo/radius", "cgpo/reduction_ratio", "episode/return", "episode/cost"])
        w.writerows([[1, 10, 1e-3, 0.9, "", ""], [2, 20, 1.25e-3, "", "", ""], [3, 30, 1e-4, 1.1, 5.0, 9.0],
                     [3, 30, 1e-4, 1.0, 5.0, 9.0], [4, 40, 1e-4, 1.2, 6.0, 7.0]])  # iteration 3 logged twice (resume)
    assert study.read_radius(path)[1][2] != study.read_radius(path)[1][2]  # no ratio test: NaN
    assert [r[:2] for r in study.read_radius(path)] == [(10, 1e-3), (20, 1.25e-3), (30, 1e-4), (40, 1e-4)]
    job = {"variant": "adaptive", "label": "adaptive δ̂", "cfg": _cfg()}
    record, curve, radius = study.measure({"status": "ok", "run_dir": str(tmp_path), "seed": 0}, job, None)
    assert record["median_radius"] == pytest.approx(1e-4 * 5.5) and record["at_floor"] == 0.5
    assert record["median_rho"] == pytest.approx(1.0) and record["updates"] == 4
    assert (record["final_return"], record["final_cost"]) == (6.0, 7.0) and len(curve) == 2 and len(radius) == 4


def _cfg():
    from saferl.config import load_config

    return load_config("cgpo/FunctionEnv-v0", [])


@pytest.mark.slow
def test_a_tiny_study_end_to_end(ray_session, tmp_path, monkeypatch, capsys):
    """Two variants, 10 updates each: the table is the runs' own metrics.csv, recomputed here.
    (Slow: two Ray runs; the fast companions are the tests above.)"""
    from saferl.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "s"
    argv = ["study", "cgpo-radius", "--variants", "adaptive,fixed-1e-4", "--steps", "400", "--hosts", "1",
            "--envs", "4", "--out", str(out), "--set", "algo_params.critic_iterations=1"]
    assert main(argv) == 0
    runs = {r["variant"]: r for r in csv.DictReader(open(out / "runs.csv"))}
    assert set(runs) == {"adaptive", "fixed-1e-4"} and all(r["status"] == "ok" for r in runs.values())
    for _key, r in runs.items():
        metrics = list(csv.DictReader(open(Path(r["run_dir"]) / "metrics.csv")))
        assert len(metrics) == 10 and all(m["cgpo/reduction_ratio"] != "" for m in metrics)
        rads = [float(m["cgpo/radius"]) for m in metrics]
        assert float(r["median_radius"]) == pytest.approx(statistics.median(rads))
        rho = statistics.median(float(m["cgpo/reduction_ratio"]) for m in metrics)
        assert float(r["median_rho"]) == pytest.approx(rho) and math.isfinite(rho)
    assert {float(m) for m in [runs["fixed-1e-4"]["median_radius"]]} == {1e-4}
    assert float(runs["fixed-1e-4"]["at_floor"]) == 1.0
    table = (out / "radius.md").read_text()
    assert "| adaptive δ̂ |" in table and "| fixed δ̂ = 1e-4 |" in table
    assert (out / "radius.png").stat().st_size > 0 and (out / "curves.csv").is_file()
    assert main(argv) == 0  # re-run: finished runs are kept
    assert "finished earlier, kept" in capsys.readouterr().out
