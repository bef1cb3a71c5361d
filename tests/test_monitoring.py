"""Live monitoring (issue #7): the metrics every run streams, Ray Gauges exported for
Prometheus, ``saferl dashboard`` (TensorBoard over HTTP) and the job status's metrics line.

This module runs its own in-process Ray started with a known metrics export port (conftest's
shared ``ray_session`` has none): any Ray already up in this process is shut down first and the
shared one is started again afterwards.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from saferl.cluster import jobs
from saferl.cluster.metrics import RAY_GAUGES, MetricsLogger, dashboard_spec
from saferl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
RUN = "live"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def metrics_port():
    """An in-process Ray whose metrics agent exports Prometheus text on a known port."""
    import ray

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=4, logging_level="error", include_dashboard=False, _metrics_export_port=port,
                 _system_config={"metrics_report_interval_ms": 1000})  # default 10 s
        try:
            yield port
        finally:
            ray.shutdown()
            if was_up:  # as conftest's ray_session started it
                ray.init(num_cpus=4, logging_level="error", include_dashboard=False)


@pytest.fixture(scope="module")
def tiny_run(metrics_port, tmp_path_factory):
    from saferl.cluster.session import train

    cfg = load_config("ppo_lag/FunctionEnv-v0", [
        "total_env_steps=4000", f"run_root={tmp_path_factory.mktemp('runs')}", f"name={RUN}"])
    return train(cfg)


def test_every_row_has_limit_health_and_learner_rate(tiny_run):
    m = pd.read_csv(tiny_run / "metrics.csv")
    assert list(m["env_steps"]) == [2000, 4000]
    assert (m["cost_limit"] == 8.0).all()  # FunctionEnv-v0's registered limit
    assert (m["health/actors"] == 2).all() and (m["health/actors_alive"] == 2).all()  # host + learner
    assert (m["learner/updates"] == 1).all() and (m["time/learner_s"] > 0).all()
    assert (m["time/learner_updates_per_s"] > 0).all() and (m["time/env_steps_per_s"] > 0).all()
    assert m["episode/violation_rate"].between(0, 1).all()
    for key in ("episode/return", "episode/cost", "lagrange_multiplier", "kl", "loss_pi", "loss_v"):
        assert m[key].notna().all(), key


def _gauges(text: str) -> dict[str, float]:
    """``{gauge name: value}`` of the samples tagged with this module's run."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_saferl_\w+)\{(.*)\} (\S+)$", line)
        if m and f'run="{RUN}"' in m.group(2):
            assert 'algo="ppo_lag"' in m.group(2) and 'task="FunctionEnv-v0"' in m.group(2), line
            out[m.group(1)] = float(m.group(3))
    return out


def test_ray_gauges_reach_the_prometheus_export(tiny_run, metrics_port):
    want = {f"ray_{name}" for name in RAY_GAUGES.values()}
    deadline, found = time.monotonic() + 30, {}
    while time.monotonic() < deadline:  # the export lags the driver by a report interval or two
        found = _gauges(_get(f"http://127.0.0.1:{metrics_port}/metrics"))
        if want <= set(found) and found["ray_saferl_env_steps"] == 4000:  # the last row's values
            break
        time.sleep(1)
    assert want <= set(found), sorted(want - set(found))
    assert found["ray_saferl_cost_limit"] == 8.0
    assert found["ray_saferl_env_steps"] == 4000 and found["ray_saferl_iteration"] == 2
    assert found["ray_saferl_actors_alive"] == 2
    assert 0 <= found["ray_saferl_violation_rate"] <= 1 and found["ray_saferl_env_steps_per_s"] > 0


def test_ray_metrics_sink_follows_the_config(metrics_port, tmp_path):
    over = ["logging.tensorboard=false", "logging.csv=false"]
    on = MetricsLogger(tmp_path / "on", load_config("ppo_lag/FunctionEnv-v0", over))
    off = MetricsLogger(tmp_path / "off", load_config("ppo_lag/FunctionEnv-v0", over + ["logging.ray_metrics=false"]))
    assert on.ray is not None and off.ray is None


def test_dashboard_serves_the_run_over_http(tiny_run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saferl.cli", "dashboard", str(tiny_run), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once TensorBoard listens
        assert line.startswith(f"TensorBoard at http://127.0.0.1:{port}/"), line + proc.stderr.read()
        url = line.split()[2]
        deadline, tags = time.monotonic() + 30, {}
        while time.monotonic() < deadline:  # TensorBoard loads the event files in the background
            tags = json.loads(_get(url + "data/plugin/scalars/tags"))
            if any("episode/return" in t for t in tags.values()):
                break
            time.sleep(0.5)
        runs = json.loads(_get(url + "data/runs"))
        assert [r.split("/")[0] for r in runs] == [RUN], runs
        assert {"episode/return", "cost_limit", "health/actors_alive"} <= set(tags[runs[0]]), tags
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0 and "dashboard stopped" in proc.stderr.read()


def test_dashboard_names_runs_uniquely_and_refuses_non_runs(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "run" / "tb").mkdir(parents=True)
    spec = dashboard_spec([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    assert spec == f"run:{tmp_path}/a/run/tb,b_run:{tmp_path}/b/run/tb"
    with pytest.raises(ConfigError, match="is not a run directory"):
        dashboard_spec([tmp_path])


def test_latest_metrics_is_the_last_progress_line(monkeypatch):
    log = ("resuming x\nit 1/3 | steps 2,000 | return 1 | cost 2 (limit 8) | λ 0.1 | steps/s 400\n"
           "(LearnerActor pid=1) warning\nit 2/3 | steps 4,000 | return 3 | cost 4 (limit 8) | λ 0.2\n"
           "done: results in runs/x\n")
    monkeypatch.setattr(jobs, "logs", lambda address, job_id: log)
    assert jobs.latest_metrics("addr", "job") == "it 2/3 | steps 4,000 | return 3 | cost 4 (limit 8) | λ 0.2"
    monkeypatch.setattr(jobs, "logs", lambda address, job_id: "starting\n")
    assert jobs.latest_metrics("addr", "job") is None
