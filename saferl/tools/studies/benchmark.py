"""What ``saferl benchmark onpolicy`` and ``saferl benchmark offpolicy`` share: every algorithm ×
task × seed of a ``Preset`` trained with its shipped config, and OmniSafe's table (final Reward
and Cost as mean ± std over seeds), curves and raw numbers from the runs' metrics.csv.

A preset (``benchmark_onpolicy.PRESET``, ``benchmark_offpolicy.PRESET``) names the algorithms
(table row order), the task list (``--tasks all``), the registry kind every algorithm must have,
the reduced defaults of the command line, the per-job overrides beyond the shared ones
(``total_env_steps``, ``steps_per_iteration``, the env hosts), and whether the outputs include
CVPO's Figure 4 (reward vs cumulative cost). The modules import the stdlib only at module level.

**Final performance.** A run's curve is its logged iterations in which episodes finished (every
iteration is logged): R_i, C_i = mean return / cost of the episodes that ended in iteration i.
Its final Reward and Cost are the means of R_i and C_i over its last K points, K = ``--last-k``
or by default the last 10% of its points (at least 1). The table shows mean ± sample std
(ddof 1) of these over the seeds; "(k/n)" when only k of n seeds finished an episode.

**Cumulative cost** (the off-policy preset; CVPO's Figure 4). The cumulative cost of a run after
logged row i is Σ_{j ≤ i} n_j · C_j, n_j = ``episode/count`` and C_j = ``episode/cost`` of row j:
the total cost of every episode finished so far. The figure plots, per algorithm and task, the
mean over seeds of (cumulative cost, episode return) at each logged step that every seed shares.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from saferl.metric_keys import EPISODE_COST, EPISODE_COUNT, EPISODE_RETURN
from saferl.tools.studies.runner import (
    FINAL_FRACTION,
    add_run_arguments,
    by_seed,
    csv_list,
    failed_note,
    final_performance,
    finish_return_and_cost,
    finish_study,
    format_mean_std,
    parse_seeds,
    plan_job,
    planned_runs,
    plot_return_and_cost,
    read_curve,
    record_plan,
    require_positive,
    save_figure,
    study_console_and_out,
    summarise,
    train_and_measure,
    warn_if_no_episode,
    write_csv,
)

# ``saferl benchmark NAME`` -> the module holding its PRESET (imported when the CLI is built)
BENCHMARKS = {"onpolicy": "saferl.tools.studies.benchmark_onpolicy",
              "offpolicy": "saferl.tools.studies.benchmark_offpolicy",
              "reference": "saferl.tools.studies.reference"}


def load(name: str):
    return importlib.import_module(BENCHMARKS[name])


def _no_extra_arguments(p: argparse.ArgumentParser) -> None:
    return None


def _no_extra_settings(args, s: dict) -> dict:
    return {}


def _no_job_overrides(s: dict, cfg) -> list[str]:
    return []


@dataclass(frozen=True)
class Preset:
    name: str  # the sub-command, and the default --out folder benchmark-<name>-<time>
    title: str  # "On-policy": the table's heading
    kind: str  # the registry kind every algorithm must have
    kind_text: str  # "an on-policy (sampling)": the usage error for an algorithm of another kind
    algos: tuple[str, ...]  # the default --algos, table row order
    tasks: tuple[str, ...]  # --tasks all
    labels: dict[str, str]
    defaults: dict  # tasks, seeds, steps, steps_per_iteration, hosts, envs: the reduced default
    scale: dict  # the cluster scale each flag's help names, e.g. {"seeds": "OmniSafe 5", ...}
    doc: str  # the module docstring: its first two paragraphs are the command's description
    help: str
    cumulative_cost: bool = False  # also CVPO's Figure 4: reward vs cumulative cost
    extra_arguments: Callable[[argparse.ArgumentParser], None] = _no_extra_arguments
    extra_settings: Callable[[object, dict], dict] = _no_extra_settings  # (args, settings) -> more settings
    job_overrides: Callable[[dict, object], list[str]] = _no_job_overrides  # (settings, planned cfg) -> more
    outputs: tuple[str, ...] = field(default=("benchmark.md", "summary.csv", "runs.csv", "curves.csv",
                                              "curves_<task>.png", "benchmark.json", "runs/"))

    def label(self, algo: str) -> str:
        return self.labels.get(algo, algo.upper())


# ---------------------------------------------------------------------------------------------
# the numbers (pure functions; unit-tested)
# ---------------------------------------------------------------------------------------------
def summary_rows(preset: Preset, records: list[dict], tasks: list[str], algos: list[str]) -> list[dict]:
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
            rows.append({"task": task, "algo": algo, "label": preset.label(algo), "seeds": len(rs),
                         "seeds_with_episodes": n, "reward_mean": r_mean, "reward_std": r_std, "cost_mean": c_mean,
                         "cost_std": c_std, "cost_limit": rs[0]["cost_limit"],
                         "total_env_steps": rs[0]["total_env_steps"], "reward": format_mean_std(rets),
                         "cost": format_mean_std(costs)})
    return rows


def table(preset: Preset, records: list[dict], tasks: list[str], algos: list[str], s: dict) -> str:
    """OmniSafe's benchmark layout: per task, one row per algorithm, Reward and Cost as mean ± std."""
    k_text = f"K = {s['last_k']}" if s["last_k"] else f"K = the last {FINAL_FRACTION:.0%} of its points, at least 1"
    lines = [f"# {preset.title} benchmark", "",
             f"{len(s['seeds'])} seed(s) per row ({', '.join(map(str, s['seeds']))}); {s['steps']:,} env steps per "
             f"run, {s['steps_per_iteration']:,} per iteration; final performance of a run = mean episode return / "
             f"cost over its last K logged iterations ({k_text}); mean ± std (ddof 1) over seeds.", ""]
    rows = summary_rows(preset, records, tasks, algos)
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        limit = next((r["cost_limit"] for r in mine), None)
        lines += [f"## {task}" + (f" (cost limit {limit:g})" if limit is not None else ""), "",
                  "| Algorithm | Reward | Cost |", "|---|---|---|"]
        lines += [f"| {r['label']} | {r['reward']} | {r['cost']} |" for r in mine]
        lines.append("")
    if note := failed_note(records):
        lines.append(note)
    return "\n".join(lines).rstrip("\n") + "\n"


def read_cumulative_cost(metrics_csv: Path) -> list[tuple[float, int, float, float, float]]:
    """(env steps, episodes, mean episode cost, mean episode return, cumulative cost) of each
    logged iteration in which episodes finished; cumulative cost = Σ so far of episode/count ×
    episode/cost. A resumed run may have logged an iteration twice: the last row wins."""
    by_iteration: dict[int, tuple[float, int, float, float]] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            ret, cost, count = (row.get(k) or "" for k in (EPISODE_RETURN, EPISODE_COST, EPISODE_COUNT))
            if ret == "" or cost == "" or count == "":
                continue
            it = int(float(row.get("iteration") or len(by_iteration)))
            by_iteration[it] = (float(row["env_steps"]), int(float(count)), float(cost), float(ret))
    out, total = [], 0.0
    for it in sorted(by_iteration):
        x, n, c, r = by_iteration[it]
        total += n * c
        out.append((x, n, c, r, total))
    return out


def mean_cumulative_cost(rows: list[dict]) -> list[dict]:
    """Per (task, algo, env steps that every seed of the pair logged): the mean over seeds of
    the cumulative cost and of the episode return (the figure's points)."""
    out = []
    for task, algo in dict.fromkeys((r["task"], r["algo"]) for r in rows):
        mine = [r for r in rows if (r["task"], r["algo"]) == (task, algo)]
        seeds = sorted({r["seed"] for r in mine})
        by = {(r["seed"], r["env_steps"]): r for r in mine}
        shared = sorted(set.intersection(*({r["env_steps"] for r in mine if r["seed"] == s} for s in seeds)))
        for x in shared:
            pts = [by[(s, x)] for s in seeds]
            out.append({"task": task, "algo": algo, "env_steps": x, "seeds": len(seeds),
                        "cumulative_cost": statistics.fmean(p["cumulative_cost"] for p in pts),
                        "episode_return": statistics.fmean(p["episode_return"] for p in pts)})
    return out


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def add_arguments(preset: Preset, p: argparse.ArgumentParser) -> None:
    d, scale = preset.defaults, preset.scale
    p.description = "\n\n".join(preset.doc.split("\n\n")[:2])  # what it does, the reduced and the cluster commands
    p.epilog = f"--tasks all = {','.join(preset.tasks)}. Outputs: {', '.join(preset.outputs)}."
    p.add_argument("--algos", type=csv_list, default=list(preset.algos),
                   help=f"comma-separated algorithms, table row order (default all: {','.join(preset.algos)})")
    p.add_argument("--tasks", type=csv_list, default=None,
                   help=f"comma-separated tasks, or 'all' for the {len(preset.tasks)} (default "
                        f"{','.join(d['tasks'])})")
    p.add_argument("--seeds", default=None,
                   help=f"N for seeds 0..N-1, or a comma list of seeds (default {d['seeds']}; {scale['seeds']})")
    p.add_argument("--steps", type=int, default=d["steps"],
                   help=f"env steps per run (default {d['steps']:,}; {scale['steps']})")
    p.add_argument("--steps-per-iteration", type=int, default=d["steps_per_iteration"],
                   help=f"env steps per iteration over all envs (default {d['steps_per_iteration']:,}; "
                        f"{scale['steps_per_iteration']})")
    p.add_argument("--hosts", default=d["hosts"],
                   help=f"env hosts per run, or 'config' (default {d['hosts']}; the configs have 2)")
    p.add_argument("--envs", "--envs-per-host", dest="envs", default=d["envs"],
                   help=f"envs per env host, or 'config' (default {d['envs']}; the configs have 10)")
    preset.extra_arguments(p)
    add_run_arguments(p, f"benchmark-{preset.name}", last_k="logged iterations",
                      set_help="config override for every run, e.g. resources.num_gpus_per_learner=0.25")


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


def settings(preset: Preset, args) -> dict:
    from saferl import registry
    from saferl.config import ConfigError

    tasks = args.tasks or list(preset.defaults["tasks"])
    if [t.lower() for t in tasks] == ["all"]:
        tasks = list(preset.tasks)
    seeds = parse_seeds(args.seeds or preset.defaults["seeds"])
    if not args.algos or not tasks:
        raise ConfigError("usage error: --algos and --tasks need at least one name")
    require_positive(("--steps", args.steps), ("--steps-per-iteration", args.steps_per_iteration),
                     ("--parallel", args.parallel), ("--last-k", args.last_k))
    for t in tasks:
        if t not in registry.TASKS:
            raise ConfigError(f"usage error: unknown task {t!r}; the benchmark's: {', '.join(preset.tasks)}")
    for a in args.algos:
        if a not in registry.ALGORITHMS:
            raise ConfigError(f"usage error: unknown algorithm {a!r}; the benchmark's: {', '.join(preset.algos)}")
        if registry.ALGORITHMS[a].kind != preset.kind:
            raise ConfigError(f"usage error: {a} is not {preset.kind_text} algorithm")
    s = {"benchmark": preset.name, "algos": list(args.algos), "tasks": tasks, "seeds": seeds, "steps": args.steps,
         "steps_per_iteration": args.steps_per_iteration, "hosts": _count(args.hosts, "--hosts"),
         "envs": _count(args.envs, "--envs"), "last_k": args.last_k, "set": list(args.set)}
    return {**s, **preset.extra_settings(args, s)}


def _overrides(s: dict) -> list[str]:
    out = [f"total_env_steps={s['steps']}", f"steps_per_iteration={s['steps_per_iteration']}"]
    if s["hosts"] != "config":
        out.append(f"resources.num_env_hosts={s['hosts']}")
    if s["envs"] != "config":
        out.append(f"resources.envs_per_host={s['envs']}")
    return out


def plan(preset: Preset, s: dict, out: Path) -> list[dict]:
    """Every (task, algo, seed) config, validated before anything runs; the preset's overrides
    (which may depend on the planned config) before the user's ``--set``, which wins."""
    jobs = []
    for task in s["tasks"]:
        for algo in s["algos"]:
            for seed in s["seeds"]:
                job = plan_job(algo, task, seed, out, _overrides(s), s["set"])
                extra = preset.job_overrides(s, job["cfg"])
                if extra:
                    job = plan_job(algo, task, seed, out, _overrides(s) + extra, s["set"])
                jobs.append(job)
    return jobs


def _measure(preset: Preset, record: dict, s: dict) -> tuple[dict, list[tuple], list[dict]]:
    """Add the final performance to a run's record; return its curve rows and cumulative-cost rows."""
    path = Path(record["run_dir"]) / "metrics.csv"
    if not record["status"].startswith("ok") or not path.is_file():
        return record, [], []
    x, ret, cost = read_curve(path)
    final_r, final_c, k = final_performance(ret, cost, s["last_k"])
    record.update(final_return=final_r, final_cost=final_c, n_points=len(x), last_k=k)
    curve = [(record["task"], record["algo"], record["seed"], xi, ri, ci) for xi, ri, ci in zip(x, ret, cost)]
    cumulative = []
    if preset.cumulative_cost:
        cumulative = [{"task": record["task"], "algo": record["algo"], "seed": record["seed"], "env_steps": xi,
                       "episodes": n, "episode_cost": c, "episode_return": r, "cumulative_cost": total}
                      for xi, n, c, r, total in read_cumulative_cost(path)]
        record["cumulative_cost"] = cumulative[-1]["cumulative_cost"] if cumulative else 0.0
    return record, curve, cumulative


RUN_COLUMNS = ["task", "algo", "seed", "status", "final_return", "final_cost", "n_points", "last_k", "cost_limit",
               "total_env_steps", "num_envs", "wall_s", "run_dir"]
SUMMARY_COLUMNS = ["task", "algo", "label", "seeds", "seeds_with_episodes", "reward_mean", "reward_std", "cost_mean",
                   "cost_std", "cost_limit", "total_env_steps"]
CURVE_COLUMNS = ["task", "algo", "seed", "env_steps", "episode_return", "episode_cost"]
CUMULATIVE_COLUMNS = ["task", "algo", "seed", "env_steps", "episodes", "episode_cost", "episode_return",
                      "cumulative_cost"]
CUMULATIVE_MEAN_COLUMNS = ["task", "algo", "env_steps", "seeds", "cumulative_cost", "episode_return"]


def _write(preset: Preset, out: Path, records: list[dict], s: dict) -> None:
    order = {a: i for i, a in enumerate(s["algos"])}
    columns = RUN_COLUMNS[:6] + (["cumulative_cost"] if preset.cumulative_cost else []) + RUN_COLUMNS[6:]
    write_csv(out / "runs.csv", columns,
              sorted(records, key=lambda r: (r["task"], order.get(r["algo"], 0), r["seed"])))
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows(preset, records, s["tasks"], s["algos"]))
    (out / "benchmark.md").write_text(table(preset, records, s["tasks"], s["algos"], s))


def _plot(preset: Preset, out: Path, curves: list[tuple], records: list[dict], s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for task in s["tasks"]:
        fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
        for a, algo in enumerate(s["algos"]):
            series = by_seed(curves, lambda t, al: (t, al) == (task, algo))  # noqa: B023  (called within the iteration)
            plot_return_and_cost(ax_r, ax_c, series, colors[a % len(colors)], preset.label(algo))
        finish_return_and_cost(ax_r, ax_c, next((r["cost_limit"] for r in records if r["task"] == task), None))
        save_figure(fig, out / f"curves_{task}.png", f"{task}: {preset.title.lower()} benchmark "
                    "(mean ± std over seeds)")


def _plot_cumulative(preset: Preset, out: Path, means: list[dict], s: dict) -> None:
    """CVPO's Figure 4: episode return vs cumulative cost (log x axis), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = len(s["tasks"])
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax, task in zip(axes.flat, s["tasks"]):
        for a, algo in enumerate(s["algos"]):
            pts = [m for m in means if m["task"] == task and m["algo"] == algo]
            if pts:
                ax.plot([m["cumulative_cost"] for m in pts], [m["episode_return"] for m in pts], marker=".",
                        color=colors[a % len(colors)], label=f"{preset.label(algo)} ({pts[0]['seeds']} seeds)")
        xs = [m["cumulative_cost"] for m in means if m["task"] == task]
        if xs and min(xs) > 0:
            ax.set_xscale("log")
            span = math.log10(max(xs) / min(xs))  # decades shown: labels at 1, 2, 5 × 10^k when few
            subs = (1.0,) if span > 2 else (1.0, 2.0, 5.0) if span > 0.7 else (1.0, 2.0, 3.0, 5.0)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:  # logarithmic above 1, linear below: a run whose first episodes cost nothing still shows
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("cumulative cost (log scale)")
        ax.set_ylabel("episode return")
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    save_figure(fig, out / "cumulative_cost.png", f"{preset.title} benchmark: reward vs cumulative cost\n"
                "(CVPO's Figure 4; mean over seeds)")


def run(preset: Preset, args) -> Path:
    s = settings(preset, args)
    console, out = study_console_and_out(f"benchmark-{preset.name}", args)
    jobs = plan(preset, s, out)  # every config validated before anything is created or started
    for job in jobs[:: len(s["seeds"])]:  # one warning per (task, algo)
        warn_if_no_episode(job, console)
    record_plan(out, console, {**s, "runs": planned_runs(jobs, "task", "algo", "seed", "config", "overrides")},
                f"benchmark {preset.name}: {len(jobs)} runs ({len(s['tasks'])} task(s) × {len(s['algos'])} "
                f"algorithms × {len(s['seeds'])} seeds, {s['steps']:,} env steps each)", filename="benchmark.json")
    t0 = time.perf_counter()

    def describe(r: dict) -> str:
        return (f"{r['algo']} on {r['task']} seed {r['seed']} in {r.get('wall_s', 0):.0f} s: final return "
                f"{r['final_return']:.3g}, cost {r['final_cost']:.3g} (limit {r['cost_limit']:g}; last "
                f"{r['last_k']} of {r['n_points']} points)")

    records, curves, cumulative = train_and_measure(jobs, args, console, lambda r, j: _measure(preset, r, s),
                                                    lambda done: _write(preset, out, done, s), describe)
    write_csv(out / "curves.csv", CURVE_COLUMNS,
              [dict(zip(CURVE_COLUMNS, c)) for c in sorted(curves, key=lambda c: c[:4])])
    _plot(preset, out, curves, records, s)
    if preset.cumulative_cost:
        order = {a: i for i, a in enumerate(s["algos"])}
        cumulative.sort(key=lambda r: (r["task"], order.get(r["algo"], 0), r["seed"], r["env_steps"]))
        means = mean_cumulative_cost(cumulative)
        write_csv(out / "cumulative_cost.csv", CUMULATIVE_COLUMNS, cumulative)
        write_csv(out / "cumulative_cost_mean.csv", CUMULATIVE_MEAN_COLUMNS, means)
        _plot_cumulative(preset, out, means, s)
    console.print((out / "benchmark.md").read_text())
    return finish_study(console, records, out, t0,
                        ", ".join(o for o in preset.outputs if o not in ("benchmark.json", "runs/")))
