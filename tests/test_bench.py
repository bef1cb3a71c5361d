"""The benchmarks write their result files (numbers are measured by running them, not here)."""
from __future__ import annotations

import json

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
