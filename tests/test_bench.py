"""The benchmarks write their result files (numbers are measured by running them, not here)."""
from __future__ import annotations

import json

import pytest

from saferl.cli import main


def test_bench_rollout_and_gradients_write_results(ray_session, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "rollout", "--task", "FunctionEnv-v0", "--steps", "20", "--envs-per-host", "2",
                 "--hosts", "1", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "rollout.json").read_text())
    assert [r["env_hosts"] for r in rows] == [1, 2] and all(r["ray_steps_per_s"] > 0 for r in rows)
    assert main(["bench", "gradients", "--task", "FunctionEnv-v0", "--workers", "1", "2",
                 "--envs-per-worker", "4", "--windows", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "gradients.json").read_text())
    assert [(r["workers"], r["envs_per_worker"]) for r in rows] == [(1, 4), (2, 4)]
    assert "| workers |" in (out / "gradients.md").read_text()


def test_bench_e2e_learner_memory_write_results(ray_session, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "e2e", "--config", "ppo_lag/FunctionEnv-v0", "--steps", "4000", "--out", str(out)]) == 0
    [row] = json.loads((out / "e2e.json").read_text())
    assert row["env_steps"] == 4000 and row["iterations"] == 2 and row["steps_per_s"] > 0
    assert row["reference"]["steps"] == 4000 and row["reference"]["steps_per_s"] > 0
    assert {"s_per_100k_steps", "final_return", "final_cost", "learner_s"} <= set(row)
    assert set(row["peak_rss_mb"]) == {"learner", "env_host"}
    assert [p["env_steps"] for p in row["curve"]] == [2000, 4000] and row["curve"][-1]["return"] == row["final_return"]
    assert row["stepping_limit"]["steps"] == 2000 and row["stepping_limit"]["steps_per_s"] > 0
    assert row["of_limit"] == round(row["steps_per_s"] / row["stepping_limit"]["steps_per_s"], 3)
    shares = row["shares"]
    assert set(shares) == {"env", "inference", "learner", "ray_and_other"} and all(v >= 0 for v in shares.values())
    assert abs(sum(shares.values()) - 1) < 0.01 and shares["learner"] > 0  # alternating: the parts are the wall
    table = (out / "e2e.md").read_text()
    assert "one process, no Ray" in table and "stepping limit" in table and "Ray and other" in table

    assert main(["bench", "learner", "--algos", "ppo_lag/FunctionEnv-v0", "sac_lag/PointHazard-D1-v0",
                 "cgpo/FunctionEnv-v0", "--updates", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "learner.json").read_text())
    assert [r["algo"] for r in rows] == ["ppo_lag", "sac_lag", "cgpo"]
    assert all(r["samples_per_s"] > 0 and r["samples_per_update"] > 0 for r in rows)
    assert rows[0]["samples_per_update"] == 2000 and rows[2]["samples_per_update"] == 64 * 10

    # sac_lag brings the learner, env host and replay buffer; cgpo the gradient worker
    assert main(["bench", "memory", "--runs", "sac_lag/PointHazard-D1-v0", "cgpo/FunctionEnv-v0",
                 "--iterations", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "memory.json").read_text())
    assert {r["actor"] for r in rows} == {"learner", "env_host", "replay_buffer", "gradient_worker"}
    assert all(r["peak_rss_mb"] > 0 for r in rows)
    replay = [r for r in rows if r["actor"] == "replay_buffer"]
    assert replay[0]["replay_size"] > 0 and replay[0]["replay_capacity_mb"] > 0


@pytest.mark.slow  # the kills are covered by test_faults.py, the result files by the tests above
def test_bench_soak_survives_kills_and_evaluates(ray_session, tmp_path):
    out = tmp_path / "bench"
    # long enough for a kill on a fast machine: 12 iterations of 2,000 steps
    assert main(["bench", "soak", "--steps", "24000", "--kill-every", "1.5", "--episodes", "2", "--out", str(out)]) == 0
    [row] = json.loads((out / "soak.json").read_text())
    assert row["iterations"] == row["iterations_planned"] == 12 and row["env_steps"] == 24000
    assert row["kills_sent"] >= 1 and 1 <= row["restarts"] <= row["kills_sent"]
    assert row["metrics_rows_ok"] and row["checkpoint_iteration"] == 12
    assert row["checkpoint_restarts"] == row["restarts"] and row["eval_episodes"] == 2
    assert "| kill every s |" in (out / "soak.md").read_text()
    assert main(["bench", "soak", "--kill-every", "0", "--out", str(out)]) == 2  # one-line usage error


def test_bench_learner_reports_the_time_per_minibatch_step(tmp_path):
    """No Ray: an on-policy row carries s per update / (passes run × minibatches per pass)."""
    import math

    from saferl.config import load_config

    assert main(["bench", "learner", "--algos", "ppo_lag/FunctionEnv-v0", "--updates", "1",
                 "--set", "algo_params.minibatch_size=100", "--out", str(tmp_path)]) == 0
    [row] = json.loads((tmp_path / "learner.json").read_text())
    mb = load_config("ppo_lag/FunctionEnv-v0", ["algo_params.minibatch_size=100"]).learner_params().minibatch_size
    assert mb == 100 != load_config("ppo_lag/FunctionEnv-v0").learner_params().minibatch_size  # --set applied
    steps = row["epochs"][0] * math.ceil(row["samples_per_update"] / mb)
    assert row["ms_per_minibatch_step"] == pytest.approx(row["s_per_update"] * 1e3 / steps, rel=0.05)
    assert "ms per minibatch step" in (tmp_path / "learner.md").read_text()


def test_bench_learner_counts_the_update_arithmetic(tmp_path):
    """GFLOP per update counts the learner's own work: it doubles with the minibatch rows, and a
    critic lane on a second thread (invisible to the counter) is counted in the loop instead."""
    def row(algo, setting):
        out = tmp_path / setting
        assert main(["bench", "learner", "--algos", algo, "--updates", "1", "--set", setting, "--out", str(out)]) == 0
        [r] = json.loads((out / "learner.json").read_text())
        return r

    small = row("sac_lag/PointHazard-D1-v0", "algo_params.batch_size=64")
    large = row("sac_lag/PointHazard-D1-v0", "algo_params.batch_size=128")
    assert large["gflop_per_update"] == pytest.approx(2 * small["gflop_per_update"], rel=0.02)
    assert small["gflop_per_s"] == pytest.approx(small["gflop_per_update"] / small["s_per_update"], rel=0.05)
    assert small["matmul_gflop_per_s"] > 0 and small["matmul_shape"] == [64, 64, 64]
    serial = row("trpo_lag/FunctionEnv-v0", "algo_params.parallel_critics=off")
    threaded = row("trpo_lag/FunctionEnv-v0", "algo_params.parallel_critics=thread")
    assert threaded["gflop_per_update"] == serial["gflop_per_update"] > 0


def test_bench_device_runs_without_ray_and_reports_each_device(tmp_path):
    """`saferl bench device` in a fresh interpreter where importing Ray fails: learner rows on
    every device here (a spec from --specs stands in for the task's own), inference and
    gradient-worker windows; a bad --specs file is a one-line error."""
    import os
    import subprocess
    import sys

    from saferl.tools.bench_local import devices_here

    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"SafetyPointGoal1-v0": {"obs_dim": 5, "act_dim": 2, "act_low": [-1, -1],
                                                         "act_high": [1, 1], "max_episode_steps": 100}}))
    blocker = tmp_path / "noray"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('no Ray on this machine')\n")
    code = "import sys; from saferl.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "bench", "device", "--algos", "ppo_lag", "--updates", "1",
                          "--batches", "8", "--tasks", "FunctionEnv-v0", "--envs", "4", "--horizon", "4",
                          "--windows", "1", "--specs", str(specs), "--out", str(tmp_path / "dev")],
                         env={**os.environ, "PYTHONPATH": str(blocker)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "dev" / "device.json").read_text())
    devices = devices_here()
    assert [r["device"] for r in result["learner"]] == devices
    assert all(r["samples_per_s"] > 0 and r["task"] == "SafetyPointGoal1-v0" for r in result["learner"])
    assert [r["device"] for r in result["inference"]] == devices
    assert [(r["device"], r["envs"]) for r in result["worker_windows"]] == [(d, 4) for d in devices]
    specs.write_text("{not json")
    assert main(["bench", "learner", "--algos", "ppo_lag", "--specs", str(specs), "--out", str(tmp_path)]) == 2


def test_bench_e2e_match_refuses_before_running(tmp_path, capsys):
    out = tmp_path / "bench"
    # OmniSafe has no FunctionEnv, no CGPO; nothing runs and nothing is written
    assert main(["bench", "e2e", "--config", "ppo_lag/FunctionEnv-v0", "--match", "--out", str(out)]) == 2
    assert "--match: FunctionEnv-v0 is not a Safety-Gymnasium task" in capsys.readouterr().err
    assert main(["bench", "e2e", "--config", "cgpo/BraxReacher-v0", "--match", "--out", str(out)]) == 2
    assert "--match: OmniSafe 0.5 has no cgpo" in capsys.readouterr().err
    assert main(["bench", "e2e", "--match", "--reference-python", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert f"no reference interpreter at {tmp_path / 'none'}" in capsys.readouterr().err
    assert not out.exists()


def test_omnisafe_timing_reads_its_timers(tmp_path):
    from saferl.tools.bench import omnisafe_timing

    progress = tmp_path / "progress.csv"  # the columns OmniSafe's logger writes, two epochs
    progress.write_text("Train/Epoch,Time/Rollout,Time/Update,Time/Evaluate,Time/Epoch,TotalEnvSteps\n"
                        "0,10.0,30.0,2.0,42.5,2000\n1,12.0,34.0,2.0,48.5,4000\n")
    t = omnisafe_timing(progress, 4000)
    assert t == {"steps": 4000, "epochs": 2, "train_s": 87.0, "rollout_s": 22.0, "update_s": 64.0,
                 "steps_per_s": round(4000 / 87.0, 1)}
    progress.write_text("Time/Rollout,Time/Update,Time/Epoch\n10.0,30.0,40.5\n")  # on-policy: no Time/Evaluate
    assert omnisafe_timing(progress, 2000)["train_s"] == 40.5
