"""``saferl submit`` / ``status`` / ``logs`` against a real Ray head started by this test.

The head runs in its own process group on loopback with its own ports and temp dir, so it is
independent of the in-process ``ray.init`` of conftest's ``ray_session`` and of any other Ray on
the machine. It is stopped by signalling *its* ``ray start --block`` process (and then killing
any of its descendants that remain), never with ``ray stop``, which would stop every Ray
cluster on the machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from saferl.cli import main
from saferl.cluster import jobs
from saferl.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
CONFIG = "configs/ppo_lag/FunctionEnv-v0.yaml"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the head's ``ray start --block`` (it shuts its node down), then kill leftovers."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture
def ray_head(monkeypatch):
    """The dashboard address of a fresh local Ray head."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray puts sockets in it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is ours
    # A local head turns on token authentication when ~/.ray/auth_token exists (Ray >= 2.5x's
    # default), and the Jobs client would then need that token. This loopback-only test cluster
    # opts out, as the warning Ray prints suggests: RAY_AUTH_MODE=disabled.
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           "--num-cpus=2", f"--object-store-memory={200 * 2**20}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 60
        while True:  # up when the Jobs API answers (an unknown job id is its "hello")
            try:
                jobs.status(address, "raysubmit_none")
            except ConfigError as err:
                if "no job" in str(err):
                    break
            assert proc.poll() is None, (Path(temp_dir) / "ray_start.log").read_text()
            assert time.monotonic() < deadline, "Ray head did not come up in 60 s"
            time.sleep(0.5)
        yield address
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_runs_a_tiny_training_job(ray_head, tmp_path, capsys):
    run_root = tmp_path / "runs"
    overrides = ["total_env_steps=4000", f"run_root={run_root}", "name=submitted"]
    job_id = jobs.submit(ray_head, CONFIG, overrides)

    deadline = time.monotonic() + 180
    while (line := jobs.status(ray_head, job_id)).split()[1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job still not finished after 180 s: {line}"
        time.sleep(1)
    assert line == f"{job_id}: SUCCEEDED", line + "\n" + jobs.logs(ray_head, job_id)

    capsys.readouterr()
    assert main(["status", job_id, "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    run = run_root / "submitted"
    assert (run / "metrics.csv").is_file()
    assert list((run / "checkpoints").glob("ckpt_*.pt")), sorted(p.name for p in run.rglob("*"))


def test_unreachable_cluster_is_one_line(capsys):
    assert main(["status", "x", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err == "cluster error: cannot reach Ray at http://127.0.0.1:9 (connection refused)\n"


def test_config_outside_the_repo_is_refused(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / CONFIG).read_text())
    with pytest.raises(ConfigError, match="not uploaded with the job"):
        jobs.submit("http://127.0.0.1:9", str(outside), [])
