"""``saferl submit`` / ``status`` / ``logs`` / ``stop`` against a real Ray head started by this test.

The head runs in its own process group with its own ports and temp dir, so it is independent of
the in-process ``ray.init`` of conftest's ``ray_session`` and of any other Ray on the machine. It
is started the way that used to break submitted jobs: as ``.venv/bin/ray start`` with ``.venv``
not on PATH, and with Ray's token authentication on (its own token file, named by
$RAY_AUTH_TOKEN_PATH, which is all ``saferl`` is given here: no ``RAY_AUTH_MODE``). It is stopped
by signalling *its* ``ray start --block`` process (and then killing any of its descendants that
remain), never with ``ray stop``, which would stop every Ray cluster on the machine.
tests/test_cluster_processes.py does the same on a head with two worker nodes (slow).

A custom environment's package (envs/custom.py) written outside the repository reaches the job
through its runtime_env's ``py_modules``; a wrong one is refused here, before anything is sent.
"""
from __future__ import annotations

import os
import secrets
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
from tests.conftest import temporary_package

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
def token_file(tmp_path_factory):
    """The head's Ray auth token, in a file of its own (not ~/.ray/auth_token)."""
    path = tmp_path_factory.mktemp("token") / "auth_token"
    path.write_text(secrets.token_hex(32))
    return path


@pytest.fixture(scope="module")
def ray_head(token_file):
    """The dashboard address of a local Ray head shared by this module's tests."""
    from ray._raylet import AuthenticationTokenLoader

    # Ray's C++ token loader caches the first token it reads: let it read this process's own
    # before RAY_AUTH_TOKEN_PATH names the head's, so nothing else in this process changes.
    AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # none leaks in
            mp.delenv(name, raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))  # all saferl is told about the token
        yield from _start_head(token_file)


def _start_head(token_file: Path):
    """Start the head, yield its dashboard address once the Jobs API answers, stop it."""
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray puts sockets in it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "VIRTUAL_ENV"}
    # `.venv/bin/ray start` from a shell where .venv is not activated: a bare `python` in the
    # job's entrypoint would not be .venv's (saferl names the interpreter instead)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != RAY.parent.resolve())
    # Token authentication on, as `ray start --head` turns it on whenever ~/.ray/auth_token exists
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_agent_register_timeout_ms"] = "120000"  # a busy machine can take longer than 30 s
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
    # the head's interpreter, named: the one its `ray start` ran with (not the PATH's `python`)
    entrypoint = jobs._connect(ray_head).get_job_info(job_id).entrypoint
    assert entrypoint.startswith(f"{sys.executable} -m saferl.cli train {CONFIG} "), entrypoint
    run = run_root / "submitted"
    assert (run / "metrics.csv").is_file()
    assert list((run / "checkpoints").glob("ckpt_*.pt")), sorted(p.name for p in run.rglob("*"))


USER_PKG = "saferl_test_submitpkg"
USER_ENVS = """
import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box


class LineEnv(gym.Env):
    \"\"\"A point on a line: reward for moving right, cost 1 per step right of 0.5.\"\"\"
    observation_space = Box(-10.0, 10.0, (1,), np.float32)
    action_space = Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0.0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x += 0.1 * float(action[0])
        return np.array([self.x], np.float32), self.x, False, False, {"cost": float(self.x > 0.5)}
"""
# ppo_lag/FunctionEnv-v0 turned into a run on the package's env, from the command line alone
CUSTOM = [f"task={USER_PKG}.envs:LineEnv", "env.cost_limit=5", "env.max_episode_steps=50"]


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A package in a temporary folder outside the repository, importable in this process only
    (validation imports it here); neither the head nor its jobs have that folder on sys.path."""
    with temporary_package(tmp_path, monkeypatch, USER_PKG, USER_ENVS) as path:
        yield path


@pytest.mark.slow
def test_submit_ships_a_custom_env_package(ray_head, user_pkg, tmp_path):
    """The job's driver imports the package from the job's py_modules (nothing else puts it on
    its sys.path) and ships it on to its env hosts; the env section set on the command line
    reaches the run (cost limit 5, episodes of 50 steps)."""
    run_root = tmp_path / "runs"
    overrides = [*CUSTOM, "total_env_steps=400", "steps_per_iteration=200", "resources.envs_per_host=4",
                 "algo_params.hidden=[8]", "algo_params.minibatch_size=50", "algo_params.epochs=1",
                 f"run_root={run_root}", "name=custom", "logging.tensorboard=false"]
    job_id = jobs.submit(ray_head, "ppo_lag/FunctionEnv-v0", overrides)
    assert _runtime_env(ray_head, job_id)["py_modules"][0].startswith("gcs://")  # uploaded by Ray
    deadline = time.monotonic() + 180
    while (line := jobs.status(ray_head, job_id)).split()[1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job still not finished after 180 s: {line}"
        time.sleep(1)
    assert line == f"{job_id}: SUCCEEDED", line + "\n" + jobs.logs(ray_head, job_id)
    import pandas as pd

    m = pd.read_csv(run_root / "custom" / "metrics.csv")
    assert m["env_steps"].tolist() == [200, 400]
    assert (m["episode/length"] == 50).all() and (m["cost_limit"] == 5).all()


def _recording_client(monkeypatch) -> dict:
    """jobs._client replaced by one that records what would be submitted."""
    from contextlib import contextmanager

    sent = {}

    class Client:
        def submit_job(self, **kwargs):
            sent.update(kwargs)
            return "raysubmit_fake"

    @contextmanager
    def fake(address, job_id=None):
        yield Client()

    monkeypatch.setattr(jobs, "_client", fake)
    return sent


def test_custom_package_joins_the_jobs_runtime_env(user_pkg, monkeypatch):
    sent = _recording_client(monkeypatch)
    assert jobs.submit("http://10.9.9.9:8265", "ppo_lag/FunctionEnv-v0", CUSTOM,
                       python=sys.executable) == "raysubmit_fake"
    assert sent["runtime_env"] == {"working_dir": str(jobs.REPO_ROOT), "excludes": jobs.EXCLUDES,
                                   "py_modules": [str(user_pkg.resolve())]}
    assert sent["entrypoint"].endswith(" --set task=saferl_test_submitpkg.envs:LineEnv --set env.cost_limit=5 "
                                       "--set env.max_episode_steps=50")
    jobs.submit("http://10.9.9.9:8265", CONFIG, [], python=sys.executable)  # a registered task: nothing more
    assert "py_modules" not in sent["runtime_env"]


@pytest.mark.parametrize("extra, expected", [
    (["task=saferl_test_submitpkg.envs:Nope"],
     f"config error: task: {USER_PKG}.envs:Nope: module '{USER_PKG}.envs' has no 'Nope' (and it is no Gymnasium id)"),
    (["env.cost_key=penalty"],
     f"config error: env.cost_key: {USER_PKG}.envs:LineEnv: step's info has no 'penalty' (its keys: ['cost']); "
     "return the cost there or as the third element"),
    (["env.max_episode_steps=0"], "config error: env.max_episode_steps: "),
], ids=["task", "cost_key", "max_episode_steps"])
def test_wrong_custom_env_is_refused_before_submitting(user_pkg, extra, expected, capsys):
    """One line, and before the (unreachable) cluster is even contacted."""
    overrides = [*CUSTOM, *extra]
    args = ["submit", "ppo_lag/FunctionEnv-v0", "--address", "http://127.0.0.1:9"]
    assert main(args + [a for pair in overrides for a in ("--set", pair)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    with pytest.raises(ConfigError) as info:  # the same from the Python API
        jobs.submit("http://127.0.0.1:9", "ppo_lag/FunctionEnv-v0", overrides)
    assert str(info.value) == err.strip()


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
    return jobs._connect(address).get_job_info(job_id).runtime_env


def test_env_is_forwarded_only_by_name_and_stop(ray_head, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFERL_TEST_FORWARDED", "yes")
    monkeypatch.setenv("SAFERL_TEST_SECRET", "not-sent")
    job_id = jobs.submit(ray_head, "ppo_lag/FunctionEnv-v0", [f"run_root={tmp_path}"],
                         env_vars=["SAFERL_TEST_FORWARDED"])
    assert _runtime_env(ray_head, job_id)["env_vars"] == {"SAFERL_TEST_FORWARDED": "yes"}
    assert main(["stop", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out == f"{job_id}: stop requested\n"


def test_driver_without_saferl_reports_why_in_status(ray_head, tmp_path, capsys):
    """A job whose interpreter lacks saferl's packages (here the Safety-Gymnasium one: no torch)
    fails, and `saferl status` says why (the traceback's last line) and what to do."""
    python = ROOT / ".venv-sg" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-sg to stand for an interpreter without torch")
    job_id = jobs.submit(ray_head, CONFIG, [f"run_root={tmp_path}"], python=str(python))
    deadline = time.monotonic() + 120
    while (line := jobs.status(ray_head, job_id)).split()[1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, line
        time.sleep(1)
    assert line.startswith(f"{job_id}: FAILED (ModuleNotFoundError: No module named 'torch'; {python} lacks "
                           "saferl's packages: start Ray from saferl's environment"), line
    assert line.endswith(f"see `saferl logs {job_id} --address {ray_head}`)") and "\n" not in line


def test_token_problems_are_one_line(ray_head, monkeypatch, tmp_path):
    """The head asks for a token: none to be found, a wrong one, or RAY_AUTH_MODE=disabled here
    are each one line that says what to do."""
    jobs._HEADERS.pop(ray_head, None)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"requires a Ray auth token .* none was found in \$RAY_AUTH_TOKEN, "):
        jobs.status(ray_head, "raysubmit_none")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    with pytest.raises(ConfigError, match=r"refused the Ray auth token from \$RAY_AUTH_TOKEN .*Invalid"):
        jobs.status(ray_head, "raysubmit_none")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError, match="requires a Ray auth token and RAY_AUTH_MODE=disabled here"):
        jobs.status(ray_head, "raysubmit_none")


def test_local_token_is_found_where_ray_looks(monkeypatch, tmp_path):
    """$RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH names (then nothing else), else
    ~/.ray/auth_token; whitespace stripped (Ray's AuthenticationTokenLoader's order)."""
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.local_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert jobs.local_token() == ("home", "~/.ray/auth_token")
    named = tmp_path / "tok"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert jobs.local_token() is None  # named but missing: not ~/.ray/auth_token either
    named.write_text("  file \n")
    assert jobs.local_token() == ("file", f"$RAY_AUTH_TOKEN_PATH ({named})")
    monkeypatch.setenv("RAY_AUTH_TOKEN", " ")
    assert jobs.local_token()[0] == "file"  # empty = unset
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert jobs.local_token() == ("env", "$RAY_AUTH_TOKEN")


def test_failure_cause_and_interpreter_of_a_raylet():
    logs = ("it 1/2 | steps 2,000\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
            "    import a\n    ^^^^^^^^\nValueError: first\n\nDuring handling of the above exception, another "
            "exception occurred:\n\nTraceback (most recent call last):\n  File \"y.py\", line 2, in f\n"
            "ModuleNotFoundError: No module named 'torch'\nmore output\n")
    assert jobs.failure_cause(logs) == "ModuleNotFoundError: No module named 'torch'"
    assert jobs.failure_cause("it 1/2\nconfig error: resources.num_env_hosts: must be > 0\n") == (
        "config error: resources.num_env_hosts: must be > 0")
    assert jobs.failure_cause("Killed\n") is None
    assert jobs.failure_cause("/bin/sh: 1: /opt/x/python: not found\n").startswith(
        "/opt/x/python does not exist on the node running the job (start Ray from saferl's environment")
    cmdline = ["/x/raylet", "--node_manager_port=1",
               "--python_worker_command=/opt/saferl/.venv/bin/python /opt/saferl/.venv/lib/setup_worker.py -u"]
    assert jobs.worker_python(cmdline) == "/opt/saferl/.venv/bin/python"
    assert jobs.worker_python(["/x/raylet"]) is None
    assert jobs.worker_python(["--python_worker_command=python x.py"]) is None  # not a path: unusable


def test_python_option_must_be_absolute(monkeypatch, capsys):
    from contextlib import contextmanager

    @contextmanager
    def fake(address, job_id=None):
        yield object()  # a "cluster" that reports nothing

    monkeypatch.setattr(jobs, "_client", fake)
    assert main(["submit", "ppo_lag/FunctionEnv-v0", "--address", "http://10.9.9.9:8265", "--python", "python3"]) == 2
    assert capsys.readouterr().err == "submit error: --python python3: give an absolute path on the head node\n"
    # a remote cluster that does not report its head's interpreter: refused, naming --python
    assert main(["submit", "ppo_lag/FunctionEnv-v0", "--address", "http://10.9.9.9:8265"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("submit error: http://10.9.9.9:8265 does not report the Python its head runs Ray "
                          "with; pass --python ") and err.count("\n") == 1
