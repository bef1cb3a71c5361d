"""``saferl bench rollout``: env steps/s of env-host actors on Ray against the same envs stepped
in one plain process (same EnvHost code, numpy inference included, no Ray).

Each measurement steps every env ``steps`` times after a warm-up; with ``steps`` ≥ the episode
length the numbers include resets. Results: ``rollout.json`` and ``rollout.md`` in ``out_dir``.
"""
from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from saferl.actors.env_host import EnvHost
from saferl.cluster.placement import host_options
from saferl.config import REPO_ROOT, load_config
from saferl.learners.networks import GaussianPolicy
from saferl.metric_keys import EPISODE_COST, EPISODE_RETURN
from saferl.tools.bench_local import gradient_weights
from saferl.tools.bench_local import task_spec as _task_spec
from saferl.tools.bench_local import write_table as _write

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


def _policy(options: dict, task: str) -> dict:
    """An untrained [64, 64] Gaussian policy (numpy) for ``task``, sized by a probe host's spec."""
    probe = ray.remote(EnvHost).options(**options).remote(task, 1, 0)
    spec = ray.get(probe.spec.remote())
    ray.kill(probe)
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
        policy = _policy(options, task)
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


def bench_gradients(out_dir: Path, task: str, workers: list[int], envs_per_worker: list[int], horizon: int,
                    windows: int, console=None) -> list[dict]:
    """``saferl bench gradients``: env steps differentiated per second by gradient-worker actors
    (forward + backward through the simulator, critics included) vs workers × envs per worker.
    The first window of each configuration (jit/compile, allocation) is timed separately."""
    from saferl.actors.gradient_worker import GradientWorker

    say = console.print if console else print
    arch, weights = gradient_weights(task)
    weights = ray.put(weights)
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


# -- end to end ---------------------------------------------------------------------------------
_REFERENCE = """
import pickle, sys, time
from saferl.actors.env_host import EnvHost
task, n, steps, iters, path, out = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                    sys.argv[5], sys.argv[6])
policy = pickle.load(open(path, "rb"))
host = EnvHost(task, n, seed=0)
times, batches = [], []
for _ in range(iters):
    t = time.perf_counter(); batch, _ = host.rollout(policy, steps); times.append(time.perf_counter() - t)
    batches.append(batch)
pickle.dump({"rollout_s": times, "batches": batches}, open(out, "wb"))
"""


def _reference(cfg, python: str, iters: int, say) -> dict:
    """One process, no Ray: all envs of the run stepped sequentially by one in-process EnvHost (in
    the Safety-Gymnasium interpreter, a subprocess), then the same learner updated in this process
    on each batch (a fresh learner per batch: the first update of a run, as from one iteration)."""
    from saferl.actors.learner import LearnerActor  # the plain class, no Ray

    res = cfg.resources
    n = res.num_env_hosts * res.envs_per_host
    per_env = cfg.steps_per_iteration // n
    with tempfile.TemporaryDirectory() as tmp:
        spec = _task_spec(cfg)
        make = lambda: LearnerActor(cfg.algo, cfg.algo_params, spec, cfg.limit, cfg.seed, "cpu")  # noqa: E731
        learner = make()
        pol, out = Path(tmp) / "policy.pkl", Path(tmp) / "batches.pkl"
        pol.write_bytes(pickle.dumps(learner.numpy_policy()))
        t = time.perf_counter()
        subprocess.run([python, "-c", _REFERENCE, cfg.task, str(n), str(per_env), str(iters), str(pol), str(out)],
                       check=True, cwd=REPO_ROOT)
        wall = time.perf_counter() - t
        data = pickle.loads(out.read_bytes())
    import torch

    updates, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as in the learner actor (Ray sets OMP_NUM_THREADS=1 for a 1-CPU actor)
    try:
        for batch in data["batches"]:
            learner = make()
            t = time.perf_counter()
            learner.update([batch])
            updates.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    rollout_s, update_s = sum(data["rollout_s"]), sum(updates)
    steps = iters * per_env * n
    say(f"reference (one process): {steps} steps, rollout {rollout_s:.1f} s (subprocess wall {wall:.1f} s), "
        f"updates {update_s:.1f} s -> {steps / (rollout_s + update_s):.0f} steps/s")
    return {"steps": steps, "rollout_s": round(rollout_s, 2), "update_s": round(update_s, 2),
            "steps_per_s": round(steps / (rollout_s + update_s), 1)}


def _stepping_limit(cfg, say) -> dict:
    """Env steps/s of the config's hosts × envs stepping an untrained policy, no learner: the
    ceiling an end-to-end run can approach (one iteration's steps per env, resets included)."""
    options, hosts, n = host_options(cfg), cfg.resources.num_env_hosts, cfg.resources.envs_per_host
    per_env = max(1, cfg.steps_per_iteration // (hosts * n))
    sps = _ray(options, cfg.task, hosts, n, per_env, _policy(options, cfg.task))
    say(f"stepping limit: {hosts} hosts × {n} envs, {per_env} steps each, untrained policy: {sps:.0f} env steps/s")
    return {"steps": hosts * n * per_env, "steps_per_s": round(sps, 1)}


def _match_python(cfg, python: str | None) -> str:
    """The interpreter ``--match`` runs OmniSafe in, checked before anything runs."""
    from saferl.config import ConfigError
    from saferl.tools.studies.reference import DEFAULT_VENV, REFERENCE_ALGOS

    if cfg.algo not in REFERENCE_ALGOS:
        raise ConfigError(f"usage error: --match: OmniSafe 0.5 has no {cfg.algo} "
                          f"(one of {', '.join(sorted(REFERENCE_ALGOS))})")
    if cfg.task_spec.kind != "safety_gymnasium":
        raise ConfigError(f"usage error: --match: {cfg.task} is not a Safety-Gymnasium task, which OmniSafe needs")
    python = python or str(REPO_ROOT / DEFAULT_VENV / "bin" / "python")
    if not Path(python).is_file():
        raise ConfigError(f"usage error: --match: no reference interpreter at {python}: build it with "
                          "`saferl benchmark reference --install`, or pass --reference-python")
    return python


def omnisafe_timing(progress_csv: Path, steps: int) -> dict:
    """Seconds OmniSafe spent per its own timers (progress.csv: ``Time/Epoch``, ``Time/Rollout``
    with its inference, ``Time/Update``; ``Time/Evaluate``'s test episodes are not training and
    are left out) and its env steps/s over the epochs."""
    with open(progress_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    total = lambda key: sum(float(r.get(key) or 0.0) for r in rows)  # noqa: E731
    train_s = total("Time/Epoch") - total("Time/Evaluate")
    return {"steps": steps, "epochs": len(rows), "train_s": round(train_s, 2),
            "rollout_s": round(total("Time/Rollout"), 2), "update_s": round(total("Time/Update"), 2),
            "steps_per_s": round(steps / train_s, 1)}


def _omnisafe(cfg, steps: int, python: str, out_dir: Path, say) -> dict:
    """OmniSafe 0.5 training the same task, seed and budget at its own settings (the shipped
    configs follow them key by key), one env and one torch thread, after saferl's run."""
    from saferl.config import ConfigError
    from saferl.tools.studies.reference import DRIVER, REFERENCE_ALGOS, reference_argv

    s = {"algo": cfg.algo, "reference_algo": REFERENCE_ALGOS[cfg.algo], "task": cfg.task, "seed": cfg.seed,
         "steps": steps, "steps_per_iteration": cfg.steps_per_iteration, "threads": 1, "cost_limit": cfg.limit,
         "reference_set": []}
    ref_dir = out_dir / "omnisafe"
    say(f"OmniSafe {s['reference_algo']}: {steps} steps (log: {ref_dir / 'log.txt'})")
    ref_dir.mkdir(parents=True, exist_ok=True)
    with open(ref_dir / "log.txt", "w") as log:
        done = subprocess.run(reference_argv(python, str(DRIVER), s, ref_dir), stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO_ROOT)
    if done.returncode:
        raise ConfigError(f"run error: --match: OmniSafe failed (exit {done.returncode}; log: {ref_dir / 'log.txt'})")
    meta = json.loads((ref_dir / "reference_done.json").read_text())
    result = {"algo": s["reference_algo"], **omnisafe_timing(Path(meta["progress_csv"]), steps)}
    say(f"OmniSafe {result['algo']}: {result['steps_per_s']:.0f} env steps/s (rollout {result['rollout_s']:.1f} s, "
        f"update {result['update_s']:.1f} s)")
    return result


def wall_shares(row: dict) -> dict:
    """Where a Ray run's wall-clock went, from its own timers: env stepping and numpy inference
    (per host: hosts step in parallel), learner updates, and the rest (Ray calls, batch
    transfer, buffer writes, dual steps). Pipelined runs overlap hosts and learner, so their
    shares can add up past 1; the rest is then 0."""
    hosts, wall = row["env_hosts"], row["wall_s"]
    shares = {"env": row["host_env_s"] / hosts / wall, "inference": row["host_inference_s"] / hosts / wall,
              "learner": row["learner_s"] / wall}
    shares["ray_and_other"] = max(0.0, 1 - sum(shares.values()))
    return {k: round(v, 3) for k, v in shares.items()}


def bench_e2e(out_dir: Path, config: str = "ppo_lag/SafetyPointGoal1-v0", steps: int = 100_000,
              overrides: list[str] | None = None, reference: bool = True, match: bool = False,
              reference_python: str | None = None, console=None) -> dict:
    """``saferl bench e2e``: wall-clock of a training run (the config's batch settings: hosts ×
    envs, steps per iteration; updates and dual steps included) per 100k env steps, the
    return/cost reached, where the wall-clock went, the stepping limit of the same hosts (measured
    first), and the same work done in one process without Ray (``_reference``). ``match``: also
    OmniSafe 0.5 at its own settings on the same task, seed and budget (``_omnisafe``), so one
    table holds the limit, saferl and the reference library. The Ray run's clock starts after
    actor creation; creation is reported separately."""
    from saferl.config import CONFIG_DIR

    say = console.print if console else print
    path = Path(config) if Path(config).is_file() else CONFIG_DIR / f"{config}.yaml"
    cfg = load_config(path, [f"total_env_steps={steps}", *(overrides or [])])
    python_ref = _match_python(cfg, reference_python) if match else None
    started = _connect(cfg)
    try:
        limit = _stepping_limit(cfg, say)
        rows, startup, wall, rss = _train(cfg, say)
        python = host_options(cfg).get("runtime_env", {}).get("py_executable") or sys.executable
        ref = _reference(cfg, python, len(rows), say) if reference else None
    finally:
        if started:
            ray.shutdown()
    result = _e2e_result(cfg, rows, startup, wall, rss, limit, ref)
    if python_ref:
        result["omnisafe"] = _omnisafe(cfg, result["env_steps"], python_ref, out_dir, say)
        result["vs_omnisafe"] = round(result["steps_per_s"] / result["omnisafe"]["steps_per_s"], 2)
    say(f"{cfg.algo} on {cfg.task}: {result['steps_per_s']:.0f} env steps/s end to end "
        f"({result['s_per_100k_steps']:.0f} s per 100k steps; learner {result['learner_s']:.1f} s of {wall:.1f} s; "
        f"{result['of_limit']:.0%} of the stepping limit)")
    table = e2e_rows(result)  # write_table gives one line per result: the first; the others appended
    _write(out_dir, "e2e", [result], E2E_HEADER, lambda r: table[0], say, title=e2e_title(cfg, path, overrides))
    with open(out_dir / "e2e.md", "a") as fh:
        fh.writelines("| " + " | ".join(cells) + " |\n" for cells in table[1:])
        if ref or python_ref:
            fh.write("\n¹ without Ray the rollout time includes the policy's inference.\n")
    return result


def _train(cfg, say) -> tuple[list[dict], float, float, dict]:
    """The Ray run: per-iteration rows, actor start-up s, iterations' wall s, actors' peak RSS."""
    from saferl.cluster.coordinator import Coordinator

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        coord = Coordinator(cfg, Path(tmp) / "run")
        startup = time.perf_counter() - t
        try:
            rows = []
            t = time.perf_counter()
            for _ in range(coord.total_iterations()):
                row = coord.iterate()
                row.update(coord.episode_stats())
                rows.append(row)
                say(f"it {row['iteration']}: {row['env_steps']} steps, {row['time/iteration_s']:.1f} s, "
                    f"learner {row.get('time/learner_s', 0):.1f} s, "
                    f"return {row.get('episode/return', float('nan')):.2f}, "
                    f"cost {row.get('episode/cost', float('nan')):.1f}")
            wall = time.perf_counter() - t
            return rows, startup, wall, _actor_rss(coord)
        finally:
            coord.close()


def _e2e_result(cfg, rows: list[dict], startup: float, wall: float, rss: dict, limit: dict, ref: dict | None) -> dict:
    env_steps = rows[-1]["env_steps"]
    last = [r for r in rows if EPISODE_RETURN in r][-1:] or [{}]
    result = {"algo": cfg.algo, "task": cfg.task, "env_hosts": cfg.resources.num_env_hosts,
              "envs_per_host": cfg.resources.envs_per_host, "steps_per_iteration": cfg.steps_per_iteration,
              "iterations": len(rows), "env_steps": env_steps, "startup_s": round(startup, 2),
              "wall_s": round(wall, 2), "s_per_100k_steps": round(wall / env_steps * 1e5, 1),
              "steps_per_s": round(env_steps / wall, 1),
              "learner_s": round(sum(r.get("time/learner_s", 0.0) for r in rows), 2),
              "host_env_s": round(sum(r["time/host_env_s"] for r in rows), 2),
              "host_inference_s": round(sum(r["time/host_inference_s"] for r in rows), 2),
              "final_return": last[0].get(EPISODE_RETURN), "final_cost": last[0].get(EPISODE_COST),
              "cost_limit": cfg.limit, "peak_rss_mb": rss, "reference": ref,
              "ray_vs_reference": round(env_steps / wall / ref["steps_per_s"], 3) if ref else None,
              "stepping_limit": limit, "of_limit": round(env_steps / wall / limit["steps_per_s"], 3),
              # per iteration: what the run learned, to compare settings by more than their speed
              "curve": [{"env_steps": r["env_steps"], "return": r.get(EPISODE_RETURN), "cost": r.get(EPISODE_COST),
                         "iteration_s": round(r["time/iteration_s"], 3)} for r in rows]}
    result["shares"] = wall_shares(result)
    return result


E2E_HEADER = ["setup", "env steps", "wall s", "env steps/s", "of the stepping limit", "env stepping",
              "inference", "learner", "Ray and other", "final return", "final cost"]


def e2e_title(cfg, path: Path, overrides: list[str] | None) -> str:
    sets = [o for o in overrides or [] if not o.startswith("total_env_steps=")]
    return (f"{cfg.algo} on {cfg.task} ({path.name}), {cfg.steps_per_iteration} steps per iteration"
            + (f" ({', '.join(sets)})" if sets else "") + "; shares: of each setup's wall-clock")


def e2e_rows(r: dict) -> list[list[str]]:
    """The table's rows: saferl on Ray (first: ``write_table``'s), the stepping limit, one process
    without Ray, OmniSafe."""
    pct = lambda x: f"{x:.0%}"  # noqa: E731
    lim, sh = r["stepping_limit"]["steps_per_s"], r["shares"]
    rows = [[f"saferl on Ray ({r['env_hosts']} hosts × {r['envs_per_host']} envs)", str(r["env_steps"]),
             f"{r['wall_s']:.1f}", f"{r['steps_per_s']:.0f}", pct(r["of_limit"]), pct(sh["env"]),
             pct(sh["inference"]), pct(sh["learner"]), pct(sh["ray_and_other"]), _fmt(r["final_return"]),
             _fmt(r["final_cost"])],
            [f"stepping limit (the same hosts, untrained policy, no learner; {r['stepping_limit']['steps']} steps)",
             str(r["stepping_limit"]["steps"]), "–", f"{lim:.0f}", "100%", "–", "–", "–", "–", "–", "–"]]
    if ref := r.get("reference"):
        wall = ref["rollout_s"] + ref["update_s"]
        rows.append([f"one process, no Ray ({r['env_hosts'] * r['envs_per_host']} envs, sequential)", str(ref["steps"]),
                     f"{wall:.1f}", f"{ref['steps_per_s']:.0f}", pct(ref["steps_per_s"] / lim),
                     pct(ref["rollout_s"] / wall) + " ¹", "¹", pct(ref["update_s"] / wall), "–", "–", "–"])
    if om := r.get("omnisafe"):
        rows.append([f"OmniSafe 0.5 {om['algo']} (its settings, 1 env, 1 thread)", str(om["steps"]),
                     f"{om['train_s']:.1f}", f"{om['steps_per_s']:.0f}", pct(om["steps_per_s"] / lim),
                     pct(om["rollout_s"] / om["train_s"]) + " ¹", "¹", pct(om["update_s"] / om["train_s"]),
                     pct(max(0.0, 1 - (om["rollout_s"] + om["update_s"]) / om["train_s"])), "–", "–"])
    return rows


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _actor_rss(coord) -> dict:
    """Peak resident memory (MB) of each actor kind of a coordinator's run (max over its actors)."""
    kinds = {"learner": [coord.loop.learner], "replay_buffer": [coord.loop.replay],
             "gradient_worker" if coord.kind == "gradient" else "env_host": coord.loop.hosts}
    out = {}
    for kind, actors in kinds.items():
        actors = [a for a in actors if a is not None]
        if actors:
            out[kind] = round(max(ray.get([a.max_rss.remote() for a in actors])) / 2**20, 1)
    return out


# -- memory -------------------------------------------------------------------------------------
def bench_memory(out_dir: Path, runs: list[str], iterations: int = 2, console=None) -> list[dict]:
    """``saferl bench memory``: peak resident memory (``ru_maxrss`` of each actor's process; the
    largest over actors of a kind) after a short run of each config at its default settings.
    Off-policy runs go ``iterations`` past their uniform-action warm-up, so updates have run.
    A replay buffer's ring is allocated at capacity on its first batch (``replay_capacity_mb``);
    ``replay_size`` is how much of it the short run filled."""
    from saferl.cluster.coordinator import Coordinator
    from saferl.config import CONFIG_DIR

    say = console.print if console else print
    rows = []
    for run in runs:
        path = Path(run) if Path(run).is_file() else CONFIG_DIR / f"{run}.yaml"
        cfg = load_config(path)
        started = _connect(cfg)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                coord = Coordinator(cfg, Path(tmp) / "run")
                try:
                    iters = iterations
                    if coord.kind == "offpolicy":
                        warm = coord.loop.offpolicy["warmup_steps"]
                        while sum(coord.steps_of(i) for i in range(iters - iterations)) < warm:
                            iters += 1
                    t = time.perf_counter()
                    for _ in range(iters):
                        coord.iterate()
                    wall = time.perf_counter() - t
                    rss = _actor_rss(coord)
                    extra = {}
                    if coord.loop.replay is not None:
                        spec = ray.get(coord.loop.hosts[0].spec.remote())
                        extra["replay_capacity_mb"] = round(coord.loop.offpolicy["capacity"] * 4 * (
                            2 * spec["obs_dim"] + spec["act_dim"] + 3) / 2**20, 1)
                        extra["replay_size"] = ray.get(coord.loop.replay.add.remote())
                    steps = coord.state.env_steps
                finally:
                    coord.close()
        finally:
            if started:
                ray.shutdown()
        for kind, mb in rss.items():
            rows.append({"config": run, "algo": cfg.algo, "task": cfg.task, "actor": kind, "peak_rss_mb": mb,
                         "env_hosts": cfg.resources.num_env_hosts, "envs_per_host": cfg.resources.envs_per_host,
                         "iterations": iters, "env_steps": steps, "run_s": round(wall, 1),
                         **(extra if kind == "replay_buffer" else {})})
            say(f"{run}: {kind:>15} peak RSS {mb:8.1f} MB ({iters} iterations, {steps} env steps)")
    _write(out_dir, "memory", rows, ["config", "actor", "peak RSS MB", "run (iterations, env steps)", "note"],
           lambda r: [r["config"], r["actor"], f"{r['peak_rss_mb']:.0f}", f"{r['iterations']}, {r['env_steps']}",
                      f"ring {r['replay_capacity_mb']:.0f} MB allocated, {r['replay_size']} filled"
                      if "replay_capacity_mb" in r else ""], say)
    return rows


def _connect(cfg) -> bool:
    """A fresh local Ray sized for ``cfg`` (``address="local"``: never another process's cluster
    on this machine), unless Ray is already up or $RAY_ADDRESS names a cluster."""
    import os

    from saferl.cluster.session import connect, required_cpus

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return connect(cfg)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(required_cpus(cfg) + 0.999)),
             logging_level="warning", include_dashboard=False)
    return True


# -- soak: training while env hosts are killed --------------------------------------------------
def _kill_hosts(coord, every: float, rng, stop, log: list, say) -> None:
    """Every ``every`` seconds SIGKILL a random env host, mid-call or not. Its process id comes
    from the coordinator's record (refreshed before each attempt): asking the host would queue
    behind its rollout, so kills would only land between calls. A pid is killed only while
    /proc says it is still a Ray EnvHost process, so a stale one never hits another process."""
    import os
    import signal

    while not stop.wait(every):
        pids = coord.faults.actor_pids
        if not pids:
            continue
        i = rng.randrange(len(coord.loop.hosts))
        try:
            alive = Path(f"/proc/{pids[i]}/cmdline").read_bytes().startswith(b"ray::EnvHost")
            if alive:
                os.kill(pids[i], signal.SIGKILL)
        except OSError:  # exited (restarting) between the check and the kill
            alive = False
        log.append({"t": time.perf_counter(), "host": i, "pid": pids[i], "sent": alive})
        if alive:
            say(f"killed env host {i} (pid {pids[i]})")


def bench_soak(out_dir: Path, config: str = "ppo_lag/FunctionEnv-v0", steps: int = 2_000_000,
               kill_every: float = 10.0, seed: int = 0, hosts: int = 2, episodes: int = 10,
               overrides: list[str] | None = None, console=None) -> dict:
    """``saferl bench soak``: a long training run while a background thread SIGKILLs a random env
    host every ``kill_every`` seconds. Ray restarts each host, the coordinator retries the
    iteration; the run must reach its budget with one metrics row per iteration and a final
    checkpoint that loads and evaluates. The hosts must run on this machine (a local Ray)."""
    import random
    import threading

    import pandas as pd

    from saferl.cluster import rundir
    from saferl.cluster.coordinator import Coordinator
    from saferl.config import CONFIG_DIR, ConfigError
    from saferl.tools.evaluate import evaluate

    say = console.print if console else print
    if kill_every <= 0:
        raise ConfigError(f"usage error: --kill-every must be > 0 seconds (got {kill_every:g})")
    path = Path(config) if Path(config).is_file() else CONFIG_DIR / f"{config}.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(path, [f"total_env_steps={steps}", f"seed={seed}", f"resources.num_env_hosts={hosts}",
                                 "resources.max_actor_restarts=-1",  # a host may be killed any number of times
                                 "schedule.log_every=1", f"run_root={tmp}", *(overrides or [])])
        if not cfg.algo_spec.uses_env_hosts:
            raise ConfigError(f"usage error: saferl bench soak kills env hosts; {cfg.algo} has none")
        started = _connect(cfg)
        try:
            coord = Coordinator(cfg, rundir.new_run_dir(cfg), console=console)
            kills, stop, attempts, collect = [], threading.Event(), [], coord.collect
            coord.collect = lambda: (attempts.append(1), collect())[1]  # a kill mid-call fails an attempt
            try:
                here = ray.get_runtime_context().get_node_id()
                if set(ray.get([h.node_id.remote() for h in coord.loop.hosts])) != {here}:
                    raise ConfigError("usage error: saferl bench soak kills env-host processes on this "
                                      "machine: run it on a local Ray (unset RAY_ADDRESS)")
                killer = threading.Thread(target=_kill_hosts, daemon=True,
                                          args=(coord, kill_every, random.Random(seed), stop, kills, say))
                t = time.perf_counter()
                killer.start()
                try:
                    coord.run()
                finally:
                    stop.set()
                    killer.join()
                wall = time.perf_counter() - t
                state, run_dir = coord.state, coord.run_dir
            finally:
                coord.close()
            rows = pd.read_csv(run_dir / "metrics.csv")["iteration"].tolist()
            ckpt = rundir.load_checkpoint(run_dir, cfg)
            ev = evaluate(run_dir, episodes)
        finally:
            if started:
                ray.shutdown()
    sent = [k for k in kills if k["sent"]]
    result = {"algo": cfg.algo, "task": cfg.task, "seed": seed, "env_hosts": hosts,
              "envs_per_host": cfg.resources.envs_per_host, "kill_every_s": kill_every,
              "env_steps": state.env_steps, "iterations": state.iteration,
              "iterations_planned": coord.total_iterations(), "kills_sent": len(sent),
              "kills_missed": len(kills) - len(sent), "restarts": state.restarts,
              "attempts_retried": len(attempts) - state.iteration, "wall_s": round(wall, 1),
              "steps_per_s": round(state.env_steps / wall, 1),
              "metrics_rows_ok": rows == list(range(1, state.iteration + 1)),
              "checkpoint_iteration": ckpt["schedule"]["iteration"],
              "checkpoint_restarts": ckpt["schedule"]["restarts"],
              "eval_episodes": ev["episodes"], "eval_return": round(ev["return_mean"], 3),
              "eval_cost": round(ev["cost_mean"], 3), "cost_limit": cfg.limit}
    say(f"soak {cfg.algo} on {cfg.task}: {result['iterations']}/{result['iterations_planned']} iterations, "
        f"{result['env_steps']} env steps in {wall:.0f} s; {len(sent)} kills sent, {state.restarts} restarts counted, "
        f"{result['attempts_retried']} attempts retried; "
        f"metrics rows {'ok' if result['metrics_rows_ok'] else 'WRONG'}; final checkpoint (it "
        f"{result['checkpoint_iteration']}) evaluated: return {ev['return_mean']:.2f}, cost {ev['cost_mean']:.2f}")
    _write(out_dir, "soak", [result], ["setup", "kill every s", "iterations", "env steps", "wall s", "kills sent",
                                       "restarts counted", "attempts retried", "one metrics row per iteration",
                                       "eval return / cost"],
           lambda r: [f"{r['algo']} on {r['task']} ({r['env_hosts']} hosts × {r['envs_per_host']} envs, "
                      f"seed {r['seed']})",
                      f"{r['kill_every_s']:g}", f"{r['iterations']} / {r['iterations_planned']}", r["env_steps"],
                      f"{r['wall_s']:.0f}", r["kills_sent"], r["restarts"], r["attempts_retried"],
                      "yes" if r["metrics_rows_ok"] else "NO",
                      f"{r['eval_return']:.2f} / {r['eval_cost']:.2f} (limit {r['cost_limit']:g})"], say,
           title=f"saferl bench soak: a random env host SIGKILLed every {kill_every:g} s during training")
    return result
