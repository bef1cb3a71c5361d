"""CGPO's trust-region radius (Safe RL using Finite-Horizon Gradient-based Estimation, ICML 2024):
adaptive vs fixed δ̂ (Figure 7, §6.5) and the ablations of the adaptation's hyper-parameters
(Figure 14, Appendix D.2).

    saferl study cgpo-radius                   reduced default (a 2-core machine, a few minutes):
                                               FunctionEnv-v0, Figure 7's variants (adaptive and
                                               fixed δ̂ = 1e-4, 1e-3, 1e-2), 1 seed, 48,000 env
                                               steps per run (2 workers × 16 envs: 150 updates)
    saferl study cgpo-radius --variants all --seeds 5 --steps 640000 --envs 32 --parallel 4
                                               every variant of Figures 7 and 14 at the shipped
                                               config's budget and envs, 5 seeds (the paper's)
    saferl study cgpo-radius --task BraxHalfCheetahVel-v0 --steps 7680000 --envs 64 --seeds 5 \\
        --address auto                         Figure 7's task scale on a Ray cluster

Every variant is one ``cgpo`` run of ``configs/cgpo/<task>.yaml`` with only its radius settings
(``algo_params.radius``: δ̂ bounds ‖δ‖², eq 10; eq 18 adapts it) changed:

    adaptive         adaptive δ̂                the config's own (init 1e-3 in [1e-4, 1e-2], β 0.8/1.25,
                                                η 0.25/0.75 on FunctionEnv and the Brax tasks but Reacher)
    fixed-1e-4 ...   fixed δ̂ = 1e-4 / 1e-3 / 1e-2   init = lower = upper: eq 18 cannot move it (Fig 7, 14a)
    lower-1e-5, lower-1e-3                     the lower bound (Fig 14b)
    upper-1e-1, upper-1                        the upper bound (Fig 14c)
    beta-0.5-2, beta-0.9-1.1                   the update ratios β1/β2 (Fig 14d)
    eta1-0.1, eta1-0.5                         the negative threshold η1 (Fig 14e)
    eta2-0.5, eta2-0.9                         the positive threshold η2 (Fig 14f)

``--variants`` takes a comma list of keys, or the groups ``fig7`` (the default) and ``all``.
``--set`` overrides every run (and wins over a variant's own overrides). Outputs in ``--out``:

    radius.md     one row per variant: final return and cost (mean ± std over seeds), the median δ̂
                  over its updates, the share of updates at the lower bound, and the median ρ
    summary.csv   the same numbers at full precision
    runs.csv      one row per run
    curves.csv    (variant, seed, env steps, episode return, episode cost) of every run
    radius.png    return, cost and δ̂ vs env steps per variant (mean ± std over seeds; δ̂ of seed 0)
    study.json    the settings and every run's overrides
    runs/         ``cgpo-<task>-<variant>-s<seed>``

Re-running with the same ``--out`` keeps finished runs, resumes interrupted ones and recomputes
the outputs. A run's final return / cost are the means over its last K logged points with
finished episodes (K = ``--last-k`` or the last 10%, at least 1), as in the other studies. δ̂ and
ρ come from ``cgpo/radius`` and ``cgpo/reduction_ratio``, logged at every update (the study sets
``schedule.log_every=1``); ρ is measured on the window that produced the step (``learners/cgpo.py``).
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

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

HELP = "CGPO Fig. 7 / Fig. 14: adaptive vs fixed trust-region radius δ̂ and ablations of eq 18's settings"


def _fixed(x: str) -> tuple[str, str, tuple[str, ...]]:
    return (f"fixed δ̂ = {x}", f"init = lower = upper = {x}",
            tuple(f"algo_params.radius.{k}={float(x)}" for k in ("lower", "upper", "init")))


# key: (table label, what changes, overrides); table order
VARIANTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "adaptive": ("adaptive δ̂", "the config's radius settings", ()),
    **{f"fixed-{x}": _fixed(x) for x in ("1e-4", "1e-3", "1e-2")},
    "lower-1e-5": ("lower 1e-5", "lower = 1e-5", ("algo_params.radius.lower=0.00001",)),
    "lower-1e-3": ("lower 1e-3", "lower = 1e-3", ("algo_params.radius.lower=0.001",)),
    "upper-1e-1": ("upper 1e-1", "upper = 1e-1", ("algo_params.radius.upper=0.1",)),
    "upper-1": ("upper 1", "upper = 1", ("algo_params.radius.upper=1.0",)),
    "beta-0.5-2": ("β 0.5 / 2", "β1 = 0.5, β2 = 2",
                   ("algo_params.radius.beta1=0.5", "algo_params.radius.beta2=2.0")),
    "beta-0.9-1.1": ("β 0.9 / 1.1", "β1 = 0.9, β2 = 1.1",
                     ("algo_params.radius.beta1=0.9", "algo_params.radius.beta2=1.1")),
    "eta1-0.1": ("η1 0.1", "η1 = 0.1", ("algo_params.radius.eta1=0.1",)),
    "eta1-0.5": ("η1 0.5", "η1 = 0.5", ("algo_params.radius.eta1=0.5",)),
    "eta2-0.5": ("η2 0.5", "η2 = 0.5", ("algo_params.radius.eta2=0.5",)),
    "eta2-0.9": ("η2 0.9", "η2 = 0.9", ("algo_params.radius.eta2=0.9",)),
}
GROUPS = {"fig7": ["adaptive", "fixed-1e-4", "fixed-1e-3", "fixed-1e-2"], "all": list(VARIANTS)}
# plot rows beyond 4 variants: Fig 14's panels, the adaptive run repeated in each
PLOT_GROUPS = (("fixed-1e-4", "fixed-1e-3", "fixed-1e-2"), ("lower-1e-5", "lower-1e-3", "upper-1e-1", "upper-1"),
               ("beta-0.5-2", "beta-0.9-1.1"), ("eta1-0.1", "eta1-0.5", "eta2-0.5", "eta2-0.9"))
DEFAULTS = {"task": "FunctionEnv-v0", "seeds": "1", "steps": 48_000, "hosts": 2, "envs": 16}


def variant_keys(names: list[str]) -> list[str]:
    """``--variants`` (keys or groups) as keys in table order."""
    return choose_keys(names, VARIANTS, GROUPS, "--variants", "variant")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = "\n\n".join(__doc__.split("\n\n")[:3])
    p.epilog = "Outputs: radius.md, summary.csv, runs.csv, curves.csv, radius.png, study.json, runs/."
    p.add_argument("--task", default=DEFAULTS["task"], help=f"a task with configs/cgpo/<task>.yaml "
                   f"(default {DEFAULTS['task']})")
    p.add_argument("--variants", type=csv_list, default=["fig7"],
                   help="comma list of variants or groups (fig7: the default; all)")
    add_budget_arguments(p, DEFAULTS, steps_note="the FunctionEnv config's 640000", hosts_help="gradient workers",
                         envs_note="; the FunctionEnv config's 32")
    add_run_arguments(p, "cgpo-radius", last_k="points")


def _settings(args) -> dict:
    keys = variant_keys(args.variants)
    seeds = parse_seeds(str(args.seeds))
    require_budget(args)
    require_task(args.task)
    return {"task": args.task, "variants": keys, "seeds": seeds, "steps": args.steps, "hosts": args.hosts,
            "envs": args.envs, "last_k": args.last_k, "set": list(args.set)}


def plan(s: dict, out: Path) -> list[dict]:
    """Every (variant, seed) job, validated now (a variant whose bounds do not fit the config's
    δ̂ fails here, as one line)."""
    jobs = []
    for key in s["variants"]:
        for seed in s["seeds"]:
            over = [f"total_env_steps={s['steps']}", f"resources.num_env_hosts={s['hosts']}",
                    f"resources.envs_per_host={s['envs']}", *VARIANTS[key][2]]
            job = plan_job("cgpo", s["task"], seed, out, over, s["set"], suffix=key)
            jobs.append(job | {"variant": key, "label": VARIANTS[key][0]})
    return jobs


# ---------------------------------------------------------------------------------------------
# the numbers and the outputs
# ---------------------------------------------------------------------------------------------
def read_radius(metrics_csv: Path) -> list[tuple[float, float, float]]:
    """(env steps, δ̂, ρ) of every logged update (ρ NaN where there was no ratio test); a resumed
    run's repeated iteration counts once (the last row)."""
    rows: dict[int, tuple[float, float, float]] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            radius = row.get("cgpo/radius") or ""
            if radius == "":
                continue
            rho = row.get("cgpo/reduction_ratio") or ""
            rows[int(float(row["iteration"]))] = (float(row["env_steps"]), float(radius),
                                                  float(rho) if rho != "" else math.nan)
    return [rows[k] for k in sorted(rows)]


def measure(record: dict, job: dict, last_k: int | None) -> tuple[dict, list[tuple], list[tuple]]:
    """Add a run's final performance and radius statistics to its record; return its curve and
    radius rows."""
    record.update(variant=job["variant"], label=job["label"])
    path = Path(record["run_dir"]) / "metrics.csv"
    if not record["status"].startswith("ok") or not path.is_file():
        return record, [], []
    x, ret, cost = read_curve(path)
    final_r, final_c, k = final_performance(ret, cost, last_k)
    radius = read_radius(path)
    lower = float(job["cfg"].learner_params().radius.lower)
    rads = [r for _, r, _ in radius]
    rhos = [p for _, _, p in radius if math.isfinite(p)]
    record.update(final_return=final_r, final_cost=final_c, n_points=len(x), last_k=k, updates=len(rads),
                  median_radius=statistics.median(rads) if rads else None,
                  at_floor=(sum(r <= lower * (1 + 1e-9) for r in rads) / len(rads)) if rads else None,
                  median_rho=statistics.median(rhos) if rhos else None)
    curve = [(job["variant"], record["seed"], xi, ri, ci) for xi, ri, ci in zip(x, ret, cost)]
    return record, curve, [(job["variant"], record["seed"], xi, r, p) for xi, r, p in radius]


def summary_rows(records: list[dict], keys: list[str]) -> list[dict]:
    rows = []
    for key in keys:
        rs = [r for r in records if r.get("variant") == key and r["status"].startswith("ok")]
        if not rs:
            continue
        cols = {c: [r.get(c) for r in rs] for c in ("final_return", "final_cost", "median_radius", "at_floor",
                                                     "median_rho")}
        stats = {c: summarise(v)[:2] for c, v in cols.items()}
        rows.append({"variant": key, "label": VARIANTS[key][0], "change": VARIANTS[key][1], "seeds": len(rs),
                     "return_mean": stats["final_return"][0], "return_std": stats["final_return"][1],
                     "cost_mean": stats["final_cost"][0], "cost_std": stats["final_cost"][1],
                     "median_radius": stats["median_radius"][0], "at_floor": stats["at_floor"][0],
                     "median_rho": stats["median_rho"][0], "cost_limit": rs[0]["cost_limit"],
                     "total_env_steps": rs[0]["total_env_steps"],
                     "return": format_mean_std(cols["final_return"]), "cost": format_mean_std(cols["final_cost"]),
                     "radius": format_mean_std(cols["median_radius"], ".2g"),
                     "floor": format_mean_std(cols["at_floor"], ".0%"),
                     "rho": format_mean_std(cols["median_rho"], ".3f")})
    return rows


def table(records: list[dict], s: dict) -> str:
    k_text = f"K = {s['last_k']}" if s["last_k"] else f"K = the last {FINAL_FRACTION:.0%} of its points, at least 1"
    rows = summary_rows(records, s["variants"])
    limit = next((r["cost_limit"] for r in rows), None)
    lines = [f"# CGPO trust-region radius on {s['task']} (Fig. 7, Fig. 14)", "",
             f"{len(s['seeds'])} seed(s) per row ({', '.join(map(str, s['seeds']))}); {s['steps']:,} env steps per "
             f"run, {s['hosts']} worker(s) × {s['envs']} env(s). Final return / cost = mean episode return / cost "
             f"over a run's last K logged points ({k_text}); δ̂ = median of cgpo/radius over its updates; at floor = "
             "share of updates with δ̂ at the lower bound; ρ = median reduction ratio (same window); mean ± std "
             "(ddof 1) over seeds" + (f"; cost limit {limit:g}." if limit is not None else "."), "",
             "| Variant | Change | Return | Cost | δ̂ | At floor | ρ |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['change']} | {r['return']} | {r['cost']} | {r['radius']} | {r['floor']} | "
              f"{r['rho']} |" for r in rows]
    if note := failed_note(records):
        lines += ["", note]
    return "\n".join(lines) + "\n"


RUN_COLUMNS = ["variant", "label", "algo", "seed", "status", "final_return", "final_cost", "median_radius", "at_floor",
               "median_rho", "updates", "n_points", "last_k", "cost_limit", "total_env_steps", "num_envs", "wall_s",
               "run_dir"]
SUMMARY_COLUMNS = ["variant", "label", "change", "seeds", "return_mean", "return_std", "cost_mean", "cost_std",
                   "median_radius", "at_floor", "median_rho", "cost_limit", "total_env_steps"]
CURVE_COLUMNS = ["variant", "seed", "env_steps", "episode_return", "episode_cost"]


def _write(out: Path, records: list[dict], s: dict) -> None:
    order = {k: i for i, k in enumerate(VARIANTS)}
    write_csv(out / "runs.csv", RUN_COLUMNS,
              sorted(records, key=lambda r: (order.get(r.get("variant"), 99), r["seed"])))
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows(records, s["variants"]))
    (out / "radius.md").write_text(table(records, s))


def plot_rows(keys: list[str]) -> list[list[str]]:
    if len(keys) <= 4:
        return [keys]
    ref = ["adaptive"] if "adaptive" in keys else []
    rows = [ref + [k for k in group if k in keys] for group in PLOT_GROUPS]
    return [r for r in rows if len(r) > len(ref)] or [keys]


def _plot(out: Path, curves: list[tuple], radii: list[tuple], records: list[dict], s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {k: colors[i % len(colors)] for i, k in enumerate(VARIANTS)}
    rows = plot_rows(s["variants"])
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 3.6 * len(rows)), squeeze=False)
    limit = next((r["cost_limit"] for r in records if r.get("cost_limit") is not None), None)
    first = s["seeds"][0]
    for (ax_r, ax_c, ax_d), keys in zip(axes, rows):
        for key in keys:
            series = by_seed(curves, lambda variant, *_: variant == key)  # noqa: B023  (called within the iteration)
            plot_return_and_cost(ax_r, ax_c, series, color[key], VARIANTS[key][0])
            pts = sorted((x, r) for v, seed, x, r, _ in radii if v == key and seed == first)
            if pts:
                ax_d.plot([p[0] for p in pts], [p[1] for p in pts], color=color[key], label=VARIANTS[key][0])
        finish_return_and_cost(ax_r, ax_c, limit)
        ax_d.set(yscale="log", xlabel="env steps", ylabel="δ̂ (cgpo/radius)", title=f"δ̂ per update, seed {first}")
        ax_d.grid(alpha=0.3)
        if ax_d.get_legend_handles_labels()[0]:
            ax_d.legend(fontsize=7)
    save_figure(fig, out / "radius.png",
                f"{s['task']}: CGPO adaptive vs fixed δ̂ and ablations (mean ± std over seeds)")


def run(args) -> Path:
    s = _settings(args)
    console, out = study_console_and_out("cgpo-radius", args)
    jobs = plan(s, out)  # every config validated before anything is created or started
    warn_if_no_episode(jobs[0], console)
    record_plan(out, console, {**s, "runs": planned_runs(jobs, "variant", "seed", "name", "config", "overrides")},
                f"study cgpo-radius: {len(jobs)} CGPO runs ({len(s['variants'])} variants × {len(s['seeds'])} "
                f"seeds, {s['steps']:,} env steps each) on {s['task']}")
    t0 = time.perf_counter()

    def describe(r: dict) -> str:
        return (f"{r['label']} seed {r['seed']} in {r.get('wall_s', 0):.0f} s: final return {r['final_return']:.3g}, "
                f"cost {r['final_cost']:.3g} (limit {r['cost_limit']:g}), median δ̂ {r['median_radius']:.2g}")

    records, curves, radii = train_and_measure(jobs, args, console, lambda r, j: measure(r, j, s["last_k"]),
                                               lambda done: _write(out, done, s), describe)
    write_csv(out / "curves.csv", CURVE_COLUMNS,
              [dict(zip(CURVE_COLUMNS, c)) for c in sorted(curves, key=lambda c: (c[0], c[1], c[2]))])
    _plot(out, curves, radii, records, s)
    console.print((out / "radius.md").read_text())
    return finish_study(console, records, out, t0, "radius.md, summary.csv, runs.csv, curves.csv, radius.png")
