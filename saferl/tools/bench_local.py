"""Benchmarks that run in one process without Ray, on any machine that has the learners' stack:

- ``saferl bench learner``: learner update throughput on fixed synthetic batches at each
  algorithm's default config;
- ``saferl bench device``: the same work on the CPU and on each accelerator torch sees (learner
  updates, the inference server's batched forward and sampling, gradient-worker windows through a
  differentiable simulator), to decide where a run's learner, inference server and gradient
  workers should go.

Ray is not imported here (a learner actor's class is used as a plain object), so both run where
Ray is not installed; only a Safety-Gymnasium task's env spec needs that task's interpreter
(``--specs`` supplies it instead).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from saferl.config import REPO_ROOT, load_config


def write_table(out_dir: Path, name: str, rows: list[dict], header: list[str], cells, say, title: str = "") -> None:
    """``<name>.json`` (the rows) and ``<name>.md`` (a table) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows]
    (out_dir / f"{name}.md").write_text((f"{title}\n\n" if title else "") + "\n".join(lines) + "\n")
    say(f"results: {out_dir / (name + '.json')}, {out_dir / (name + '.md')}")



# -- learner update throughput ------------------------------------------------------------------
LEARNER_CONFIGS = {"ppo_lag": "ppo_lag/SafetyPointGoal1-v0", "sac_lag": "sac_lag/SafetyPointGoal1-v0",
                   "cvpo": "cvpo/SafetyCarButton1-v0", "cgpo": "cgpo/BraxReacher-v0"}
OFFPOLICY_MINIBATCHES = 50  # minibatches per timed off-policy update call (the rate does not depend on it)


def task_spec(cfg, specs: dict | None = None) -> dict:
    """The task's env spec (``EnvSpec`` fields): ``specs[task]`` if given, else built from the
    task, in the interpreter its env hosts use."""
    from saferl.learners.base import EnvSpec

    if specs and cfg.task in specs:
        return EnvSpec(**specs[cfg.task]).model_dump()
    if not cfg.algo_spec.uses_env_hosts:
        from saferl.actors.gradient_worker import make_diff_env
        return EnvSpec.of_env(make_diff_env(cfg.task)).model_dump()
    if cfg.task_spec.kind == "safety_gymnasium":  # built in its own interpreter, as its env hosts are
        from saferl.cluster.placement import sg_python

        out = subprocess.run([sg_python(cfg), "-c", "import json,sys; from saferl.actors.env_host import EnvHost;"
                              "print(json.dumps(EnvHost(sys.argv[1], 1, 0).spec(), default=lambda x: x.tolist()))",
                              cfg.task],
                             capture_output=True, text=True, check=True, cwd=REPO_ROOT)
        spec = json.loads(out.stdout.strip().splitlines()[-1])
    else:  # here, without Ray: a machine with only the learner's packages can still benchmark it
        from saferl.actors.env_host import EnvHost
        spec = EnvHost(cfg.task, 1, 0).spec()
    return EnvSpec.of(spec).model_dump()


def _synthetic_rollout(rng, T: int, n: int, d: int, a: int, episode: int) -> dict:
    """A host batch [T, N] of random numbers with the rollout's fields and episode ends."""
    t = np.arange(T)[:, None] + np.zeros((1, n), int)
    trunc = (t + 1) % episode == 0
    final_idx = np.argwhere(trunc)
    cost = (rng.random((T, n)) < 0.05).astype(np.float32)
    to_t = np.cumsum(cost, axis=0, dtype=np.float64)  # each episode's cost: to its end minus to its start
    before = np.where(final_idx[:, 0] >= episode, to_t[final_idx[:, 0] - episode, final_idx[:, 1]], 0.0)
    return {"obs": rng.standard_normal((T, n, d), np.float32), "act": rng.standard_normal((T, n, a), np.float32),
            "logp": rng.standard_normal((T, n)).astype(np.float32),
            "reward": rng.standard_normal((T, n)).astype(np.float32),
            "cost": cost, "terminated": np.zeros((T, n), bool),
            "truncated": trunc, "last_obs": rng.standard_normal((n, d), np.float32),
            "final_idx": final_idx.astype(np.int64), "final_obs": rng.standard_normal((len(final_idx), d), np.float32),
            "final_cost": to_t[final_idx[:, 0], final_idx[:, 1]] - before,
            "final_length": np.full(len(final_idx), episode, np.int64)}


def _learner_inputs(cfg, spec: dict, rng) -> tuple[list, int, str]:
    """(update input, samples in it, what a sample is) at the config's batch settings."""
    res, kind = cfg.resources, cfg.algo_spec.kind
    n, d, a = res.num_env_hosts * res.envs_per_host, spec["obs_dim"], spec["act_dim"]
    if kind == "sampling":
        T = cfg.steps_per_iteration // n
        batches = [_synthetic_rollout(rng, T, res.envs_per_host, d, a, spec["max_episode_steps"])
                   for _ in range(res.num_env_hosts)]
        return batches, T * n, "env steps in the batch"
    if kind == "offpolicy":
        b, k = cfg.learner_params().batch_size, OFFPOLICY_MINIBATCHES
        block = {"obs": rng.standard_normal((k, b, d), np.float32),
                 "act": rng.uniform(-1, 1, (k, b, a)).astype(np.float32),
                 "reward": rng.standard_normal((k, b)).astype(np.float32),
                 "cost": (rng.random((k, b)) < 0.05).astype(np.float32),
                 "discount": np.full((k, b), 0.99, np.float32), "next_obs": rng.standard_normal((k, b, d), np.float32)}
        return [block], k * b, "transitions (minibatch rows)"
    raise ValueError(kind)


def bench_learner(out_dir: Path, algos: list[str], updates: int = 3, device: str = "cpu",
                  specs: dict | None = None, overrides: tuple[str, ...] = (), console=None) -> list[dict]:
    """``saferl bench learner``: learner update throughput, in-process (no Ray), at each
    algorithm's default config (network sizes, batch settings). Inputs are fixed: random host
    batches (on-policy), random minibatch blocks (off-policy), or the shard results of in-process
    gradient workers computed once (gradient algorithms). One warm-up update, then ``updates``
    timed ones on the same input. On-policy learners with minibatches also get the time per
    minibatch step (a policy and a critic step): s per update / (passes run × minibatches per pass)."""
    say = console.print if console else print
    with _one_thread():
        rows = [_bench_one_learner(algo, updates, say, device, specs, overrides) for algo in algos]
    write_table(out_dir, "learner", rows, ["algo", "config task", "device", "hidden", "samples per update",
                                           "sample", "s per update", "samples/s", "GFLOP per update",
                                           "GFLOP/s (a matmul's at the layer shape)"],
                lambda r: [r["algo"], r["task"], r["device"], r["hidden"], r["samples_per_update"],
                           r["sample"] + (f"; passes run: {r['epochs']}" if "epochs" in r else "")
                           + (f"; {r['ms_per_minibatch_step']} ms per minibatch step"
                              if "ms_per_minibatch_step" in r else ""),
                           f"{r['s_per_update']:.3f}", f"{r['samples_per_s']:,.0f}", r["gflop_per_update"],
                           _fmt_rate(r)], say)
    return rows


def _fmt_rate(r: dict) -> str:
    """'achieved (of the layer-shaped product's rate at its shape)', e.g. '47.3 (of 101.1 at 256×256×256)';
    '–' for the achieved rate where it is left out."""
    got = "–" if r["gflop_per_s"] is None else f"{r['gflop_per_s']}"
    return f"{got} (of {r['matmul_gflop_per_s']} at {'×'.join(map(str, r['matmul_shape']))})"


@contextlib.contextmanager
def _one_thread():
    """One torch thread, as in a 1-CPU actor (Ray sets OMP_NUM_THREADS=1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _bench_one_learner(algo: str, updates: int, say, device: str = "cpu", specs: dict | None = None,
                       overrides: tuple[str, ...] = ()) -> dict:
    import torch

    from saferl.actors.learner import LearnerActor
    from saferl.config import CONFIG_DIR

    cfg = load_config(CONFIG_DIR / f"{LEARNER_CONFIGS.get(algo, algo)}.yaml", list(overrides))
    spec = task_spec(cfg, specs)
    torch.manual_seed(0)
    learner = LearnerActor(cfg.algo, cfg.algo_params, spec, cfg.limit, cfg.seed, device)
    if cfg.algo_spec.kind == "gradient":
        from saferl.actors.gradient_worker import GradientWorker
        setup, res = learner.gradient_setup(), cfg.resources
        n = res.num_env_hosts * res.envs_per_host
        workers = [GradientWorker(cfg.task, i * res.envs_per_host, res.envs_per_host, n, cfg.seed,
                                  setup["arch"], device) for i in range(res.num_env_hosts)]
        weights = learner.policy_state()
        inputs = [w.compute(weights, 0, setup["horizon"], setup["stochastic"])[0] for w in workers]
        samples, unit = n * setup["horizon"], "env steps (one window of every env)"
    else:
        inputs, samples, unit = _learner_inputs(cfg, spec, np.random.default_rng(0))
        if cfg.algo_spec.kind == "sampling":  # actions and log-probs of the learner's own policy
            from saferl.actors import np_policy
            rng, policy = np.random.default_rng(1), learner.numpy_policy()
            for b in inputs:
                T, n, d = b["obs"].shape
                _, u, logp = np_policy.act(policy, b["obs"].reshape(T * n, d), rng)
                b["act"], b["logp"] = u.reshape(T, n, -1).astype(np.float32), logp.reshape(T, n).astype(np.float32)
    learner.update(inputs)  # warm-up; an update returns floats, so each timed one ends synchronised
    t, epochs = time.perf_counter(), []
    for _ in range(updates):
        epochs.append(learner.update(inputs).get("epochs"))
    dt = (time.perf_counter() - t) / updates
    hidden = cfg.algo_params.get("hidden")
    row = {"algo": cfg.algo, "task": cfg.task, "device": learner.device_name(), "hidden": hidden,
           "samples_per_update": samples, "sample": unit, "s_per_update": round(dt, 4),
           "samples_per_s": round(samples / dt, 1), "threads": torch.get_num_threads()}
    if epochs[0] is not None:  # on-policy: passes over the batch run (early stop at target_kl)
        row["epochs"] = [int(e) for e in epochs]
        mb = getattr(learner.learner.p, "minibatch_size", None)
        if mb:  # one policy step and one critic step per minibatch
            steps = sum(row["epochs"]) / updates * math.ceil(samples / mb)
            row["ms_per_minibatch_step"] = round(dt * 1e3 / steps, 3)
    if cfg.algo_spec.kind == "offpolicy":
        row["minibatch_size"] = samples // OFFPOLICY_MINIBATCHES
        row["minibatches_per_s"] = round(OFFPOLICY_MINIBATCHES / dt, 1)
    row.update(_arithmetic(learner, inputs, epochs, dt, cfg, device))
    say(f"{cfg.algo:>8} ({cfg.task}, hidden {hidden}, {row['device']}): {samples} samples per update in "
        f"{dt:.3f} s -> {samples / dt:,.0f} samples/s")
    return row


def _arithmetic(learner, inputs, epochs: list, dt: float, cfg, device: str) -> dict:
    """How close an update runs to the arithmetic rate of the device: the floating-point
    operations of one more update (torch's FLOP counter, which counts matrix products and
    convolutions: nearly all of a learner's arithmetic) over the timed updates' time, beside the
    rate of one matrix product of the learner's own shape (minibatch rows × widest layer) on the
    same device and threads. The rate is left out where the counted update ran a different number
    of passes from the timed ones (the KL stop) or where the counter sees nothing (a CUDA graph's
    replays bypass it)."""
    from torch.utils.flop_counter import FlopCounterMode

    inner, params = learner.learner, learner.learner.p
    if getattr(params, "parallel_critics", "off") != "off":  # the counter sees only this thread's operations
        inner.p = params.model_copy(update={"parallel_critics": "off"})  # the same floats (CriticLane)
    try:
        with FlopCounterMode(display=False) as counter:
            passes = learner.update(inputs).get("epochs")
    finally:
        inner.p = params
    flops = counter.get_total_flops()
    rows = getattr(params, "minibatch_size", None) or getattr(params, "batch_size", None) or 256
    width = max(cfg.algo_params.get("hidden") or [256])
    same_work = flops > 0 and all(e == passes for e in epochs)
    return {"gflop_per_update": round(flops / 1e9, 3),
            "gflop_per_s": round(flops / 1e9 / dt, 1) if same_work else None,
            "matmul_gflop_per_s": round(matmul_rate(rows, width, device), 1), "matmul_shape": [rows, width, width]}


def matmul_rate(rows: int, width: int, device: str = "cpu", repeats: int = 200) -> float:
    """GFLOP/s of a [rows, width] × [width, width] matrix product on ``device`` (best of five):
    what this device's kernels reach on a learner layer's shape, at the caller's torch threads."""
    import torch

    a, b = torch.randn(rows, width, device=device), torch.randn(width, width, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(20):
        a @ b
    best = math.inf
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * rows * width * width / best / 1e9


# -- the same work on each device ---------------------------------------------------------------
def devices_here() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def machine() -> dict:
    """What the numbers were measured on."""
    import platform

    import torch

    info = {"cpu_cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import jax
        info["jax"], info["jax_devices"] = jax.__version__, [str(d) for d in jax.devices()]
    except ImportError:
        pass
    return info


def bench_inference(out_dir: Path, devices: list[str], batches: list[int], hidden: list[int], repeats: int = 20,
                    console=None) -> list[dict]:
    """The inference server's ``act`` (one forward of every host's observations, sampled and put
    in the action box) for a batch of observations, per device."""
    from saferl.actors.inference import InferenceServer
    from saferl.learners.networks import GaussianPolicy

    say, rows = console.print if console else print, []
    obs_dim, act_dim = 60, 2  # SafetyPointGoal1's
    policy = GaussianPolicy(obs_dim, act_dim, hidden).export_numpy()
    low, high = -np.ones(act_dim, np.float32), np.ones(act_dim, np.float32)
    with _one_thread():
        for device in devices:
            server = InferenceServer(low, high, device)
            server.set_policy(policy, 0)
            for n in batches:
                obs = np.random.default_rng(0).standard_normal((n, obs_dim), np.float32)
                server.act(obs)  # warm-up
                t = time.perf_counter()
                for _ in range(repeats):
                    server.act(obs)
                dt = (time.perf_counter() - t) / repeats
                rows.append({"device": server.device_name(), "hidden": hidden, "batch": n,
                             "ms_per_act": round(dt * 1e3, 3), "obs_per_s": round(n / dt, 1)})
                say(f"inference {rows[-1]['device']:>6} batch {n:>6}: {dt * 1e3:8.3f} ms per act, "
                    f"{n / dt:12,.0f} obs/s")
    write_table(out_dir, "inference", rows, ["device", "hidden", "batch (obs)", "ms per act", "obs/s"],
                lambda r: [r["device"], r["hidden"], r["batch"], r["ms_per_act"], f"{r['obs_per_s']:,.0f}"], say)
    return rows


def gradient_weights(task: str, hidden: tuple[int, ...] = (64, 64)) -> tuple[dict, dict]:
    """(arch, weights) of a fresh policy and time-indexed critics for ``task``'s gradient workers."""
    from saferl.actors.gradient_worker import make_diff_env
    from saferl.learners.analytic import TimeValue
    from saferl.learners.networks import GaussianPolicy

    env = make_diff_env(task)
    arch = {"policy": dict(obs_dim=env.obs_dim, act_dim=env.act_dim, hidden=list(hidden), squash=True),
            "critic_hidden": list(hidden)}
    critic = TimeValue(env.obs_dim, list(hidden), env.max_episode_steps)
    weights = {"policy": GaussianPolicy(**arch["policy"]).state_dict(), "v_r": critic.state_dict(),
               "v_c": critic.state_dict()}
    return arch, weights


def bench_worker_windows(out_dir: Path, devices: list[str], tasks: list[str], envs: list[int], horizon: int,
                         windows: int, console=None) -> list[dict]:
    """One gradient worker's windows (forward and backward through the simulator, critics
    included) per device and number of envs; the first window (compilation, allocation) apart."""
    from saferl.actors.gradient_worker import GradientWorker

    say, rows = console.print if console else print, []
    with _one_thread():
        for task in tasks:
            arch, weights = gradient_weights(task)
            for device in devices:
                for n in envs:
                    worker = GradientWorker(task, 0, n, n, 0, arch, device)
                    t = time.perf_counter()
                    worker.compute(weights, 0, horizon)
                    first = time.perf_counter() - t
                    t = time.perf_counter()
                    for k in range(1, windows + 1):
                        worker.compute(weights, k, horizon)
                    dt = time.perf_counter() - t
                    sps = n * horizon * windows / dt
                    rows.append({"task": task, "device": str(worker.device), "envs": n, "horizon": horizon,
                                 "first_window_s": round(first, 2), "steps_per_s": round(sps, 1)})
                    say(f"{task} {rows[-1]['device']:>6} × {n:>5} envs, h={horizon}: {sps:10,.0f} "
                        f"differentiated steps/s (first window {first:.1f} s)")
    write_table(out_dir, "worker_windows", rows, ["task", "device", "envs", "h", "differentiated steps/s",
                                                  "first window s"],
                lambda r: [r["task"], r["device"], r["envs"], r["horizon"], f"{r['steps_per_s']:,.0f}",
                           r["first_window_s"]], say)
    return rows


def _learner_row(algo: str, updates: int, say, device: str, specs: dict | None, overrides: tuple[str, ...]) -> dict:
    """``_bench_one_learner``'s row, or the error that stopped it (the other rows still run)."""
    try:
        return _bench_one_learner(algo, updates, say, device, specs, overrides)
    except Exception as err:  # noqa: BLE001 -- reported in the table and the exit status
        say(f"{algo} on {device} failed: {err!r}")
        return {"algo": algo, "device": device, "error": f"failed: {type(err).__name__}: {err}"[:200]}


def bench_device(out_dir: Path, algos: list[str], updates: int, batches: list[int], tasks: list[str],
                 envs: list[int], horizon: int, windows: int, devices: list[str] | None = None,
                 specs: dict | None = None, overrides: tuple[str, ...] = (), console=None) -> dict:
    """``saferl bench device``: learner updates, inference and gradient-worker windows on each
    device (torch on one thread for the CPU rows, as in a 1-CPU actor); ``device.json`` holds the
    machine and every table's rows."""
    devices = devices or devices_here()
    say = console.print if console else print
    out = {"machine": machine(), "learner": [], "inference": [], "worker_windows": []}
    say(f"machine: {out['machine']}")
    with _one_thread():
        out["learner"] = [_learner_row(a, updates, say, device, specs, overrides) for device in devices for a in algos]
    write_table(out_dir, "learner", out["learner"], ["algo", "device", "samples per update", "s per update",
                                                     "samples/s", "ms per minibatch step",
                                                     "GFLOP/s (a matmul's at the layer shape)"],
                lambda r: [r["algo"], r["device"], r.get("samples_per_update", ""),
                           r.get("s_per_update", r.get("error")),
                           f"{r['samples_per_s']:,.0f}" if "samples_per_s" in r else "",
                           r.get("ms_per_minibatch_step", ""), _fmt_rate(r) if "gflop_per_update" in r else ""], say)
    out["inference"] = bench_inference(out_dir, devices, batches, [64, 64], console=console)
    out["worker_windows"] = bench_worker_windows(out_dir, devices, tasks, envs, horizon, windows, console)
    (out_dir / "device.json").write_text(json.dumps(out, indent=2))
    say(f"results: {out_dir / 'device.json'}")
    return out
