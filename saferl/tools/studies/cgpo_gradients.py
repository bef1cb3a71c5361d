"""Where CGPO's gradients come from (Safe RL using Finite-Horizon Gradient-based Estimation, ICML
2024): first-order window gradients (FoBG) vs the zeroth-order batched gradient (ZoBG, eq 69)
(Figure 10), and CGPO on a non-differentiable task with gradients through a learned world model
(MB-CGPO, Algorithm 3; Figure 6).

    saferl study cgpo-gradients                reduced default (a 2-core machine, ~10 minutes):
                                               every arm below, 2 seeds, 32,000 env steps per
                                               run (1 worker × 32 envs: 100 updates, 10 episodes)
    saferl study cgpo-gradients --seeds 5 --steps 640000 --hosts 2 --envs 32 --parallel 4
                                               the shipped configs' budget and envs, 5 seeds (the
                                               paper's)

Arms (``--arms``: a comma list of keys, or the groups ``fig10``, ``fig6`` and ``all``, the default):

    fobg      CGPO (FoBG)    configs/cgpo/<task>.yaml, fobg              differentiable --task
    zobg      CGPO-ZoBG      the same, algo_params.gradient_estimator=zobg  differentiable --task
    mb-cgpo   MB-CGPO        configs/mb_cgpo/<nd-task>.yaml              non-differentiable --nd-task
    zobg-nd   CGPO-ZoBG      configs/cgpo/<nd-task>.yaml, zobg           non-differentiable --nd-task

Fig 10 is ``fobg`` against ``zobg`` on the differentiable task (default FunctionEnv-v0). Fig 6
is ``mb-cgpo`` on the non-differentiable task (default FunctionEnvFloor-v0, floor(x) in f, eq 83)
against CGPO trained on that task. Plain CGPO (FoBG) cannot train there: the config validation
refuses a gradient algorithm on a non-differentiable task, since the simulator's derivative is
wrong (floor has zero derivative almost everywhere, so back-propagation would silently drop the
quadratic term). The CGPO arm of Fig 6 is therefore CGPO-ZoBG on the same task (``zobg-nd``:
the score function needs only forward simulation), and ``fobg`` on the differentiable task is
drawn beside it as the reference of what CGPO reaches with true first-order gradients.

Every arm runs with the same ``--seeds``, ``--steps`` (env steps), ``--hosts`` (gradient
workers) and ``--envs`` (envs per worker); ``--set`` overrides every run. Outputs in ``--out``:

    gradients.md   one row per arm: final return and cost (mean ± std over seeds) against the
                   cost limit, violation share, Vio. Ratio, Conv. Steps, and the update
                   efficiency: median and IQR of the reduction ratio ρ (eq 18, measured on the
                   window that produced g and q) and the median δ̂
    summary.csv    the same numbers at full precision
    runs.csv       one row per run
    curves.csv     (arm, task, seed, env steps, episode return, episode cost) of every run
    gradients.png  return, cost and ρ vs env steps, a row per figure (mean ± std over seeds)
    study.json     the exact command, the settings and every run's overrides
    runs/          ``<algo>-<task>-<arm>-s<seed>``

Definitions. A run's curve is its logged iterations with finished episodes (every T/h updates on
these tasks); final return / cost = the means over its last K points (``--last-k``, default the
last 10%, at least 1), as in the other studies. Violation share = the share of all the run's
finished episodes whose cost exceeds the limit b (``episode/violation_rate``). Vio. Ratio and
Conv. Steps are the cgpo-table1 study's (F.2.2, F.2.1: window 10% of the budget, tolerance 10%
of the run's return range, soft margin 5% of |b|, band 20% of |b|). ρ = actual / predicted
change of J_R of a step; ρ ≈ 1 means gᵀδ predicted the step's effect (an efficient update). On
FunctionEnv reward = cost (eq 70), so the best feasible return is b.

Re-running with the same ``--out`` keeps finished runs, resumes interrupted ones and recomputes
the outputs.
"""
from __future__ import annotations

import argparse
import csv
import math
import shlex
import statistics
import time
from pathlib import Path

from saferl.metric_keys import EPISODE_COUNT
from saferl.tools.studies.cgpo_radius import read_radius
from saferl.tools.studies.cgpo_table1 import conv_steps, vio_ratio
from saferl.tools.studies.runner import (
    FINAL_FRACTION,
    add_budget_arguments,
    add_run_arguments,
    by_seed,
    choose_keys,
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
    require_budget,
    require_task,
    save_figure,
    study_console_and_out,
    summarise,
    train_and_measure,
    warn_if_no_episode,
    write_csv,
)

HELP = "CGPO Fig. 10 / Fig. 6: CGPO on FoBG vs ZoBG gradients, and MB-CGPO on a non-differentiable task"

FOBG, ZOBG = ("algo_params.gradient_estimator=fobg",), ("algo_params.gradient_estimator=zobg",)
# key: (table label, algorithm, which task: "task" differentiable / "nd_task", overrides, figure)
ARMS: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "fobg": ("CGPO (FoBG)", "cgpo", "task", FOBG, "10"),
    "zobg": ("CGPO-ZoBG", "cgpo", "task", ZOBG, "10"),
    "mb-cgpo": ("MB-CGPO", "mb_cgpo", "nd_task", (), "6"),
    "zobg-nd": ("CGPO-ZoBG", "cgpo", "nd_task", ZOBG, "6"),
}
GROUPS = {"fig10": ["fobg", "zobg"], "fig6": ["fobg", "mb-cgpo", "zobg-nd"], "all": list(ARMS)}
DEFAULTS = {"task": "FunctionEnv-v0", "nd_task": "FunctionEnvFloor-v0", "seeds": "2", "steps": 32_000,
            "hosts": 1, "envs": 32}
CONV_WINDOW, CONV_TOL, MARGIN, VIO_BAND = 0.1, 0.1, 0.05, 0.2  # the cgpo-table1 study's defaults


def arm_keys(names: list[str]) -> list[str]:
    """``--arms`` (keys or groups) as keys in table order."""
    return choose_keys(names, ARMS, GROUPS, "--arms", "arm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = "\n\n".join(__doc__.split("\n\n")[:4])
    p.epilog = "Outputs: gradients.md, summary.csv, runs.csv, curves.csv, gradients.png, study.json, runs/."
    p.add_argument("--arms", type=csv_list, default=["all"],
                   help="comma list of arms or groups (fig10, fig6; default all)")
    p.add_argument("--task", default=DEFAULTS["task"],
                   help=f"the differentiable task of fobg / zobg (default {DEFAULTS['task']})")
    p.add_argument("--nd-task", default=DEFAULTS["nd_task"],
                   help=f"the non-differentiable task of mb-cgpo / zobg-nd (default {DEFAULTS['nd_task']})")
    add_budget_arguments(p, DEFAULTS, steps_note="the FunctionEnv configs' 640000",
                         hosts_help="gradient workers per run")
    add_run_arguments(p, "cgpo-gradients", last_k="points")


def _settings(args) -> dict:
    keys = arm_keys(args.arms)
    seeds = parse_seeds(str(args.seeds))
    require_budget(args)
    require_task(args.task, "--task")
    require_task(args.nd_task, "--nd-task")
    return {"arms": keys, "task": args.task, "nd_task": args.nd_task, "seeds": seeds, "steps": args.steps,
            "hosts": args.hosts, "envs": args.envs, "last_k": args.last_k, "set": list(args.set)}


def command(s: dict, out: Path) -> str:
    """The command that reproduces the study (every setting explicit)."""
    argv = ["saferl", "study", "cgpo-gradients", "--arms", ",".join(s["arms"]), "--task", s["task"],
            "--nd-task", s["nd_task"], "--seeds", ",".join(map(str, s["seeds"])), "--steps", str(s["steps"]),
            "--hosts", str(s["hosts"]), "--envs", str(s["envs"])]
    if s["last_k"]:
        argv += ["--last-k", str(s["last_k"])]
    for kv in s["set"]:
        argv += ["--set", kv]
    return shlex.join(argv + ["--out", str(out)])


def plan(s: dict, out: Path) -> list[dict]:
    """Every (arm, seed) job, validated now (e.g. a ``--nd-task`` without an MB-CGPO config, or a
    differentiable-only algorithm on it, fails here as one line)."""
    jobs = []
    for key in s["arms"]:
        label, algo, which, extra, fig = ARMS[key]
        for seed in s["seeds"]:
            over = [f"total_env_steps={s['steps']}", f"resources.num_env_hosts={s['hosts']}",
                    f"resources.envs_per_host={s['envs']}", *extra]
            job = plan_job(algo, s[which], seed, out, over, s["set"], suffix=key)
            jobs.append(job | {"arm": key, "label": label, "figure": fig})
    return jobs


# ---------------------------------------------------------------------------------------------
# the numbers and the outputs
# ---------------------------------------------------------------------------------------------
def read_violations(metrics_csv: Path) -> tuple[float, int]:
    """(violating episodes, finished episodes) over a run, from ``episode/violation_rate`` and
    ``episode/count``; a resumed run's repeated iteration counts once (the last row)."""
    rows: dict[int, tuple[float, int]] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            rate, count = row.get("episode/violation_rate") or "", row.get(EPISODE_COUNT) or ""
            if rate and count:
                n = int(float(count))
                rows[int(float(row["iteration"]))] = (float(rate) * n, n)
    return sum(v for v, _ in rows.values()), sum(n for _, n in rows.values())


def iqr(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def measure(record: dict, job: dict, last_k: int | None) -> tuple[dict, list[tuple], list[tuple]]:
    """Add a run's final performance, safety and update-efficiency numbers to its record; return
    its curve rows and its (arm, seed, env steps, ρ) rows."""
    record.update(arm=job["arm"], label=job["label"], figure=job["figure"])
    path = Path(record["run_dir"]) / "metrics.csv"
    if not record["status"].startswith("ok") or not path.is_file():
        return record, [], []
    x, ret, cost = read_curve(path)
    limit = record["cost_limit"]
    final_r, final_c, k = final_performance(ret, cost, last_k)
    violating, episodes = read_violations(path)
    radius = read_radius(path)
    rhos = [p for _, _, p in radius if math.isfinite(p)]
    record.update(final_return=final_r, final_cost=final_c, n_points=len(x), last_k=k, episodes=episodes,
                  violation_share=violating / episodes if episodes else None,
                  vio_ratio=vio_ratio(cost, limit, band=VIO_BAND, margin=MARGIN)[0],
                  conv_steps=conv_steps(x, ret, cost, limit, window=CONV_WINDOW * record["total_env_steps"],
                                        tol=CONV_TOL, margin=MARGIN),
                  updates=len(radius), median_rho=statistics.median(rhos) if rhos else None, rho_iqr=iqr(rhos),
                  median_radius=statistics.median(r for _, r, _ in radius) if radius else None)
    curve = [(job["arm"], record["task"], record["seed"], xi, ri, ci) for xi, ri, ci in zip(x, ret, cost)]
    return record, curve, [(job["arm"], record["seed"], xi, p) for xi, _, p in radius]


STAT_COLUMNS = ("final_return", "final_cost", "violation_share", "vio_ratio", "conv_steps", "median_rho", "rho_iqr",
                "median_radius")


def summary_rows(records: list[dict], keys: list[str]) -> list[dict]:
    rows = []
    for key in keys:
        rs = [r for r in records if r.get("arm") == key and r["status"].startswith("ok")]
        if not rs:
            continue
        cols = {c: [r.get(c) for r in rs] for c in STAT_COLUMNS}
        row = {"arm": key, "label": ARMS[key][0], "figure": ARMS[key][4], "algo": rs[0]["algo"], "task": rs[0]["task"],
               "seeds": len(rs), "cost_limit": rs[0]["cost_limit"], "total_env_steps": rs[0]["total_env_steps"]}
        for c, vals in cols.items():
            row[f"{c}_mean"], row[f"{c}_std"] = summarise(vals)[:2]
        row.update(cell_return=format_mean_std(cols["final_return"]), cell_cost=format_mean_std(cols["final_cost"]),
                   cell_violation=format_mean_std(cols["violation_share"], ".0%"),
                   cell_vio_ratio=format_mean_std(cols["vio_ratio"], ".1f"),
                   cell_conv=format_mean_std(cols["conv_steps"], ".3g"),
                   cell_rho=format_mean_std(cols["median_rho"], ".2f"),
                   cell_rho_iqr=format_mean_std(cols["rho_iqr"], ".2f"),
                   cell_radius=format_mean_std(cols["median_radius"], ".2g"))
        rows.append(row)
    return rows


def table(records: list[dict], s: dict) -> str:
    k_text = f"K = {s['last_k']}" if s["last_k"] else f"K = the last {FINAL_FRACTION:.0%} of its points, at least 1"
    rows = summary_rows(records, s["arms"])
    lines = ["# CGPO's gradient sources (Fig. 10: FoBG vs ZoBG; Fig. 6: MB-CGPO on a non-differentiable task)", "",
             f"{len(s['seeds'])} seed(s) per row ({', '.join(map(str, s['seeds']))}); {s['steps']:,} env steps per "
             f"run, {s['hosts']} worker(s) × {s['envs']} env(s). Return / cost: mean episode return / cost over a "
             f"run's last K logged points ({k_text}), against the cost limit b. Violation share: episodes with "
             "cost > b over the whole run. Vio. Ratio (%) and Conv. Steps: the cgpo-table1 study's definitions "
             "(F.2.2, F.2.1). ρ: median and IQR over a run's updates of the reduction ratio (actual / predicted "
             "change of J_R on the window that produced the step; 1 = the step did what gᵀδ predicted). δ̂: "
             "median radius. Cells: mean ± std (ddof 1) over seeds; (k/n): defined for k of n seeds.", "",
             "| Fig | Arm | Task | Return | Cost (limit) | Violation share | Vio. Ratio | Conv. Steps | ρ median | "
             "ρ IQR | δ̂ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['figure']} | {r['label']} | {r['task']} | {r['cell_return']} | {r['cell_cost']} "
              f"({r['cost_limit']:g}) | {r['cell_violation']} | {r['cell_vio_ratio']} | {r['cell_conv']} | "
              f"{r['cell_rho']} | {r['cell_rho_iqr']} | {r['cell_radius']} |" for r in rows]
    if note := failed_note(records):
        lines += ["", note]
    return "\n".join(lines) + "\n"


RUN_COLUMNS = ["arm", "label", "figure", "algo", "task", "seed", "status", "final_return", "final_cost",
               "violation_share", "episodes", "vio_ratio", "conv_steps", "median_rho", "rho_iqr", "median_radius",
               "updates", "n_points", "last_k", "cost_limit", "total_env_steps", "num_envs", "wall_s", "run_dir"]
SUMMARY_COLUMNS = ["arm", "label", "figure", "algo", "task", "seeds", "cost_limit", "total_env_steps",
                   *[f"{c}_{m}" for c in STAT_COLUMNS for m in ("mean", "std")]]
CURVE_COLUMNS = ["arm", "task", "seed", "env_steps", "episode_return", "episode_cost"]


def write_outputs(out: Path, records: list[dict], s: dict) -> None:
    order = {k: i for i, k in enumerate(ARMS)}
    write_csv(out / "runs.csv", RUN_COLUMNS, sorted(records, key=lambda r: (order.get(r.get("arm"), 99), r["seed"])))
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows(records, s["arms"]))
    (out / "gradients.md").write_text(table(records, s))


def plot(out: Path, curves: list[tuple], rhos: list[tuple], records: list[dict], s: dict) -> None:
    """A row per figure whose arms ran: return, cost (mean ± std over seeds) and ρ per update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fobg": "tab:blue", "zobg": "tab:red", "mb-cgpo": "tab:green", "zobg-nd": "tab:orange"}
    figs = [("10", s["task"]), ("6", s["nd_task"])]
    rows = [(fig, task, [k for k in s["arms"] if ARMS[k][4] == fig or (fig == "6" and k == "fobg")])
            for fig, task in figs]
    rows = [r for r in rows if any(ARMS[k][4] == r[0] for k in r[2])]
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 3.8 * len(rows)), squeeze=False)
    for (ax_r, ax_c, ax_p), (figure, task, keys) in zip(axes, rows):
        limit = None
        for key in keys:
            label = ARMS[key][0] + ("" if ARMS[key][4] == figure else f" on {s['task']} (reference)")
            plot_return_and_cost(ax_r, ax_c, by_seed(curves, lambda arm, *_: arm == key), colors[key], label)  # noqa: B023  (called within the iteration)
            pts = [(x, p) for arm, _, x, p in rhos if arm == key and math.isfinite(p)]
            if pts:
                ax_p.scatter([p[0] for p in pts], [min(max(p[1], -2.0), 4.0) for p in pts], s=6, alpha=0.4,
                             color=colors[key], label=label)
            limit = next((r["cost_limit"] for r in records if r.get("arm") == key and r["task"] == task), limit)
        finish_return_and_cost(ax_r, ax_c, limit)
        ax_r.set_title(f"Fig {figure}: {task}", fontsize=9)
        ax_p.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax_p.set(xlabel="env steps", ylabel="ρ (clipped to [−2, 4])", ylim=(-2.2, 4.2),
                 title="update efficiency: actual / predicted ΔJ_R")
        ax_p.grid(alpha=0.3)
        if ax_p.get_legend_handles_labels()[0]:
            ax_p.legend(fontsize=7)
    save_figure(fig, out / "gradients.png", "CGPO's gradient sources: FoBG vs ZoBG (Fig 10), MB-CGPO on a "
                "non-differentiable task (Fig 6); mean ± std over seeds")


def run(args) -> Path:
    s = _settings(args)
    console, out = study_console_and_out("cgpo-gradients", args)
    jobs = plan(s, out)  # every config validated before anything is created or started
    warn_if_no_episode(jobs[0], console)
    record_plan(out, console, {"command": command(s, out), **s,
                               "runs": planned_runs(jobs, "arm", "algo", "task", "seed", "name", "config",
                                                    "overrides")},
                f"study cgpo-gradients: {len(jobs)} runs ({len(s['arms'])} arms × {len(s['seeds'])} seeds, "
                f"{s['steps']:,} env steps each)")
    t0 = time.perf_counter()

    def describe(r: dict) -> str:
        rho = f"{r['median_rho']:.2f}" if r.get("median_rho") is not None else "-"
        return (f"{r['label']} on {r['task']} seed {r['seed']} in {r.get('wall_s', 0):.0f} s: final return "
                f"{r['final_return']:.3g}, cost {r['final_cost']:.3g} (limit {r['cost_limit']:g}), median ρ {rho}")

    records, curves, rhos = train_and_measure(jobs, args, console, lambda r, j: measure(r, j, s["last_k"]),
                                              lambda done: write_outputs(out, done, s), describe)
    write_csv(out / "curves.csv", CURVE_COLUMNS,
              [dict(zip(CURVE_COLUMNS, c)) for c in sorted(curves, key=lambda c: (c[0], c[2], c[3]))])
    plot(out, curves, rhos, records, s)
    console.print((out / "gradients.md").read_text())
    return finish_study(console, records, out, t0, "gradients.md, summary.csv, runs.csv, curves.csv, gradients.png")
