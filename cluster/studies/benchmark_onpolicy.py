"""On-policy benchmark in OmniSafe's format: every on-policy algorithm × Safety-Gymnasium task ×
seed, final Reward and Cost as mean ± std over seeds.

    saferl benchmark onpolicy                  reduced default (2-core machine, ~6 min): SafetyPointGoal1-v0,
                                               every algorithm, 2 seeds, 20,000 env steps per run
                                               (2,000 per iteration), 1 host × 2 envs
    saferl benchmark onpolicy --tasks all --seeds 5 --steps 10000000 --steps-per-iteration 20000 \\
        --hosts 2 --envs 10 --parallel 8 --address auto
                                               OmniSafe's scale (1e7 steps, 20k per iteration, the shipped
                                               configs' 2 hosts × 10 envs) on a Ray cluster
    saferl benchmark onpolicy --algos ppo_lag,cpo --tasks SafetyCarCircle1-v0 --seeds 0,3

A run is ``saferl train <algo>/<task>`` with the shipped config (``configs/<algo>/<task>.yaml``,
its hyper-parameters untouched) and ``total_env_steps``, ``steps_per_iteration`` and the env
hosts from the flags; ``--set`` overrides every run. All runs share one Ray session (a local one,
or a cluster's with ``--address`` / $RAY_ADDRESS). Outputs in ``--out``:

    benchmark.md     per task, one row per algorithm: Reward and Cost, mean ± std over seeds
    summary.csv      the same numbers at full precision (one row per task × algorithm)
    runs.csv         one row per run: final return and cost, logged points, K, wall time, run dir
    curves.csv       (task, algo, seed, env steps, episode return, episode cost) of every run
    curves_<task>.png  return and cost vs env steps per algorithm (mean ± std over seeds), with
                     the cost limit
    benchmark.json   the settings
    runs/            the run directories ``<algo>-<task>-s<seed>``

Re-running with the same ``--out`` keeps finished runs, resumes interrupted ones from their last
checkpoint and recomputes the outputs (so another ``--last-k`` costs no training).

**Final performance.** A run's curve is its logged iterations in which episodes finished (every
iteration is logged): R_i, C_i = mean return / cost of the episodes that ended in iteration i.
Its final Reward and Cost are the means of R_i and C_i over its last K points, K = ``--last-k``
or by default the last 10% of its points (at least 1). The table shows mean ± sample std
(ddof 1) of these over the seeds; "(k/n)" when only k of n seeds finished an episode.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saferl.cluster.studies.runner import (FINAL_FRACTION, csv_list, fail_if_any_failed, final_performance,
                                           format_mean_std, parse_seeds, plan_job, plot_mean_std, read_curve, run_jobs,
                                           save_figure, study_console_and_out, summarise, warn_if_no_episode,
                                           write_csv)

HELP = "on-policy algorithms × Safety-Gymnasium tasks: OmniSafe-style Reward/Cost table (mean ± std), curves"

# The benchmark's algorithms, table row order. A new on-policy algorithm is one more name here
# (and its configs/<algo>/<task>.yaml for every task below: tests/test_shipped_configs.py checks).
ONPOLICY_ALGOS = ("ppo", "trpo", "ppo_lag", "trpo_lag", "cppo_pid", "rcpo", "focops", "cup", "cpo", "pcpo", "strpo")
SAFETY_GYM_TASKS = ("SafetyPointGoal1-v0", "SafetyCarGoal1-v0", "SafetyCarCircle1-v0", "SafetyPointButton1-v0",
                    "SafetyAntVelocity-v1", "SafetyHopperVelocity-v1")
ALGO_LABELS = {"ppo": "PPO", "trpo": "TRPO", "ppo_lag": "PPOLag", "trpo_lag": "TRPOLag", "cppo_pid": "CPPOPID",
               "rcpo": "RCPO", "focops": "FOCOPS", "cup": "CUP", "cpo": "CPO", "pcpo": "PCPO",
               "strpo": "sTRPO"}
DEFAULTS = {"tasks": ("SafetyPointGoal1-v0",), "seeds": "2", "steps": 20_000, "steps_per_iteration": 2_000,
            "hosts": "1", "envs": "2"}


def label(algo: str) -> str:
    return ALGO_LABELS.get(algo, algo.upper())


# ---------------------------------------------------------------------------------------------
# the numbers (pure functions; unit-tested)
# ---------------------------------------------------------------------------------------------
def summary_rows(records: list[dict], tasks: list[str], algos: list[str]) -> list[dict]:
    """Per (task, algo): mean and sample std over seeds of the runs' final return and cost."""
    rows = []
    for task in tasks:
        for algo in algos:
            rs = [r for r in records if r["task"] == task and r["algo"] == algo and r["status"].startswith("ok")]
            if not rs:
                continue
            rets, costs = [r.get("final_return") for r in rs], [r.get("final_cost") for r in rs]
            r_mean, r_std, n = summarise(rets)
            c_mean, c_std, _ = summarise(costs)
            rows.append({"task": task, "algo": algo, "label": label(algo), "seeds": len(rs), "seeds_with_episodes": n,
                         "reward_mean": r_mean, "reward_std": r_std, "cost_mean": c_mean, "cost_std": c_std,
                         "cost_limit": rs[0]["cost_limit"], "total_env_steps": rs[0]["total_env_steps"],
                         "reward": format_mean_std(rets), "cost": format_mean_std(costs)})
    return rows


def table(records: list[dict], tasks: list[str], algos: list[str], s: dict) -> str:
    """OmniSafe's benchmark layout: per task, one row per algorithm, Reward and Cost as mean ± std."""
    k_text = f"K = {s['last_k']}" if s["last_k"] else f"K = the last {FINAL_FRACTION:.0%} of its points, at least 1"
    lines = ["# On-policy benchmark", "",
             f"{len(s['seeds'])} seed(s) per row ({', '.join(map(str, s['seeds']))}); {s['steps']:,} env steps per "
             f"run, {s['steps_per_iteration']:,} per iteration; final performance of a run = mean episode return / "
             f"cost over its last K logged iterations ({k_text}); mean ± std (ddof 1) over seeds.", ""]
    rows = summary_rows(records, tasks, algos)
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        limit = next((r["cost_limit"] for r in mine), None)
        lines += [f"## {task}" + (f" (cost limit {limit:g})" if limit is not None else ""), "",
                  "| Algorithm | Reward | Cost |", "|---|---|---|"]
        lines += [f"| {r['label']} | {r['reward']} | {r['cost']} |" for r in mine]
        lines.append("")
    failed = [r for r in records if not r["status"].startswith("ok")]
    if failed:
        lines.append(f"{len(failed)} run(s) failed and are left out; see runs.csv.")
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "\n\n".join(__doc__.split("\n\n")[:2])  # what it does, the reduced and the cluster commands
    p.epilog = (f"--tasks all = {','.join(SAFETY_GYM_TASKS)}. Outputs: benchmark.md, summary.csv, runs.csv, "
                "curves.csv, curves_<task>.png, benchmark.json, runs/.")
    p.add_argument("--algos", type=csv_list, default=list(ONPOLICY_ALGOS),
                   help=f"comma-separated algorithms, table row order (default all: {','.join(ONPOLICY_ALGOS)})")
    p.add_argument("--tasks", type=csv_list, default=None,
                   help=f"comma-separated tasks, or 'all' for the six (default {','.join(DEFAULTS['tasks'])})")
    p.add_argument("--seeds", default=None,
                   help=f"N for seeds 0..N-1, or a comma list of seeds (default {DEFAULTS['seeds']}; OmniSafe 5)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help=f"env steps per run (default {DEFAULTS['steps']:,}; OmniSafe 10000000)")
    p.add_argument("--steps-per-iteration", type=int, default=DEFAULTS["steps_per_iteration"],
                   help=f"env steps per iteration over all envs (default {DEFAULTS['steps_per_iteration']:,}; "
                        "OmniSafe 20000)")
    p.add_argument("--hosts", default=DEFAULTS["hosts"],
                   help=f"env hosts per run, or 'config' (default {DEFAULTS['hosts']}; the configs have 2)")
    p.add_argument("--envs", "--envs-per-host", dest="envs", default=DEFAULTS["envs"],
                   help=f"envs per env host, or 'config' (default {DEFAULTS['envs']}; the configs have 10)")
    p.add_argument("--unsafe-steps", type=int, default=None,
                   help="sTRPO's stage-1 budget (its unsafe policy; extra env steps, reported in runs.csv); "
                   "default half of --steps")
    p.add_argument("--last-k", type=int, default=None,
                   help="final performance over a run's last K logged iterations (default the last 10%%, at least 1)")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at the same time (default 1)")
    p.add_argument("--out", default=None, help="output folder (default runs/studies/benchmark-onpolicy-<time>); "
                   "an existing one is continued")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. resources.num_gpus_per_learner=0.25")
    p.add_argument("--address", default=None, help="Ray cluster to join (default $RAY_ADDRESS; none: a local one)")


def _count(text: str, flag: str) -> int | str:
    from saferl.config import ConfigError

    if str(text).lower() == "config":
        return "config"
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"usage error: {flag} {text!r}: expected a number or 'config'") from None
    if n <= 0:
        raise ConfigError(f"usage error: {flag} must be > 0 (got {n})")
    return n


def _settings(args) -> dict:
    from saferl import registry
    from saferl.config import ConfigError

    tasks = args.tasks or list(DEFAULTS["tasks"])
    if [t.lower() for t in tasks] == ["all"]:
        tasks = list(SAFETY_GYM_TASKS)
    seeds = parse_seeds(args.seeds or DEFAULTS["seeds"])
    if not args.algos or not tasks:
        raise ConfigError("usage error: --algos and --tasks need at least one name")
    for flag, v in (("--steps", args.steps), ("--steps-per-iteration", args.steps_per_iteration),
                    ("--parallel", args.parallel), ("--last-k", args.last_k)):
        if v is not None and v <= 0:
            raise ConfigError(f"usage error: {flag} must be > 0 (got {v})")
    for t in tasks:
        if t not in registry.TASKS:
            raise ConfigError(f"usage error: unknown task {t!r}; the benchmark's: {', '.join(SAFETY_GYM_TASKS)}")
    for a in args.algos:
        if a not in registry.ALGORITHMS:
            raise ConfigError(f"usage error: unknown algorithm {a!r}; the benchmark's: {', '.join(ONPOLICY_ALGOS)}")
        if registry.ALGORITHMS[a].kind != "sampling":
            raise ConfigError(f"usage error: {a} is not an on-policy (sampling) algorithm")
    return {"algos": list(args.algos), "tasks": tasks, "seeds": seeds, "steps": args.steps,
            "steps_per_iteration": args.steps_per_iteration, "hosts": _count(args.hosts, "--hosts"),
            "envs": _count(args.envs, "--envs"), "last_k": args.last_k, "set": list(args.set),
            "unsafe_steps": args.unsafe_steps or max(1, args.steps // 2)}


def _overrides(s: dict) -> list[str]:
    out = [f"total_env_steps={s['steps']}", f"steps_per_iteration={s['steps_per_iteration']}"]
    if s["hosts"] != "config":
        out.append(f"resources.num_env_hosts={s['hosts']}")
    if s["envs"] != "config":
        out.append(f"resources.envs_per_host={s['envs']}")
    return out


def _plan(s: dict, out: Path) -> list[dict]:
    """Every (task, algo, seed) config, validated before anything runs."""
    stage1 = {"strpo": [f"algo_params.unsafe_steps={s['unsafe_steps']}"]}
    return [plan_job(algo, task, seed, out, _overrides(s) + stage1.get(algo, []), s["set"])
            for task in s["tasks"] for algo in s["algos"] for seed in s["seeds"]]


def _measure(record: dict, s: dict) -> tuple[dict, list[tuple]]:
    """Add the final performance to a run's record; return its curve rows."""
    path = Path(record["run_dir"]) / "metrics.csv"
    if not record["status"].startswith("ok") or not path.is_file():
        return record, []
    x, ret, cost = read_curve(path)
    final_r, final_c, k = final_performance(ret, cost, s["last_k"])
    record.update(final_return=final_r, final_cost=final_c, n_points=len(x), last_k=k)
    return record, [(record["task"], record["algo"], record["seed"], xi, ri, ci) for xi, ri, ci in zip(x, ret, cost)]


RUN_COLUMNS = ["task", "algo", "seed", "status", "final_return", "final_cost", "n_points", "last_k", "cost_limit",
               "total_env_steps", "num_envs", "wall_s", "run_dir"]
SUMMARY_COLUMNS = ["task", "algo", "label", "seeds", "seeds_with_episodes", "reward_mean", "reward_std", "cost_mean",
                   "cost_std", "cost_limit", "total_env_steps"]
CURVE_COLUMNS = ["task", "algo", "seed", "env_steps", "episode_return", "episode_cost"]


def _write(out: Path, records: list[dict], s: dict) -> None:
    order = {a: i for i, a in enumerate(s["algos"])}
    write_csv(out / "runs.csv", RUN_COLUMNS,
              sorted(records, key=lambda r: (r["task"], order.get(r["algo"], 0), r["seed"])))
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows(records, s["tasks"], s["algos"]))
    (out / "benchmark.md").write_text(table(records, s["tasks"], s["algos"], s))


def _plot(out: Path, curves: list[tuple], records: list[dict], s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for task in s["tasks"]:
        fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
        for a, algo in enumerate(s["algos"]):
            series: dict[int, list] = {}
            for t, al, seed, x, ret, cost in curves:
                if t == task and al == algo:
                    series.setdefault(seed, []).append((x, ret, cost))
            if not series:
                continue
            color = colors[a % len(colors)]
            for ax, col in ((ax_r, 1), (ax_c, 2)):
                plot_mean_std(ax, [np.array(sorted(v))[:, [0, col]] for v in series.values()], color, label(algo))
        limit = next((r["cost_limit"] for r in records if r["task"] == task), None)
        if limit is not None:
            ax_c.axhline(limit, color="k", linestyle="--", linewidth=1, label=f"cost limit {limit:g}")
        for ax, name in ((ax_r, "episode return"), (ax_c, "episode cost")):
            ax.set_xlabel("env steps")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        save_figure(fig, out / f"curves_{task}.png", f"{task}: on-policy benchmark (mean ± std over seeds)")


def run(args) -> Path:
    s = _settings(args)
    console, out = study_console_and_out("benchmark-onpolicy", args)
    jobs = _plan(s, out)  # every config validated before anything is created or started
    out.mkdir(parents=True, exist_ok=True)
    for job in jobs[:: len(s["seeds"])]:  # one warning per (task, algo)
        warn_if_no_episode(job, console)
    (out / "benchmark.json").write_text(json.dumps({**s, "runs": [{k: j[k] for k in (
        "task", "algo", "seed", "config", "overrides")} for j in jobs]}, indent=2))
    console.print(f"benchmark onpolicy: {len(jobs)} runs ({len(s['tasks'])} task(s) × {len(s['algos'])} algorithms × "
                  f"{len(s['seeds'])} seeds, {s['steps']:,} env steps each) into {out}")
    t0 = time.perf_counter()
    curves: list[tuple] = []
    done: list[dict] = []

    def finish(record: dict, tag: str) -> None:
        record, rows = _measure(record, s)
        done.append(record)
        curves.extend(rows)
        _write(out, done, s)  # partial results while a long benchmark runs
        if record.get("final_return") is not None:
            console.print(f"{tag} done {record['algo']} on {record['task']} seed {record['seed']} in "
                          f"{record.get('wall_s', 0):.0f} s: final return {record['final_return']:.3g}, cost "
                          f"{record['final_cost']:.3g} (limit {record['cost_limit']:g}; last {record['last_k']} of "
                          f"{record['n_points']} points)")

    records = run_jobs(jobs, args, console, finish)
    _write(out, records, s)
    write_csv(out / "curves.csv", CURVE_COLUMNS,
              [dict(zip(CURVE_COLUMNS, c)) for c in sorted(curves, key=lambda c: c[:4])])
    _plot(out, curves, records, s)
    console.print((out / "benchmark.md").read_text())
    console.print(f"{len(records)} runs in {time.perf_counter() - t0:.0f} s; benchmark.md, summary.csv, runs.csv, "
                  f"curves.csv, curves_<task>.png in {out}")
    fail_if_any_failed(records, out)
    return out
