"""sTRPO paper, Appendix D: robustness of trained policies to random-action attacks.

    saferl study robustness RUN_DIR [RUN_DIR ...]
    saferl study robustness runs/a runs/b --alphas 0,0.2,0.5,1 --episodes 1000 --hosts 4

"At each timestep the agent's action is replaced by a uniformly random action with probability
(attack rate) α ∈ {0.0, 0.1, …, 1.0}. For each α we run 1000 episodes and report average reward
and cost." Every run's latest checkpoint is evaluated at every α (``--episodes`` episodes each,
the deterministic mean action unless ``--stochastic``); the random actions are uniform in the
task's action box, per env and step, from the env host's seeded generator, and every α starts
from the same initial states. Outputs in ``--out``:

    robustness.csv   one row per (run, α): run, algo, task, alpha, episodes, return and cost mean
                     and std over the episodes, violation_rate (episodes with cost > the limit)
    robustness.md    mean return / mean cost, a row per α, a column per run
    robustness.png   mean return and mean cost vs α (± std over episodes), a line per run (runs
                     of the same algorithm and task pooled into one line), the cost limit dashed
    study.json       the settings
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from saferl.tools.studies.runner import (
    add_address_argument,
    add_out_argument,
    csv_list,
    record_plan,
    save_figure,
    study_console_and_out,
    write_csv,
)

HELP = "sTRPO App. D: return and cost of trained policies under random-action attacks (attack rate α)"

DEFAULT_ALPHAS = ",".join(f"{a / 10:g}" for a in range(11))
COLUMNS = ["run", "algo", "task", "alpha", "episodes", "return_mean", "return_std", "cost_mean", "cost_std",
           "violation_rate", "cost_limit", "iteration", "run_dir"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="trained runs (their latest checkpoint)")
    p.add_argument("--alphas", type=csv_list, default=csv_list(DEFAULT_ALPHAS),
                   help=f"attack rates in [0, 1] (default {DEFAULT_ALPHAS})")
    p.add_argument("--episodes", type=int, default=20, help="episodes per α per run (default 20; the paper 1000)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--deterministic", dest="deterministic", action="store_true", default=True,
                      help="act with the policy's mean action (default)")
    mode.add_argument("--stochastic", dest="deterministic", action="store_false", help="sample the policy")
    p.add_argument("--hosts", type=int, default=1, help="env hosts evaluating in parallel (default 1)")
    add_out_argument(p, "robustness", note=None)
    add_address_argument(p, "Ray cluster to join (default $RAY_ADDRESS or a local one)")


def _alphas(args) -> list[float]:
    from saferl.config import ConfigError

    alphas = []
    for text in args.alphas:
        try:
            a = float(text)
        except ValueError:
            raise ConfigError(f"usage error: --alphas {text!r} is not a number") from None
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"usage error: --alphas {text}: an attack rate must be in [0, 1]")
        alphas.append(a)
    if not alphas:
        raise ConfigError("usage error: --alphas is empty")
    return list(dict.fromkeys(alphas))


def _runs(args) -> list[dict]:
    """Each run's label, algo, task and limit; fails (one line naming the path) on a folder that
    is not a run or has no checkpoint, before Ray starts."""
    from saferl.cluster import rundir
    from saferl.config import ConfigError

    runs, labels = [], set()
    for text in args.run_dirs:
        path = Path(text).expanduser().resolve()
        cfg = rundir.load_run_config(path)
        if not rundir.checkpoints(path):
            raise ConfigError(f"run error: {path} has no checkpoint to evaluate")
        label = f"{cfg.algo}/{path.name}"
        if label in labels:
            label = f"{cfg.algo}/{path.parent.name}/{path.name}"
        labels.add(label)
        runs.append({"run": label, "algo": cfg.algo, "task": cfg.task, "cost_limit": cfg.limit, "path": path,
                     "cfg": cfg})
    return runs


def _start_ray(cfgs: list, args) -> bool:
    """Join ``--address`` / $RAY_ADDRESS or a running Ray, or start a local one with room for
    ``--hosts`` env hosts. True when this call started Ray."""
    import ray

    from saferl.cluster.session import connect

    if ray.is_initialized() or args.address or os.environ.get("RAY_ADDRESS"):
        return connect(None, address=args.address)
    need = args.hosts * max(c.resources.num_cpus_per_host for c in cfgs)
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), logging_level="warning")
    return True


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def table(rows: list[dict], runs: list[dict], alphas: list[float], episodes: int, deterministic: bool) -> str:
    by = {(r["run"], r["alpha"]): r for r in rows}
    names = [r["run"] for r in runs]
    lines = ["# Robustness to random-action attacks (sTRPO, Appendix D)", "",
             f"Mean episode return / mean episode cost over {episodes} episodes per cell "
             f"({'deterministic mean action' if deterministic else 'sampled actions'}); at each step the "
             "action is replaced by a uniform random one with probability α.", "",
             "| α | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in alphas:
        cells = [f"{_fmt(by[n, a]['return_mean'])} / {_fmt(by[n, a]['cost_mean'])}" if (n, a) in by else "-"
                 for n in names]
        lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
    limits = ", ".join(dict.fromkeys(f"{r['task']} {r['cost_limit']:g}" for r in runs))
    lines += ["", f"Cost limits: {limits}."]
    return "\n".join(lines) + "\n"


def _groups(runs: list[dict], pooled: dict) -> list[tuple[str, float, dict]]:
    """(label, cost limit, {α: (mean, std) of return and cost}) per line of the plot: runs of the
    same algorithm and task pooled (their episodes together), a single run as itself."""
    import numpy as np

    keys: dict[tuple, list[dict]] = {}
    for r in runs:
        keys.setdefault((r["algo"], r["task"]), []).append(r)
    lines = []
    for (algo, task), members in keys.items():
        label = members[0]["run"] if len(members) == 1 else f"{algo} on {task} ({len(members)} runs)"
        curve = {}
        for a in sorted({a for m in members for (n, a) in pooled if n == m["run"]}):
            ret = np.concatenate([pooled[m["run"], a][0] for m in members if (m["run"], a) in pooled])
            cost = np.concatenate([pooled[m["run"], a][1] for m in members if (m["run"], a) in pooled])
            curve[a] = (ret.mean(), ret.std(), cost.mean(), cost.std())
        lines.append((label, members[0]["cost_limit"], curve))
    return lines


def _plot(path: Path, runs: list[dict], pooled: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    limits = set()
    for k, (label, limit, curve) in enumerate(_groups(runs, pooled)):
        if not curve:
            continue
        a = np.array(sorted(curve))
        v = np.array([curve[x] for x in a])
        color = colors[k % len(colors)]
        for ax, mean, std in ((ax_r, v[:, 0], v[:, 1]), (ax_c, v[:, 2], v[:, 3])):
            ax.plot(a, mean, marker="o", markersize=3, color=color, label=label)
            ax.fill_between(a, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        limits.add(limit)
    for i, limit in enumerate(sorted(limits)):
        ax_c.axhline(limit, color="k", linestyle="--", linewidth=1, label="cost limit" if i == 0 else None)
    for ax, name in ((ax_r, "mean episode return"), (ax_c, "mean episode cost")):
        ax.set_xlabel("attack rate α")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, "Random-action attacks (± std over episodes)")


def run(args) -> Path:
    import numpy as np

    from saferl.config import ConfigError

    alphas = _alphas(args)
    if args.episodes <= 0 or args.hosts <= 0:
        raise ConfigError("usage error: --episodes and --hosts must be > 0")
    runs = _runs(args)
    console, out = study_console_and_out("robustness", args)
    record_plan(out, console, {
        "alphas": alphas, "episodes": args.episodes, "deterministic": args.deterministic, "hosts": args.hosts,
        "runs": [{k: (str(v) if k == "path" else v) for k, v in r.items() if k != "cfg"} for r in runs]},
        f"study robustness: {len(runs)} run(s) × {len(alphas)} attack rates × {args.episodes} episodes")
    import ray

    from saferl.tools.evaluate import evaluate_attack_rates

    t0 = time.perf_counter()
    rows: list[dict] = []
    pooled: dict[tuple[str, float], tuple] = {}
    started = _start_ray([r["cfg"] for r in runs], args)
    try:
        for i, r in enumerate(runs):
            t1 = time.perf_counter()
            results = evaluate_attack_rates(r["path"], args.episodes, alphas, args.deterministic, args.hosts)
            for a, res in zip(alphas, results):
                rows.append({"run": r["run"], "algo": r["algo"], "task": r["task"], "alpha": a,
                             "run_dir": str(r["path"]), **{k: res[k] for k in (
                                 "episodes", "return_mean", "return_std", "cost_mean", "cost_std",
                                 "violation_rate", "cost_limit", "iteration")}})
                pooled[r["run"], a] = (np.array(res["returns"]), np.array(res["costs"]))
            write_csv(out / "robustness.csv", COLUMNS, rows)
            (out / "robustness.md").write_text(table(rows, runs, alphas, args.episodes, args.deterministic))
            first, last = results[0], results[-1]
            console.print(f"[{i + 1}/{len(runs)}] {r['run']}: α={alphas[0]:g} return {first['return_mean']:.4g} "
                          f"cost {first['cost_mean']:.4g} … α={alphas[-1]:g} return {last['return_mean']:.4g} "
                          f"cost {last['cost_mean']:.4g} ({time.perf_counter() - t1:.0f} s)", markup=False)
    finally:
        if started:
            ray.shutdown()
    _plot(out / "robustness.png", runs, pooled)
    console.print(table(rows, runs, alphas, args.episodes, args.deterministic), markup=False)
    console.print(f"{len(rows)} evaluations in {time.perf_counter() - t0:.0f} s; "
                  f"robustness.csv, robustness.md, robustness.png in {out}")
    return out
