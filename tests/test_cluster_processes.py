"""``saferl submit`` / ``status`` / ``logs`` / ``stop`` on a real multi-process Ray cluster: a head
and two worker nodes, each its own ``ray start --block`` process (own ports, temp dir, worker-port
range and resources) on this machine, started with the commands docs/cluster.md documents for one
machine. The cluster is started as a user following the docs would: ``.venv/bin/ray start``
without ``.venv`` on PATH, with Ray's token authentication on (a token file of its own, named by
$RAY_AUTH_TOKEN_PATH), and ``saferl submit`` run without ``RAY_AUTH_MODE`` in its environment.

Slow (tens of seconds to start the nodes, a Safety-Gymnasium job, a gradient job, a job that
loses a worker node mid-run, a stopped job): ``make test-slow``. The default run keeps the fast
checks at the end of this module (the documented commands are the ones started here) and
tests/test_submit.py (one head, the same interpreter and token handling).

Every node is stopped by signalling its own ``ray start --block`` process and then killing its
remaining descendants, never with ``ray stop`` (which would stop every Ray on the machine), also
when a test fails. Ray's gRPC servers listen on all interfaces whatever ``--node-ip-address`` says
(Ray replaces 127.0.0.1 by the machine's address on Linux); the dashboard is bound to 127.0.0.1
and every node requires the token.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil
import pytest

from saferl.cli import main
from saferl.cluster import jobs
from saferl.config import ConfigError
from tests.conftest import ROOT, needs_sg

BIN = Path(sys.executable).parent  # .venv/bin: ray, saferl
DOC = ROOT / "docs" / "cluster.md"
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# -- the documented commands ---------------------------------------------------------------------
def head_command(ports: dict, temp_dir: str, num_cpus: int) -> list[str]:
    """``ray start --head`` as docs/cluster.md has it, on the ports given."""
    return [str(BIN / "ray"), "start", "--head", f"--port={ports['gcs']}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['client']}", *_node_flags(ports, temp_dir, num_cpus)]


def worker_command(gcs: int, ports: dict, temp_dir: str, num_cpus: int, resources: str) -> list[str]:
    """``ray start --address=...`` (a worker node) as docs/cluster.md has it."""
    return [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", f"--resources={resources}",
            *_node_flags(ports, temp_dir, num_cpus)]


def _node_flags(ports: dict, temp_dir: str, num_cpus: int) -> list[str]:
    return [f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['env_agent']}", f"--metrics-export-port={ports['metrics']}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
            f"--min-worker-port={ports['workers'][0]}", f"--max-worker-port={ports['workers'][1]}",
            "--object-store-memory=200000000", "--disable-usage-stats", "--block"]


START_ATTEMPTS = 3
PORT_NAMES = ("agent", "agent_grpc", "env_agent", "metrics", "node_manager", "object_manager")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(names) -> dict:
    socks = [socket.socket() for _ in names]
    try:
        for s in socks:
            s.bind(("0.0.0.0", 0))
        return {n: s.getsockname()[1] for n, s in zip(names, socks)}
    finally:
        for s in socks:
            s.close()


def free_port_range(width: int = 100) -> tuple[int, int]:
    """Ports for a node's Ray workers: outside Ray's default range (10002-19999, which other Ray
    instances on this machine use) and outside Linux's ephemeral range (32768+)."""
    bases = list(range(20000, 32000 - width, width))
    random.shuffle(bases)
    for base in bases:
        if all(_bindable(p) for p in range(base, base + width)):
            return base, base + width - 1
    raise RuntimeError("no free range of worker ports")


# -- processes -----------------------------------------------------------------------------------
@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: str
    log: object
    family: set = field(default_factory=set)

    def remember_family(self) -> None:
        """Record the node's processes (raylet, agents, workers) to kill any that outlive it."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.family |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}


def stop_node(node: Node, sig=signal.SIGTERM) -> None:
    """Signal the node's ``ray start --block`` (SIGTERM: it shuts its node down), then kill what
    is left of it; its temp dir is removed."""
    node.remember_family()
    if node.proc.poll() is None:
        node.proc.send_signal(sig)
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
    procs = []
    for pid in node.family:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    node.log.close()
    shutil.rmtree(node.temp_dir, ignore_errors=True)


class LocalCluster:
    """A head and worker nodes, each a ``ray start --block`` process in its own session."""

    def __init__(self, env: dict):
        self.env, self.nodes, self.url, self.gcs = env, [], None, None

    def _start(self, name: str, command, ready, what: str) -> Node:
        """Start a node (``command(temp_dir)``) and wait until its ``ray start`` reports the node
        started and ``ready()``. On a busy machine a node can die while starting (its raylet waits
        a fixed time for its dashboard agent): such a node is cleaned up and started again, at
        most ``START_ATTEMPTS`` times, each time on fresh ports."""
        for attempt in range(1, START_ATTEMPTS + 1):
            temp_dir = tempfile.mkdtemp(prefix=f"rc{name}", dir="/tmp")  # short: Ray puts sockets in it
            log = open(Path(temp_dir) / "ray_start.log", "w")
            proc = subprocess.Popen(command(temp_dir), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=temp_dir)
            node = Node(name, proc, temp_dir, log)
            self.nodes.append(node)
            failure = self._wait(node, ready, what)
            if failure is None:
                return node
            self.nodes.remove(node)
            stop_node(node)
            assert attempt < START_ATTEMPTS, failure
        raise AssertionError("unreachable")

    def start_head(self, num_cpus: int) -> Node:
        def command(temp_dir):
            ports = free_ports(("gcs", "dashboard", "client", *PORT_NAMES)) | {"workers": free_port_range()}
            self.gcs, self.url = ports["gcs"], f"http://127.0.0.1:{ports['dashboard']}"
            return head_command(ports, temp_dir, num_cpus)

        return self._start("head", command, lambda: _jobs_api_up(self.url), "Jobs API")

    def add_worker(self, name: str, num_cpus: int) -> Node:
        want = len(self.alive_nodes()) + 1

        def command(temp_dir):
            ports = free_ports(PORT_NAMES) | {"workers": free_port_range()}
            return worker_command(self.gcs, ports, temp_dir, num_cpus, f'{{"{name}": 1}}')

        return self._start(name, command, lambda: len(self.alive_nodes()) >= want, "join")

    def _wait(self, node: Node, ready, what: str, timeout: float = 180) -> str | None:
        """None once the node is up, else why not (the node exited, or timed out)."""
        deadline, last, log = time.monotonic() + timeout, None, Path(node.temp_dir) / "ray_start.log"
        while True:
            for other in self.nodes:
                if other is not node and other.proc.poll() is not None:
                    pytest.fail(f"{other.name} exited:\n{_tail(other)}")
            if node.proc.poll() is not None:
                return f"{node.name} exited while starting:\n{_tail(node)}"
            if time.monotonic() > deadline:
                return f"{node.name}: no {what} after {timeout} s ({last!r}):\n{_tail(node)}"
            try:
                if "Ray runtime started." in log.read_text() and ready():
                    node.remember_family()
                    return None
            except Exception as err:  # noqa: BLE001 — a dashboard still starting may drop requests
                last = err
            time.sleep(1)

    def alive_nodes(self) -> dict:
        """Node id -> custom resources, of the nodes the GCS counts alive (State API)."""
        reply = jobs._connect(self.url)._do_request("GET", "/api/v0/nodes?limit=100", timeout=10)
        nodes = reply.json()["data"]["result"]["result"]
        return {n["node_id"]: n["resources_total"] for n in nodes if n["state"] == "ALIVE"}

    def actors(self, class_name: str) -> dict[str, dict]:
        """The actors of a class in any state, by actor id (State API)."""
        reply = jobs._connect(self.url)._do_request(
            "GET", f"/api/v0/actors?limit=1000&filter_keys=class_name&filter_predicates=%3D"
            f"&filter_values={class_name}", timeout=10)
        return {a["actor_id"]: a for a in reply.json()["data"]["result"]["result"]}

    def actor_nodes(self, class_name: str) -> list[str]:
        """Node ids of the alive actors of a class."""
        return [a["node_id"] for a in self.actors(class_name).values() if a["state"] == "ALIVE"]

    def node_id(self, name: str) -> str:
        return next(i for i, res in self.alive_nodes().items() if name in res)

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            stop_node(node)


def _tail(node: Node) -> str:
    return (Path(node.temp_dir) / "ray_start.log").read_text()[-3000:]


def _jobs_api_up(url: str) -> bool:
    try:
        jobs.status(url, "raysubmit_none")
    except ConfigError as err:
        return "no job" in str(err)
    return False


def node_env(token_file: Path) -> dict:
    """The nodes' environment: this one without Ray settings, without .venv on PATH (Ray started
    as ``.venv/bin/ray start`` from a shell where .venv is not activated), with token auth on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != BIN.resolve())
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               # a busy machine can take longer than the default 30 s to start a node's agents
               RAY_agent_register_timeout_ms="120000")
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (2 CPUs) + worker ``node_a`` (2 CPUs) + worker ``node_b`` (1 CPU: too small for a
    learner, so losing it loses env hosts only)."""
    token_file = tmp_path_factory.mktemp("token") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    from ray._raylet import AuthenticationTokenLoader

    # Ray's C++ token loader caches the first token it reads: let it read this process's own
    # before RAY_AUTH_TOKEN_PATH names the test cluster's, so nothing else in this process changes.
    AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    c = LocalCluster(node_env(token_file))
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))  # what `saferl submit` finds, as Ray would
        try:
            c.start_head(num_cpus=2)
            c.add_worker("node_a", num_cpus=2)
            c.add_worker("node_b", num_cpus=1)
            yield c
        finally:
            c.shutdown()


def explain(url: str, job_id: str) -> str:
    """A job's status line, Ray's message and the end of its logs (for failed assertions)."""
    info = jobs._connect(url).get_job_info(job_id)
    return f"{jobs.status(url, job_id)}\n{info.message}\n{jobs.logs(url, job_id)[-4000:]}"


def wait_final(url: str, job_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while (line := jobs.status(url, job_id)).split()[1] not in FINAL:
        assert time.monotonic() < deadline, f"job still not finished after {timeout} s: {line}"
        time.sleep(1)
    return line


def wait_logs(url: str, job_id: str, pattern: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, jobs.logs(url, job_id), re.MULTILINE):
        line = jobs.status(url, job_id)
        assert line.split()[1] not in FINAL, explain(url, job_id)
        assert time.monotonic() < deadline, f"no {pattern!r} in the job's logs after {timeout} s"
        time.sleep(1)


# -- on the cluster ------------------------------------------------------------------------------
@needs_sg()
@pytest.mark.slow
def test_safety_gymnasium_job_from_the_cli(cluster, tmp_path):
    """`saferl submit` as a user runs it (a subprocess without RAY_AUTH_MODE): the job runs under
    the head's interpreter although the nodes' PATH has no .venv, and its Safety-Gymnasium env
    hosts (.venv-sg) run on more than one node."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    run_root = tmp_path / "runs"
    before = cluster.actors("EnvHost")
    out = subprocess.run(
        [str(BIN / "saferl"), "submit", "ppo_lag/SafetyPointGoal1-v0", "--address", cluster.url,
         "--set", "total_env_steps=2000", "--set", "steps_per_iteration=1000", "--set", "name=sg",
         "--set", "resources.num_env_hosts=2", "--set", "resources.envs_per_host=1",
         "--set", "algo_params.epochs=2", "--set", "algo_params.lr_decay_updates=2",
         "--set", f"run_root={run_root}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = re.search(r"submitted (raysubmit_\w+)", out.stdout).group(1)
    line = wait_final(cluster.url, job_id)
    assert line == f"{job_id}: SUCCEEDED", explain(cluster.url, job_id)
    # this job's hosts, alive or already gone: a fast machine ends the job between two polls
    hosts_on = {a["node_id"] for i, a in cluster.actors("EnvHost").items() if i not in before}
    assert len(hosts_on) == 2, hosts_on  # SPREAD: the two hosts on two nodes
    info = jobs._connect(cluster.url).get_job_info(job_id)
    assert info.entrypoint.startswith(f"{sys.executable} -m saferl.cli train configs/ppo_lag/SafetyPointGoal1-v0.yaml")
    assert (run_root / "sg" / "metrics.csv").is_file()
    assert len(pd.read_csv(run_root / "sg" / "metrics.csv")) == 2


@pytest.mark.slow
def test_gradient_job_status_logs_stop(cluster, tmp_path, capsys):
    """A gradient algorithm (SHAC: learner + gradient worker in one placement group) runs to the
    end; `status`, `logs` and `stop` of it and of a job stopped while running."""
    run_root = tmp_path / "runs"
    job_id = jobs.submit(cluster.url, "shac/FunctionEnv-v0",
                         ["total_env_steps=3200", "resources.envs_per_host=64", "schedule.log_every=1",
                          f"run_root={run_root}", "name=shac"])
    line = wait_final(cluster.url, job_id)
    assert line == f"{job_id}: SUCCEEDED", explain(cluster.url, job_id)
    capsys.readouterr()
    assert main(["status", job_id, "--address", cluster.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{job_id}: SUCCEEDED"
    assert out[1].startswith("latest metrics: it 5/5 | steps 3,200 | "), out
    assert main(["logs", job_id, "--address", cluster.url]) == 0
    assert "done" in capsys.readouterr().out
    assert main(["stop", job_id, "--address", cluster.url]) == 0
    assert capsys.readouterr().out == f"{job_id}: already finished (SUCCEEDED)\n"
    assert len(pd.read_csv(run_root / "shac" / "metrics.csv")) == 5

    long = jobs.submit(cluster.url, "shac/FunctionEnv-v0",
                       ["schedule.log_every=1", f"run_root={run_root}", "name=long"])
    wait_logs(cluster.url, long, r"^it \d+/\d+ ")
    assert main(["stop", long, "--address", cluster.url]) == 0
    assert capsys.readouterr().out == f"{long}: stop requested\n"
    assert wait_final(cluster.url, long, timeout=60).startswith(f"{long}: STOPPED")


@pytest.mark.slow
def test_job_survives_losing_a_worker_node(cluster, tmp_path):
    """Three env hosts SPREAD over the three nodes; node_b crashes after the first iteration (every
    process of it killed at once: a graceful ``ray start`` shutdown can take longer than this short
    job); Ray re-creates its host on a surviving node, the coordinator counts the restart and the
    job finishes its budget. The last test here: node_b is not replaced."""
    run_root = tmp_path / "runs"
    job_id = jobs.submit(cluster.url, "ppo_lag/FunctionEnv-v0", [
        "total_env_steps=72000", "steps_per_iteration=1200", "resources.num_env_hosts=3",
        "resources.envs_per_host=4", "resources.num_cpus_per_host=0.5", "schedule.checkpoint_every=100",
        f"run_root={run_root}", "name=lost"])
    wait_logs(cluster.url, job_id, r"^it 1/60 ")
    victim = cluster.node_id("node_b")
    assert victim in cluster.actor_nodes("EnvHost"), "no env host on node_b to lose"
    node_b = next(n for n in cluster.nodes if n.name == "node_b")
    node_b.remember_family()
    for pid in [node_b.proc.pid, *node_b.family]:  # the crash: raylet, agents and workers at once
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    node_b.proc.wait(timeout=60)
    assert jobs.status(cluster.url, job_id) == f"{job_id}: RUNNING", "the node was lost after the run"
    line = wait_final(cluster.url, job_id)
    assert line == f"{job_id}: SUCCEEDED", explain(cluster.url, job_id)
    assert victim not in cluster.alive_nodes()
    m = pd.read_csv(run_root / "lost" / "metrics.csv")
    assert m["iteration"].tolist() == list(range(1, 61)), "one row per iteration, none repeated"
    assert m["health/restarts"].iloc[-1] >= 1
    assert "restarted after dying" in jobs.logs(cluster.url, job_id)


# -- fast (default run) --------------------------------------------------------------------------
def _documented_commands() -> list[list[str]]:
    """The `ray start` commands of docs/cluster.md's one-machine recipe, as argument lists."""
    text = DOC.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("#")[0].strip()
            if cmd.startswith(".venv/bin/ray start"):
                commands.append(cmd.split())
    return commands


def _flags(argv: list[str]) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("--")}


def test_the_documented_commands_are_the_tested_ones():
    """docs/cluster.md's head and worker commands carry exactly the flags this module starts
    its nodes with (the values are this machine's free ports here), and the documented setting
    that makes them work from a non-activated shell with token authentication."""
    ports = free_ports(("gcs", "dashboard", "client", *PORT_NAMES)) | {"workers": (20000, 20099)}
    head = head_command(ports, "/tmp/x", 2)
    worker = worker_command(6390, ports, "/tmp/y", 2, '{"node_a": 1}')
    documented = _documented_commands()
    heads = [c for c in documented if "--head" in c]
    workers = [c for c in documented if any(a.startswith("--address=") for a in c)]
    assert heads and workers, "docs/cluster.md lost its one-machine recipe"
    tested_only = {"--block"}  # the docs run the nodes in the background; the test keeps each process
    for doc in heads:
        assert _flags(doc) | tested_only == _flags(head), _flags(doc) ^ _flags(head)
    for doc in workers:
        assert _flags(doc) | tested_only == _flags(worker), _flags(doc) ^ _flags(worker)
    assert "export RAY_AUTH_MODE=token" in DOC.read_text()


def test_worker_ports_avoid_rays_default_range():
    lo, hi = free_port_range(50)
    assert 20000 <= lo < hi < 32768 and hi - lo == 49
