"""``saferl bench rollout``: env steps/s of env-host actors on Ray against the same envs stepped
in one plain process (same EnvHost code, numpy inference included, no Ray).

Each measurement steps every env ``steps`` times after a warm-up; with ``steps`` ≥ the episode
length the numbers include resets. Results: ``rollout.json`` and ``rollout.md`` in ``out_dir``.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from saferl.actors.env_host import EnvHost
from saferl.cluster.coordinator import host_options
from saferl.config import REPO_ROOT, load_config
from saferl.learners.networks import GaussianPolicy

_PLAIN = """
import pickle, sys, time
from saferl.actors.env_host import EnvHost
task, n, steps, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
policy = pickle.load(open(path, "rb"))
host = EnvHost(task, n, seed=0)
host.rollout(policy, 20)
t = time.perf_counter(); host.rollout(policy, steps); dt = time.perf_counter() - t
print(n * steps / dt)
"""


def _policy(spec: dict) -> dict:
    return GaussianPolicy(spec["obs_dim"], spec["act_dim"], [64, 64]).export_numpy()


def _plain(python: str, task: str, n: int, steps: int, policy_path: str) -> float:
    out = subprocess.run([python, "-c", _PLAIN, task, str(n), str(steps), policy_path],
                         capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def _ray(options: dict, task: str, hosts: int, n: int, steps: int, policy: dict) -> float:
    cls = ray.remote(EnvHost).options(**options)
    actors = [cls.remote(task, n, 0, i) for i in range(hosts)]
    ref = ray.put(policy)
    ray.get([a.rollout.options(num_returns=2).remote(ref, 20)[1] for a in actors])  # warm-up
    t = time.perf_counter()
    ray.get([a.rollout.options(num_returns=2).remote(ref, steps)[1] for a in actors])
    dt = time.perf_counter() - t
    for a in actors:
        ray.kill(a)
    return hosts * n * steps / dt


def bench_rollout(out_dir: Path, task: str, steps: int, envs_per_host: list[int], hosts: list[int],
                  console=None) -> list[dict]:
    say = console.print if console else print
    options = host_options(load_config({"algo": "ppo_lag", "task": task, "steps_per_iteration": 1,
                                        "resources": {"num_env_hosts": 1, "envs_per_host": 1}}))
    python = options.get("runtime_env", {}).get("py_executable") or sys.executable
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(hosts), logging_level="error", include_dashboard=False)
    rows = []
    try:
        probe = ray.remote(EnvHost).options(**options).remote(task, 1, 0)
        policy = _policy(ray.get(probe.spec.remote()))
        ray.kill(probe)
        with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as fh:
            pickle.dump(policy, fh)
        for n in envs_per_host:
            for h in hosts:
                plain = _plain(python, task, n * h, steps, fh.name)
                sps = _ray(options, task, h, n, steps, policy)
                row = {"task": task, "env_hosts": h, "envs_per_host": n, "total_envs": n * h,
                       "steps_per_env": steps, "ray_steps_per_s": round(sps, 1),
                       "plain_steps_per_s": round(plain, 1), "ray_vs_plain": round(sps / plain, 3)}
                rows.append(row)
                say(f"{h} host(s) × {n:>3} envs: ray {sps:8.0f} steps/s | plain process {plain:8.0f} "
                    f"steps/s | ratio {sps / plain:.2f}")
    finally:
        if started:
            ray.shutdown()
    _write(out_dir, "rollout", rows, ["env hosts", "envs/host", "Ray steps/s", "plain process steps/s", "Ray / plain"],
           lambda r: [r["env_hosts"], r["envs_per_host"], f"{r['ray_steps_per_s']:.0f}",
                      f"{r['plain_steps_per_s']:.0f}", f"{r['ray_vs_plain']:.2f}"], say)
    return rows


def _write(out_dir: Path, name: str, rows: list[dict], header: list[str], cells, say, title: str = "") -> None:
    """``<name>.json`` (the rows) and ``<name>.md`` (a table) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows]
    (out_dir / f"{name}.md").write_text((f"{title}\n\n" if title else "") + "\n".join(lines) + "\n")
    say(f"results: {out_dir / (name + '.json')}, {out_dir / (name + '.md')}")


def bench_gradients(out_dir: Path, task: str, workers: list[int], envs_per_worker: list[int], horizon: int,
                    windows: int, console=None) -> list[dict]:
    """``saferl bench gradients``: env steps differentiated per second by gradient-worker actors
    (forward + backward through the simulator, critics included) vs workers × envs per worker.
    The first window of each configuration (jit/compile, allocation) is timed separately."""
    from saferl.actors.gradient_worker import GradientWorker, make_diff_env
    from saferl.learners.analytic import TimeValue

    say = console.print if console else print
    env = make_diff_env(task)
    arch = {"policy": dict(obs_dim=env.obs_dim, act_dim=env.act_dim, hidden=[64, 64], squash=True),
            "critic_hidden": [64, 64]}
    policy = GaussianPolicy(**arch["policy"])
    critic = TimeValue(env.obs_dim, [64, 64], env.max_episode_steps)
    weights = ray.put({"policy": policy.state_dict(), "v_r": critic.state_dict(), "v_c": critic.state_dict()})
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(workers), logging_level="error", include_dashboard=False)
    rows = []
    try:
        for n in envs_per_worker:
            for w in workers:
                cls = ray.remote(GradientWorker).options(num_cpus=1)
                actors = [cls.remote(task, i * n, n, w * n, 0, arch, "cpu") for i in range(w)]
                t = time.perf_counter()
                ray.get([a.compute.options(num_returns=2).remote(weights, 0, horizon)[1] for a in actors])
                first = time.perf_counter() - t
                t = time.perf_counter()
                for k in range(1, windows + 1):
                    ray.get([a.compute.options(num_returns=2).remote(weights, k, horizon)[1] for a in actors])
                dt = time.perf_counter() - t
                for a in actors:
                    ray.kill(a)
                sps = w * n * horizon * windows / dt
                rows.append({"task": task, "workers": w, "envs_per_worker": n, "horizon": horizon,
                             "first_window_s": round(first, 2), "steps_per_s": round(sps, 1)})
                say(f"{w} worker(s) × {n:>4} envs, h={horizon}: {sps:9.0f} differentiated steps/s "
                    f"(first window incl. compile {first:.1f} s)")
    finally:
        if started:
            ray.shutdown()
    _write(out_dir, "gradients", rows, ["workers", "envs/worker", "h", "differentiated steps/s",
                                        "first window (compile) s"],
           lambda r: [r["workers"], r["envs_per_worker"], r["horizon"], f"{r['steps_per_s']:.0f}",
                      f"{r['first_window_s']:.1f}"], say, title=task)
    return rows
