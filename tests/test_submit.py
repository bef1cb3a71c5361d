"""``saferl submit`` / ``status`` / ``logs`` / ``stop`` against a real Ray head started by this test.

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


@pytest.fixture(scope="module")
def ray_head():
    """The dashboard address of a local Ray head shared by this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)  # nothing here sets it; make sure none leaks in
        yield from _start_head()


def _start_head():
    """Start the head, yield its dashboard address once the Jobs API answers, stop it."""
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray puts sockets in it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is ours
    # Ray 2.59+ turns token authentication on for local clusters: `ray start --head` enables it
    # whenever ~/.ray/auth_token exists (any earlier ray.init creates one), and the Jobs client
    # then fails with "Authentication required" unless its own process has RAY_AUTH_MODE=token.
    # This loopback-only, short-lived head opts out as Ray's warning and docs say to
    # (https://docs.ray.io/en/latest/ray-security/token-auth.html): RAY_AUTH_MODE=disabled.
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
        deadline, last = time.monotonic() + 60, ""
        while True:  # up once the Jobs API answers: "no job" for an id that does not exist
            try:
                jobs.status(address, "raysubmit_none")
            except ConfigError as err:
                if "no job" in str(err):
                    break
                last = str(err)
            assert proc.poll() is None, (Path(temp_dir) / "ray_start.log").read_text()
            assert time.monotonic() < deadline, f"Ray head not up after 60 s: {last}"
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
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{job_id}: SUCCEEDED"  # then the run's latest progress line, from the job's logs
    assert out[1].startswith("latest metrics: it 2/2 | steps 4,000 | return "), out
    assert "(limit 8)" in out[1] and "λ" in out[1], out
    assert main(["logs", job_id, "--address", ray_head]) == 0
    assert "done" in capsys.readouterr().out
    assert main(["stop", job_id, "--address", ray_head]) == 0
    assert "already finished (SUCCEEDED)" in capsys.readouterr().out
    assert main(["status", "raysubmit_nope", "--address", ray_head]) == 2
    assert capsys.readouterr().err == f"cluster error: no job 'raysubmit_nope' at {ray_head}\n"
    assert "env_vars" not in _runtime_env(ray_head, job_id)  # nothing forwarded unasked
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


def test_unset_env_var_is_refused(monkeypatch):
    monkeypatch.delenv("SAFERL_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="SAFERL_TEST_UNSET is not set"):
        jobs.submit("http://127.0.0.1:9", CONFIG, [], env_vars=["SAFERL_TEST_UNSET"])


def _runtime_env(address: str, job_id: str) -> dict:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).get_job_info(job_id).runtime_env


def test_env_is_forwarded_only_by_name_and_stop(ray_head, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFERL_TEST_FORWARDED", "yes")
    monkeypatch.setenv("SAFERL_TEST_SECRET", "not-sent")
    job_id = jobs.submit(ray_head, "ppo_lag/FunctionEnv-v0", [f"run_root={tmp_path}"],
                         env_vars=["SAFERL_TEST_FORWARDED"])
    assert _runtime_env(ray_head, job_id)["env_vars"] == {"SAFERL_TEST_FORWARDED": "yes"}
    assert main(["stop", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out == f"{job_id}: stop requested\n"
