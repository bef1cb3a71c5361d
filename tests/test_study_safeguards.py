"""`saferl study safeguards`: the metric definitions on hand-made curves, and a small real study."""
from __future__ import annotations

import csv

import numpy as np

from saferl.cluster.studies.safeguards import bootstrap_ci, smooth, steps_to_band


def test_steps_to_band_is_where_the_curve_stays_within_5_percent():
    x = [10, 20, 30, 40, 50, 60]
    r = [-500, -120, -104, -90, -101, -100]  # enters the band at 30, leaves at 40, stays from 50
    assert steps_to_band(x, r, 0.05) == 50
    assert steps_to_band(x, [-100, -100, -100], 0.05) == 10
    assert steps_to_band([], [], 0.05) is None


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 3, 5, 7], 2) == [1, 2, 4, 6]


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(-10, 2, 20).tolist(), rng.normal(-10, 2, 2000).tolist()
    lo, hi = bootstrap_ci(small)
    assert lo < np.mean(small) < hi
    lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 4  # ~1/sqrt(100) of the width
    assert bootstrap_ci([1.0]) is None


def test_safeguards_study_end_to_end(ray_session, tmp_path):
    """SHAC and PPO, unsafe and through the ray mask, one seed each, a few episodes: every output is
    written, safeguarded runs have zero violations and the unsafe SHAC run has some."""
    from saferl.cli import main

    out = tmp_path / "study"
    rc = main(["study", "safeguards", "--variants", "none,RM", "--algos", "shac,ppo", "--seeds", "1",
               "--budget", "shac=9600,ppo=9600", "--eval-episodes", "4", "--out", str(out)])
    assert rc == 0
    for name in ("table.md", "runs.csv", "curves.csv", "curves.png", "study.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs)
    for r in runs:
        if r["variant"] == "RM":
            assert float(r["train_violations"]) == 0 and float(r["eval_violations"]) == 0, r
    unsafe = [float(r["train_violations"]) for r in runs if r["variant"] == "none"]
    assert max(unsafe) > 0, "unsafe training should leave the RCI set at least once"
    text = (out / "table.md").read_text()
    assert "| RM | SHAC |" in text and "| none | PPO |" in text
    assert "Safeguarded runs with a violation: none." in text
