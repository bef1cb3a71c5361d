"""``saferl benchmark reference``: its plumbing with a fake reference (a script standing in for
OmniSafe, no network, no omnisafe) next to a tiny real saferl run; the 50-episode smoothing, the
final-value window and the arguments the reference gets, by hand."""
from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest

from saferl.tools.studies import reference

FAKE_DRIVER = textwrap.dedent('''
    """Stands in for reference_omnisafe.py: records its argv, writes a curve like OmniSafe's."""
    import argparse, csv, json, os, sys
    from pathlib import Path
    ap = argparse.ArgumentParser()
    for a in ("--algo", "--env", "--seed", "--total-steps", "--steps-per-epoch", "--threads", "--out"):
        ap.add_argument(a)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    (out / "argv.json").write_text(json.dumps(sys.argv[1:]))
    (out / "niceness.txt").write_text(str(os.nice(0)))
    epochs = int(args.total_steps) // int(args.steps_per_epoch)
    with open(out / "reference_curve.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["env_steps", "episode_return", "episode_cost", "lagrange_multiplier", "episode_length"])
        for e in range(1, epochs + 1):
            w.writerow([e * int(args.steps_per_epoch), 10.0 * e, 40.0 - 5 * e, 0.1 * e, 100])
    (out / "reference_done.json").write_text(json.dumps({  # what the real driver records
        "algo": args.algo, "env": args.env, "seed": int(args.seed), "total_steps": int(args.total_steps),
        "steps_per_epoch": int(args.steps_per_epoch), "set": args.set, "wall_s": 1.5}))
''')


def test_windowed_is_the_running_mean_of_the_last_episodes():
    # (steps, episodes, mean return, mean cost): window 3 over iterations of 2, 2 and 1 episodes
    pts = [(10, 2, 1.0, 10.0), (20, 2, 4.0, 40.0), (30, 1, 7.0, 70.0)]
    got = reference.windowed(pts, window=3)
    assert got[0] == (10, 1.0, 10.0)  # fewer episodes than the window: all of them
    assert got[1] == pytest.approx((20, (1.0 + 2 * 4.0) / 3, (10.0 + 80.0) / 3))  # one of the first two, both new
    assert got[2] == pytest.approx((30, (2 * 4.0 + 7.0) / 3, (80.0 + 70.0) / 3))


def test_final_values_average_the_last_steps():
    curve = [{"env_steps": s, "episode_return": r, "episode_cost": c, "lagrange_multiplier": lam}
             for s, r, c, lam in ((1, 1.0, 9.0, None), (2, 2.0, 8.0, 0.5), (3, 4.0, 6.0, 1.5))]
    f = reference.final_values(curve, final_steps=2)
    assert (f["return"], f["cost"], f["lambda"], f["points"]) == (3.0, 7.0, 1.0, 2)
    assert reference.final_values([], 5)["return"] is None


def test_reference_gets_the_same_task_seed_budget_and_limit(tmp_path):
    s = {"reference_algo": "PPOLag", "task": "SafetyPointGoal1-v0", "seed": 3, "steps": 600000,
         "steps_per_iteration": 20000, "threads": 2, "algo": "ppo_lag", "cost_limit": 25.0,
         "reference_set": ["algo_cfgs.update_iters=10"]}
    argv = reference.reference_argv("PY", "DRIVER", s, tmp_path)
    assert argv == ["PY", "DRIVER", "--algo", "PPOLag", "--env", "SafetyPointGoal1-v0", "--seed", "3",
                    "--total-steps", "600000", "--steps-per-epoch", "20000", "--threads", "2", "--out", str(tmp_path),
                    "--set", "lagrange_cfgs.cost_limit=25.0", "--set", "algo_cfgs.update_iters=10"]
    assert "--set" not in reference.reference_argv("PY", "D", {**s, "algo": "ppo", "reference_set": []}, tmp_path)


def test_missing_reference_interpreter_is_a_one_line_error(tmp_path, capsys):
    from saferl.cli import main

    rc = main(["benchmark", "reference", "--task", "FunctionEnv-v0", "--steps", "4000",
               "--venv", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--install" in err and "nowhere" in err and len(err.strip().splitlines()) == 1, err


def fake_comparison_argv(tmp_path, monkeypatch, *extra: str) -> list[str]:
    """``saferl benchmark reference`` of a 2-iteration PPO-Lag run on FunctionEnv, with the fake
    reference driver standing in for OmniSafe."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    driver = tmp_path / "fake_driver.py"
    driver.write_text(FAKE_DRIVER)
    return ["benchmark", "reference", "--algo", "ppo_lag", "--task", "FunctionEnv-v0", "--steps", "4000",
            "--steps-per-iteration", "2000", "--hosts", "1", "--envs", "4", "--final-steps", "2000",
            "--reference-python", sys.executable, "--reference-driver", str(driver), "--set", "algo_params.epochs=2",
            *extra]


def test_side_by_side_run_with_a_fake_reference(ray_session, tmp_path, monkeypatch):
    """A real 2-iteration saferl PPO-Lag run on FunctionEnv next to the fake reference: one table,
    one curve file holding both, one plot; a second call keeps both runs."""
    from saferl.cli import main

    out = tmp_path / "cmp"
    argv = fake_comparison_argv(tmp_path, monkeypatch, "--seed", "1", "--out", str(out))
    assert main(argv) == 0
    sent = json.loads((out / "reference" / "argv.json").read_text())
    assert sent[sent.index("--env") + 1] == "FunctionEnv-v0" and sent[sent.index("--seed") + 1] == "1"
    assert sent[sent.index("--total-steps") + 1] == "4000" and sent[sent.index("--steps-per-epoch") + 1] == "2000"
    assert "lagrange_cfgs.cost_limit=8.0" in sent  # the registry's limit, on both sides
    # the reference competes for the cores at the niceness of saferl's Ray workers
    import os
    expected = min(19, os.nice(0) + reference.ray_worker_niceness())
    assert int((out / "reference" / "niceness.txt").read_text()) == expected
    with open(out / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by = {src: [r for r in rows if r["source"] == src] for src in ("saferl", "omnisafe")}
    assert [float(r["env_steps"]) for r in by["omnisafe"]] == [2000.0, 4000.0]
    assert [float(r["env_steps"]) for r in by["saferl"]] == [2000.0, 4000.0]
    assert all(r["lagrange_multiplier"] != "" for r in by["saferl"])
    table = (out / "comparison.md").read_text()
    assert "| saferl ppo_lag |" in table and "| OmniSafe PPOLag | 20.00 | 30.00 | 0.200 | 4,000 | 2 |" in table
    assert (out / "comparison.png").stat().st_size > 10_000
    settings = json.loads((out / "reference.json").read_text())
    assert (settings["steps"], settings["iterations"], settings["cost_limit"]) == (4000, 2, 8.0)
    # again with the same --out: both kept, nothing retrained, the outputs rebuilt
    (out / "reference" / "argv.json").unlink()
    assert main(argv) == 0
    assert not (out / "reference" / "argv.json").exists() and (out / "comparison.md").read_text() == table


def test_lr_decay_spans_the_runs_iterations(tmp_path):
    """PPO-Lag's Safety-Gym config decays the policy lr (OmniSafe's linear_lr_decay): the comparison
    sets the decay horizon to its own iterations, as OmniSafe's spans its total_steps."""
    import argparse

    p = argparse.ArgumentParser()
    reference.add_arguments(p)
    args = p.parse_args(["--steps", "100000"])
    s = reference.settings(args)
    assert (s["iterations"], s["steps_per_iteration"], s["lr_decay"]) == (5, 20000, True)
    job = reference.saferl_job(s, tmp_path)
    assert job["cfg"].learner_params().lr_decay_updates == 5 and job["cfg"].total_env_steps == 100000


def test_reference_from_reuses_only_the_same_experiment(tmp_path):
    """--reference-from copies an earlier comparison's finished reference when algorithm, task,
    seed, steps and OmniSafe overrides agree, and refuses in one line naming what differs."""
    from saferl.config import ConfigError

    s = {"reference_algo": "PPOLag", "task": "SafetyPointGoal1-v0", "seed": 1, "steps": 40000,
         "steps_per_iteration": 20000, "algo": "ppo_lag", "cost_limit": 25.0, "reference_set": []}
    earlier = tmp_path / "earlier" / "reference"
    earlier.mkdir(parents=True)
    meta = {"algo": "PPOLag", "env": "SafetyPointGoal1-v0", "seed": 1, "total_steps": 40000, "steps_per_epoch": 20000,
            "set": ["lagrange_cfgs.cost_limit=25.0"], "wall_s": 9.0}
    (earlier / "reference_done.json").write_text(json.dumps(meta))
    (earlier / "reference_curve.csv").write_text("env_steps,episode_return,episode_cost\n20000,1,2\n")
    here = tmp_path / "here"
    here.mkdir()
    reference.reuse_reference(tmp_path / "earlier", here, s)
    assert (here / "reference_curve.csv").read_text() == (earlier / "reference_curve.csv").read_text()
    assert json.loads((here / "reference_done.json").read_text()) == meta
    for other, what in (({**s, "seed": 2}, "seed 1 there, 2 here"),
                        ({**s, "cost_limit": 10.0}, "set"),
                        ({**s, "reference_set": ["algo_cfgs.update_iters=10"]}, "set")):
        with pytest.raises(ConfigError, match=what):
            reference.reuse_reference(earlier, tmp_path, other)
    (earlier / "reference_done.json").unlink()
    with pytest.raises(ConfigError, match="no finished reference run"):
        reference.reuse_reference(earlier, tmp_path, s)


def test_the_reference_install_recipe_points_at_files_that_exist():
    """``--install`` builds OmniSafe's interpreter from the checkout's Safety-Gymnasium pins, and
    the driver loads the task shims from the checkout's envs/."""
    from saferl.tools.studies import reference, reference_omnisafe

    steps = reference.install_steps(Path("/nonexistent/venv"))
    requirement_files = [Path(a) for step in steps for a in step if a.endswith(".txt")]
    assert requirement_files and all(f.is_file() for f in requirement_files), requirement_files
    assert (reference_omnisafe.SAFERL_ENVS / "safety_gym.py").is_file()


def test_across_seeds_gives_each_seed_then_mean_and_sample_std():
    f = lambda r, c, lam: {"return": r, "cost": c, "lambda": lam}  # noqa: E731
    rows = reference.across_seeds({0: {"saferl": f(10.0, 40.0, 0.5), "omnisafe": f(12.0, 30.0, None)},
                                   1: {"saferl": f(14.0, 20.0, 0.7), "omnisafe": f(16.0, 50.0, None)}})
    by = {(r["source"], r["seed"]): r for r in rows}
    assert by["saferl", "mean"]["return"] == 12.0 and by["saferl", "std"]["return"] == pytest.approx(8 ** 0.5)
    assert by["omnisafe", "mean"]["cost"] == 40.0 and by["omnisafe", "std"]["lambda"] is None
    assert [r["seed"] for r in rows if r["source"] == "saferl"] == [0, 1, "mean", "std"]
    one = reference.across_seeds({3: {"saferl": f(1.0, 2.0, 0.1), "omnisafe": f(1.0, 2.0, 0.1)}})
    assert [r["std"] if "std" in r else r["return"] for r in one if r["seed"] == "std"] == [None, None]


@pytest.mark.parametrize("text", ["", "0,x", "1,1", "-1"])
def test_bad_seeds_are_a_one_line_error(text):
    from saferl.config import ConfigError

    with pytest.raises(ConfigError, match="--seeds"):
        reference.parse_seeds(text)


def test_seeds_run_one_comparison_each_and_one_table(ray_session, tmp_path, monkeypatch):
    """``--seeds 0,1``: each seed's comparison in OUT/seed<N> (the reference got that seed), then
    seeds.md / seeds.csv / seeds.png across them; --reference-from reuses DIR/seed<N>."""
    from saferl.cli import main

    out = tmp_path / "cmp"
    argv = fake_comparison_argv(tmp_path, monkeypatch, "--seeds", "0,1")
    assert main([*argv, "--out", str(out)]) == 0
    for seed in (0, 1):
        sent = json.loads((out / f"seed{seed}" / "reference" / "argv.json").read_text())
        assert sent[sent.index("--seed") + 1] == str(seed)
        assert json.loads((out / f"seed{seed}" / "reference.json").read_text())["seed"] == seed
    with open(out / "seeds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["source"], r["seed"]) for r in rows] == [
        (src, k) for src in ("saferl", "omnisafe") for k in ("0", "1", "mean", "std")]
    omni = {r["seed"]: r for r in rows if r["source"] == "omnisafe"}
    assert float(omni["mean"]["return"]) == 20.0 and float(omni["std"]["return"]) == 0.0  # the fake is seed-free
    saferl = {r["seed"]: r for r in rows if r["source"] == "saferl"}
    assert saferl["0"]["return"] != saferl["1"]["return"]  # two seeds, two runs
    assert "| OmniSafe PPOLag | mean | 20.00 | 30.00 | 0.200 |" in (out / "seeds.md").read_text()
    assert (out / "seeds.png").stat().st_size > 10_000
    again = tmp_path / "again"
    assert main([*argv, "--out", str(again), "--reference-from", str(out)]) == 0
    assert (again / "seed1" / "reference" / "reference_curve.csv").read_text() == (
        out / "seed1" / "reference" / "reference_curve.csv").read_text()


def test_the_lambda_panel_is_drawn_only_for_curves_with_a_multiplier():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    point = {"env_steps": 1.0, "episode_return": 1.0, "episode_cost": 0.0, "lagrange_multiplier": None}
    for lam, n in ((None, 2), (0.5, 3)):
        fig, axes = reference._panels(plt, [[point], [{**point, "lagrange_multiplier": lam}]])
        assert len(axes) == n
        plt.close(fig)
