"""`make run`'s job (configs/quickstart.yaml): progress lines with an ETA, the run's report and
curves at the end, and (slow) the whole run ending with the cost under its limit and the return
risen."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from saferl.cli import main
from saferl.cluster.metrics import clock, eta
from saferl.config import load_config


def test_clock_and_eta():
    assert [clock(s) for s in (7.4, 187, 7500)] == ["7s", "3m07s", "2h05m"]
    assert eta(30.0, 3, 6) == "elapsed 30s | ETA 1m00s"  # 10 s per item so far, 6 items left
    assert eta(30.0, 0, 6) == "elapsed 30s"  # nothing done yet: no estimate
    assert eta(30.0, 3, 0) == "elapsed 30s"  # finished


def test_quickstart_config_is_the_point_hazard_task_at_a_budget_of_five_hazard_steps():
    cfg = load_config("quickstart")
    assert (cfg.algo, cfg.task, cfg.limit) == ("ppo_lag", "PointHazard-D1-v0", 5.0)


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("episode/cost")]


def test_train_prints_eta_and_leaves_report_and_curves(ray_session, run_root, capsys):
    assert main(["train", "quickstart", "--set", "total_env_steps=14400", "--set", f"run_root={run_root}",
                 "--set", "logging.tensorboard=false", "--set", "logging.ray_metrics=false"]) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("it ")]
    assert len(progress) == 3 and "| ETA " in progress[0] and "| elapsed " in progress[-1]
    assert "ETA" not in progress[-1]  # nothing left
    (run,) = Path(run_root).iterdir()
    assert f"report: {run}/report.html  curves: {run}/curves.png" in out
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PointHazard-D1-v0" in (run / "report.html").read_text()
    assert len(_rows(run)) == 3


@pytest.mark.slow
def test_quickstart_brings_the_cost_under_its_limit_while_the_return_rises(ray_session, run_root):
    assert main(["train", "quickstart", "--no-report", "--set", f"run_root={run_root}"]) == 0
    (run,) = Path(run_root).iterdir()
    rows = _rows(run)
    cost = [float(r["episode/cost"]) for r in rows]
    ret = [float(r["episode/return"]) for r in rows]
    assert max(cost) > 2 * 5.0  # the constraint was active: the cost first rose past the limit ...
    assert sum(cost[-5:]) / 5 <= 5.0  # ... and ends under it
    assert sum(ret[-5:]) / 5 > sum(ret[:3]) / 3 + 100  # while the return rose (-206 -> -37 measured)
    assert not (run / "report.html").exists()  # --no-report


def test_studies_print_runs_done_with_an_eta_that_ignores_kept_runs(tmp_path, monkeypatch):
    """After each run a study prints "k/n runs done | elapsed … | ETA …"; runs finished by an
    earlier invocation (kept) take no time, so the ETA is estimated from the trained runs only."""
    from types import SimpleNamespace

    from saferl.tools.studies import runner

    clock_now = iter([0.0, 0.0, 100.0, 200.0])  # t0, after the kept run, after each trained run
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock_now))
    statuses = iter(["ok (kept)", "ok", "ok"])
    monkeypatch.setattr(runner, "train_one", lambda job, console, tag: {"status": next(statuses)})
    monkeypatch.setattr(runner, "start_ray", lambda cfgs, args: False)
    lines = []
    console = SimpleNamespace(print=lambda text: lines.append(text))
    jobs = [{"cfg": SimpleNamespace(run_root=str(tmp_path)), "name": f"r{i}"} for i in range(3)]
    runner.run_jobs(jobs, SimpleNamespace(parallel=1), console, lambda record, tag: None)
    assert lines == ["1/3 runs done | elapsed 0s", "2/3 runs done | elapsed 1m40s | ETA 1m40s",
                     "3/3 runs done | elapsed 3m20s"]
