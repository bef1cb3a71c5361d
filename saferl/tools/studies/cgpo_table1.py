"""CGPO paper, Table 1: Conv. Steps and Vio. Ratio of CGPO and its baselines on the Brax tasks.

The rows are the paper's: PDO, APPO, CPO, CUP (sampling algorithms, through the numpy protocol),
BPTT-Lag, SHAC-Lag and CGPO (analytic gradients); ``--algos`` may add any other registered
algorithm (e.g. ppo_lag), which then has no paper row.

    saferl study cgpo-table1                          reduced run (1 seed, 50k steps, 16 envs)
    saferl study cgpo-table1 --paper                  Table 4 scale: 5 seeds, each config's budget
                                                      (epochs × envs × T) and envs
    saferl study cgpo-table1 --tasks FunctionEnv-v0 --algos cgpo,shac_lag --budget 20000

Every (task, algo, seed) is one ``saferl train`` of ``configs/<algo>/<task>.yaml`` (through
``cluster.session.train``, all in one Ray session: the local embedded one, or a cluster's with
``--address`` / $RAY_ADDRESS), with ``--set`` overrides passed through. The study reads each
run's ``metrics.csv`` and writes into ``--out``:

    runs.csv      one row per run: Conv. Steps, Vio. Ratio, counts, final return/cost, run dir
    curves.csv    the evaluation curves the metrics are computed on (task, algo, seed, x, R, C)
    table1.md     Table 1's layout: one row per algorithm, per task Conv. Steps and Vio. Ratio
                  (mean ± std over seeds), with the paper's numbers below for reference; every
                  cell of a task that differs from the paper's (``TASK_DEVIATIONS``) carries the
                  deviation next to the number, in both tables
    curves.png    episode cost (and return) vs env steps per algorithm, one column per task,
                  with the cost limit
    study.json    the settings (flags, metric parameters) the outputs were produced with
    runs/         the run directories ``<algo>-<task>-s<seed>``

Re-running with the same ``--out`` keeps finished runs (their ``study_done.json``), resumes
interrupted ones from their last checkpoint, and recomputes the metrics and outputs, so changing
``--conv-window`` etc. costs no training.

**The curve.** Per run, the points (x_i, R_i, C_i), i = 0..n−1, are the logged iterations in
which episodes finished: x_i = env steps so far, R_i / C_i = mean return / cost (undiscounted
sums over the episode, J_R and J_C) of the episodes finished in that iteration. Gradient
algorithms finish an episode of every env each T/h policy updates; the sampling algorithms (PDO,
APPO, CPO, CUP: one episode per env per iteration in the shipped configs) each update. The study
forces ``schedule.log_every=1`` so no finished episode is dropped. b is the cost limit.

**Conv. Steps (F.2.1).** "The convergence point on the episodic return curve is the point from
which the range of variation within a given window is less than a set threshold", and it must
meet the constraint:

    k* = min { k :  x_k + W ≤ x_{n−1},   |I_k| ≥ 2,
                    max_{i ∈ I_k} R_i − min_{i ∈ I_k} R_i  ≤  τ · (max_i R_i − min_i R_i),
                    C_k ≤ b + m },          I_k = { i : x_k ≤ x_i ≤ x_k + W }
    Conv. Steps = x_{k*}        (undefined, "-", when no k qualifies)

with window W = ``--conv-window`` × budget (default 0.1), τ = ``--conv-tol`` (default 0.1) and
the soft margin m = ``--margin`` × |b| (default 0.05).

**Vio. Ratio (F.2.2).** Updates "nearing the constraint threshold" are in the safety-critical
area; the ratio is the share of those that violate the constraint, with a soft margin:

    critical  K = { i < n−1 : |C_i − b| ≤ w }          (the update i → i+1 starts near b)
    violation     C_{i+1} > b + m                        (the policy it produced violates)
    Vio. Ratio = 100 · |{ i ∈ K : C_{i+1} > b + m }| / |K|   (undefined, "-", when K is empty)

with band w = ``--vio-band`` × |b| (default 0.2). An undefined entry is the paper's "-†": no
updates in the safety-critical region.

Choices not fixed by the paper (F.2 gives no formulas or numbers):
* the window is measured in env steps (a fraction of the run's budget), so algorithms that log
  at different intervals are judged over the same span; it must be fully observed (x_k + W ≤
  x_{n−1}), so a run cannot "converge" in its last window, and hold at least two points (one
  point shows no variation);
* the threshold is relative to the run's own return range (scale-free across tasks; a run whose
  return still moves by more than τ of its total improvement per window has not converged);
  "range of variation" = max − min; no smoothing (Figure 4 is unsmoothed);
* "the convergence point meets the constraints": the cost at that point, C_k ≤ b + m, with the
  same soft margin as Vio. Ratio;
* Vio. Ratio counts *updates* (consecutive curve points): an update is in the critical area when
  the policy it starts from has |C_i − b| ≤ w, and violates when the policy it produces has
  C_{i+1} > b + m. (Counting points with |C − b| ≤ w instead would never count a large
  overshoot, which is what the metric is meant to penalise.) Widths are relative to |b|, which
  works for CartPole's negative limit (b = −50) too;
* mean ± std over seeds is over the seeds where the metric is defined (std with ddof = 1); a
  cell shows "(k/n)" when only k of n seeds define it;
* budgets: Table 4's "num epochs" is read as full episodes of every env, so a config's
  ``total_env_steps`` = epochs × envs × T (see the Brax configs); the reduced default here
  (``--budget 50000 --envs 16``) only checks that everything runs. ``--envs N`` rescales each
  config to N envs (keeping its hosts when N allows, and a sampling algorithm's steps per env per
  iteration).
* deviating tasks (``TASK_DEVIATIONS``): CartPole's reward is reshaped (the literal +1 has no
  gradient without termination) and Reacher's limit 400 cannot bind under the written cost; every
  number of those tasks, the runs' and the paper's, is printed with the deviation next to it, as
  is a cost limit other than Table 4's (``--set cost_limit=...``).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from saferl.tools.studies.runner import (
    add_run_arguments,
    by_seed,
    csv_list,
    failed_note,
    finish_study,
    format_mean_std,
    plan_job,
    planned_runs,
    plot_return_and_cost,
    read_curve,
    record_plan,
    require_positive,
    run_jobs,
    save_figure,
    shipped_config,
    study_console_and_out,
    write_csv,
)

HELP = ("CGPO paper Table 1: Conv. Steps and Vio. Ratio of PDO, APPO, CPO, CUP, BPTT-Lag, SHAC-Lag and CGPO "
        "on the Brax tasks")

PAPER_TASKS = ("BraxCartPole-v1", "BraxReacher-v0", "BraxHalfCheetahVel-v0", "BraxAntVel-v0")
PAPER_ALGOS = ("pdo", "appo", "cpo", "cup", "bptt_lag", "shac_lag", "cgpo")  # Table 1's rows, in its order
ALGO_LABELS = {"pdo": "PDO", "appo": "APPO", "cpo": "CPO", "cup": "CUP", "ppo_lag": "PPO-Lag",
               "bptt_lag": "BPTT-Lag", "shac_lag": "SHAC-Lag", "cgpo": "CGPO", "shac": "SHAC"}
TASK_LABELS = {"BraxCartPole-v1": "CartPole", "BraxReacher-v0": "Reacher",
               "BraxHalfCheetahVel-v0": "HalfCheetah", "BraxAntVel-v0": "Ant"}
# CGPO paper, Table 1 (Conv. Steps, Vio. Ratio %; None = "-†"), tasks in PAPER_TASKS order.
PAPER_TABLE1 = {
    "PDO": [(4.99e6, 12.01), (3.99e6, 64.42), (3.43e6, 74.58), (1.70e7, 51.84)],
    "APPO": [(5.95e6, 6.59), (4.22e6, 46.04), (3.58e6, 18.33), (1.08e7, 9.54)],
    "CPO": [(6.72e6, 5.96), (1.98e6, 30.68), (5.81e6, None), (1.69e7, 24.56)],
    "CUP": [(6.84e6, 19.21), (7.76e6, 56.12), (5.12e6, 57.40), (9.29e6, 29.79)],
    "BPTT-Lag": [(3.84e6, 23.99), (2.73e6, 67.88), (2.32e6, 61.56), (2.13e7, None)],
    "SHAC-Lag": [(2.32e6, 46.31), (2.96e6, 50.59), (3.15e6, 65.90), (1.67e7, 57.53)],
    "CGPO": [(1.77e6, 3.96), (1.15e6, 14.29), (2.02e6, 7.31), (8.52e6, 6.44)],
}
# Where a task here is not the paper's experiment (envs/brax_tasks.py gives the reasons): the mark
# printed next to every number of that task, ours and the paper's.
TASK_DEVIATIONS = {
    "BraxCartPole-v1": "task differs: reward reshaped, fallen pole reset",
    "BraxReacher-v0": "limit unreachable under the written cost",
}
TASK_DEVIATION_DETAILS = {
    "BraxCartPole-v1": "Brax's inverted pendulum pays +1 per step and terminates once |θ| > 0.2; with the "
                       "paper's fixed horizon and no termination that reward has zero gradient, so the "
                       "reward here is 1 − (θ/0.2)², a smooth stand-in, and a pole past 1.4 rad is put back "
                       "upright within the episode (a pole resting on the ±90° hinge limit gives analytic "
                       "gradients about 100× too small to recover; BraxCartPole-v0 keeps that)",
    "BraxReacher-v0": "the written cost Σ_t ‖fingertip position‖² is at most 300 · 0.21² ≈ 13.2 over T = 300, so "
                      "the limit 400 never binds: every policy is feasible and Vio. Ratio has no safety-critical "
                      "update",
}
PAPER_LIMITS = {"BraxCartPole-v1": -50.0, "BraxReacher-v0": 400.0, "BraxHalfCheetahVel-v0": 400.0,
                "BraxAntVel-v0": 1000.0}  # Table 4
DEFAULTS = {"seeds": 1, "budget": "50000", "envs": "16"}
PAPER = {"seeds": 5, "budget": "config", "envs": "config"}


# ---------------------------------------------------------------------------------------------
# the metrics (pure functions; unit-tested against hand-computed examples)
# ---------------------------------------------------------------------------------------------
def soft_limit(limit: float, margin: float) -> float:
    """b + m with m = margin · |b|: above this a policy violates the constraint."""
    return limit + margin * abs(limit)


def conv_steps(steps, returns, costs, limit: float, *, window: float, tol: float = 0.1,
               margin: float = 0.05) -> float | None:
    """Conv. Steps (F.2.1): x_k of the first point k whose window [x_k, x_k + window] (fully
    observed, at least two points) has return range ≤ tol · (the run's return range) and whose
    cost C_k ≤ b + m. None when no point qualifies."""
    n = len(steps)
    if n == 0 or not (len(returns) == len(costs) == n):
        return None
    threshold = tol * (max(returns) - min(returns))
    feasible_below = soft_limit(limit, margin)
    last = steps[-1]
    for k in range(n):
        if steps[k] + window > last:
            break  # the window is no longer fully observed (steps are increasing)
        if costs[k] > feasible_below:
            continue
        inside = [returns[i] for i in range(k, n) if steps[i] <= steps[k] + window]
        if len(inside) >= 2 and max(inside) - min(inside) <= threshold:
            return float(steps[k])
    return None


def vio_ratio(costs, limit: float, *, band: float = 0.2, margin: float = 0.05) -> tuple[float | None, int, int]:
    """Vio. Ratio (F.2.2) in percent, with the number of critical updates and of violations:
    updates i → i+1 starting near the limit (|C_i − b| ≤ band · |b|) that end above b + m.
    The ratio is None when no update starts near the limit."""
    width, above = band * abs(limit), soft_limit(limit, margin)
    critical = [i for i in range(len(costs) - 1) if abs(costs[i] - limit) <= width]
    violations = sum(costs[i + 1] > above for i in critical)
    return (100.0 * violations / len(critical) if critical else None), len(critical), violations


def format_cell(values: list[float | None], kind: str) -> str:
    """A Table 1 cell: Conv. Steps ("steps") in e-notation, ratios with two decimals."""
    return format_mean_std(values, ".2e" if kind == "steps" else ".2f")


def task_marks(task: str, limits: set[float] | None = None) -> list[str]:
    """The deviations of ``task`` from the paper's experiment: ``TASK_DEVIATIONS``, and a cost
    limit other than Table 4's when ``limits`` (those of the runs) has one."""
    marks = [TASK_DEVIATIONS[task]] if task in TASK_DEVIATIONS else []
    if task in PAPER_LIMITS and limits and any(b != PAPER_LIMITS[task] for b in limits):
        marks.append(f"limit differs: {', '.join(f'{b:g}' for b in sorted(limits))} here, "
                     f"{PAPER_LIMITS[task]:g} in the paper")
    return marks


def marked(cell: str, marks: list[str]) -> str:
    """A cell with its task's deviations next to the number."""
    return f"{cell} ({'; '.join(marks)})" if marks else cell


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--tasks", type=csv_list, default=list(PAPER_TASKS),
                   help=f"comma-separated task names (default: {','.join(PAPER_TASKS)})")
    p.add_argument("--algos", type=csv_list, default=list(PAPER_ALGOS),
                   help=f"comma-separated algorithms, table row order (default: {','.join(PAPER_ALGOS)})")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds per (task, algo): 0..N-1 (default {DEFAULTS['seeds']}; paper {PAPER['seeds']})")
    p.add_argument("--budget", default=None,
                   help=f"env steps per run, or 'config' for each config's total_env_steps = Table 4's "
                        f"epochs × envs × T (default {DEFAULTS['budget']})")
    p.add_argument("--envs", default=None,
                   help=f"envs per run (over all hosts), or 'config' for Table 4's (default {DEFAULTS['envs']})")
    p.add_argument("--paper", action="store_true",
                   help="paper scale: --seeds 5 --budget config --envs config (explicit flags still win)")
    add_run_arguments(p, "cgpo-table1",
                      set_help="config override passed to every run, e.g. resources.num_gpus_per_learner=1",
                      parallel_help="runs trained at the same time (one driver thread each; default 1)",
                      address_help="Ray cluster to join (default $RAY_ADDRESS; none: start a local one)")
    p.add_argument("--conv-window", type=float, default=0.1,
                   help="Conv. Steps window W as a fraction of the budget (default 0.1)")
    p.add_argument("--conv-tol", type=float, default=0.1,
                   help="Conv. Steps threshold τ as a fraction of the run's return range (default 0.1)")
    p.add_argument("--vio-band", type=float, default=0.2,
                   help="safety-critical band w as a fraction of |cost limit| (default 0.2)")
    p.add_argument("--margin", type=float, default=0.05,
                   help="soft margin m as a fraction of |cost limit| (default 0.05)")


def _settings(args) -> dict:
    from saferl.config import ConfigError

    s = {}
    for key in ("seeds", "budget", "envs"):
        given = getattr(args, key)
        s[key] = given if given is not None else (PAPER if args.paper else DEFAULTS)[key]
    for key in ("budget", "envs"):
        if str(s[key]).lower() == "config":
            s[key] = None
            continue
        try:
            s[key] = int(float(s[key]))
        except ValueError:
            raise ConfigError(f"usage error: --{key} {s[key]!r}: expected a number or 'config'") from None
        if s[key] <= 0:
            raise ConfigError(f"usage error: --{key} must be > 0 (got {s[key]})")
    require_positive(("--seeds", s["seeds"]), ("--parallel", args.parallel))
    if args.conv_window <= 0 or args.conv_tol < 0 or args.vio_band < 0 or args.margin < 0:
        raise ConfigError("usage error: --conv-window must be > 0; --conv-tol, --vio-band, --margin >= 0")
    if not args.tasks or not args.algos:
        raise ConfigError("usage error: --tasks and --algos need at least one name")
    return s


def _env_overrides(base, envs: int | None) -> list[str]:
    """Rescale a config to ``envs`` envs: the largest host count ≤ its own that divides envs;
    sampling algorithms keep their steps per env per iteration."""
    if envs is None:
        return []
    r = base.resources
    hosts = min(r.num_env_hosts, envs)
    while envs % hosts:
        hosts -= 1
    out = [f"resources.num_env_hosts={hosts}", f"resources.envs_per_host={envs // hosts}"]
    if base.algo_spec.kind == "sampling":
        per_env = max(1, base.steps_per_iteration // (r.num_env_hosts * r.envs_per_host))
        out.append(f"steps_per_iteration={per_env * envs}")
    return out


def _plan(args, s: dict, out: Path) -> list[dict]:
    """Validate every (task, algo, seed) config before anything runs."""
    from saferl import registry
    from saferl.config import ConfigError, load_config

    unknown = [t for t in args.tasks if t not in registry.TASKS]
    if unknown:
        missing_brax = [t for t in unknown if t in PAPER_TASKS]
        hint = (" (the Brax tasks are registered by saferl/registry.py from envs/brax_tasks.py; "
                "until then try --tasks FunctionEnv-v0)") if missing_brax else ""
        raise ConfigError(f"study error: unknown task {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(sorted(registry.TASKS))}{hint}")
    unknown = [a for a in args.algos if a not in registry.ALGORITHMS]
    if unknown:
        raise ConfigError(f"study error: unknown algorithm {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(sorted(registry.ALGORITHMS))}")
    jobs = []
    for task in args.tasks:
        for algo in args.algos:
            base = load_config(shipped_config(algo, task)[0], list(args.set))
            mine = _env_overrides(base, s["envs"])
            if s["budget"] is not None:
                mine.append(f"total_env_steps={s['budget']}")
            jobs += [plan_job(algo, task, seed, out, mine, args.set) for seed in range(s["seeds"])]
    return jobs


def _evaluate(record: dict, args) -> tuple[dict, list[tuple]]:
    """Add the metrics to a run's record; return its curve rows."""
    path = Path(record["run_dir"]) / "metrics.csv"
    if not record["status"].startswith("ok") or not path.is_file():
        return record, []
    x, ret, cost = read_curve(path)
    b = record["cost_limit"]
    conv = conv_steps(x, ret, cost, b, window=args.conv_window * record["total_env_steps"],
                      tol=args.conv_tol, margin=args.margin)
    vio, n_crit, n_vio = vio_ratio(cost, b, band=args.vio_band, margin=args.margin)
    record.update(conv_steps=conv, vio_ratio=vio, n_points=len(x), n_critical=n_crit, n_violations=n_vio,
                  final_return=ret[-1] if ret else None, final_cost=cost[-1] if cost else None)
    rows = [(record["task"], record["algo"], record["seed"], xi, ri, ci) for xi, ri, ci in zip(x, ret, cost)]
    return record, rows


RUN_COLUMNS = ["task", "algo", "seed", "status", "conv_steps", "vio_ratio", "n_points", "n_critical",
               "n_violations", "final_return", "final_cost", "cost_limit", "total_env_steps", "num_envs",
               "wall_s", "task_deviation", "run_dir"]


def _write_runs(out: Path, records: list[dict]) -> None:
    rows = [{**r, "task_deviation": "; ".join(task_marks(r["task"], {r["cost_limit"]}))} for r in records]
    write_csv(out / "runs.csv", RUN_COLUMNS, sorted(rows, key=lambda r: (r["task"], r["algo"], r["seed"])))


def _write_table(out: Path, records: list[dict], args, s: dict) -> None:
    tasks, algos = args.tasks, args.algos
    label = lambda t: TASK_LABELS.get(t, t)  # noqa: E731
    header = ["Algorithms"] + [f"{label(t)} {m}" for t in tasks for m in ("Conv. Steps ↓", "Vio. Ratio (%) ↓")]
    budget = "each config's total_env_steps" if s["budget"] is None else f"{s['budget']:,} env steps"
    envs = "each config's" if s["envs"] is None else s["envs"]
    marks = {t: task_marks(t, {r["cost_limit"] for r in records if r["task"] == t}) for t in tasks}
    lines = ["# CGPO paper, Table 1: reproduction", "",
             f"{s['seeds']} seed(s) per cell (mean ± std over seeds); budget {budget} per run; envs {envs}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for algo in algos:
        cells = [ALGO_LABELS.get(algo, algo)]
        for task in tasks:
            rs = [r for r in records if r["task"] == task and r["algo"] == algo]
            cells.append(marked(format_cell([r.get("conv_steps") for r in rs], "steps"), marks[task]))
            cells.append(marked(format_cell([r.get("vio_ratio") for r in rs], "ratio"), marks[task]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "-: undefined for every seed (Conv. Steps: no convergence point that meets the constraint; "
              "Vio. Ratio: no update started in the safety-critical band, the paper's \"-†\"). "
              "(k/n): defined for k of n seeds."]
    if note := failed_note(records):
        lines.append(note)
    for task in tasks:
        if task in TASK_DEVIATIONS:
            lines += ["", f"{label(task)} ({TASK_DEVIATIONS[task]}): {TASK_DEVIATION_DETAILS[task]}."]
    lines += ["", f"Metric settings (F.2; formulas in `saferl/tools/studies/cgpo_table1.py`): window W = "
              f"{args.conv_window} × budget, threshold τ = {args.conv_tol} × the run's return range, "
              f"safety-critical band w = {args.vio_band} × |b|, soft margin m = {args.margin} × |b|."]
    paper_cols = [PAPER_TASKS.index(t) for t in tasks if t in PAPER_TASKS]
    if paper_cols:
        scale = ("the same budgets as the paper's" if s["budget"] is None
                 else f"{s['budget']:,} env steps per run, not the paper's {PAPER['seeds']} seeds at Table 4's budgets")
        lines += ["", "## The paper's numbers (CGPO paper, Table 1; 5 seeds, Table 4 budgets)", "",
                  f"For reference only: the runs above used {s['seeds']} seed(s) and {scale}; a cell marked "
                  "with a deviation is the paper's number for a task that differs from the one run here.", "",
                  "| Algorithms | " + " | ".join(f"{label(PAPER_TASKS[j])} {m}" for j in paper_cols
                                               for m in ("Conv. Steps ↓", "Vio. Ratio (%) ↓")) + " |",
                  "|" + "---|" * (1 + 2 * len(paper_cols))]
        for name, vals in PAPER_TABLE1.items():
            cells = [name]
            for j in paper_cols:
                steps, ratio = vals[j]
                m = marks[PAPER_TASKS[j]]
                cells += [marked(f"{steps:.2e}", m), marked("-†" if ratio is None else f"{ratio:.2f}", m)]
            lines.append("| " + " | ".join(cells) + " |")
    (out / "table1.md").write_text("\n".join(lines) + "\n")


def _write_curves(out: Path, curves: list[tuple]) -> None:
    with open(out / "curves.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "algo", "seed", "env_steps", "episode_return", "episode_cost"])
        w.writerows(sorted(curves, key=lambda r: (r[0], r[1], r[2], r[3])))


def _plot(out: Path, curves: list[tuple], records: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, algos = args.tasks, args.algos
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, task in enumerate(tasks):
        limit = next((r["cost_limit"] for r in records if r["task"] == task), None)
        for a, algo in enumerate(algos):
            series = by_seed(curves, lambda t, al: (t, al) == (task, algo))  # noqa: B023  (called within the iteration)
            plot_return_and_cost(axes[0][j], axes[1][j], series, colors[a % len(colors)], ALGO_LABELS.get(algo, algo))
        if limit is not None:
            axes[1][j].axhline(limit, color="k", linestyle="--", linewidth=1, label=f"cost limit {limit:g}")
            if args.margin > 0:
                axes[1][j].axhline(soft_limit(limit, args.margin), color="k", linestyle=":", linewidth=0.8,
                                   label="limit + soft margin")
        m = task_marks(task, {r["cost_limit"] for r in records if r["task"] == task})
        axes[0][j].set_title(TASK_LABELS.get(task, task) + "".join(f"\n({x})" for x in m), fontsize=9 if m else None)
        axes[0][j].set_ylabel("episode return")
        axes[1][j].set_ylabel("episode cost")
        axes[1][j].set_xlabel("env steps")
        for row in (0, 1):
            axes[row][j].grid(alpha=0.3)
            if axes[row][j].get_legend_handles_labels()[0]:
                axes[row][j].legend(fontsize=7)
    save_figure(fig, out / "curves.png", "CGPO paper, Table 1 study\n(mean ± std over seeds)")


def run(args) -> Path:
    s = _settings(args)
    console, out = study_console_and_out("cgpo-table1", args)
    jobs = _plan(args, s, out)  # every config validated before anything is created or started
    for job in jobs[:: s["seeds"]]:  # one warning per (task, algo)
        cfg = job["cfg"]
        rounds = cfg.total_env_steps // (cfg.resources.num_env_hosts * cfg.resources.envs_per_host
                                         * cfg.task_spec.max_episode_steps)
        if rounds < 3:
            console.print(f"[yellow]warning[/yellow]: {job['algo']} on {job['task']}: the budget gives {rounds} "
                          "episode(s) per env, too few points for the metrics; raise --budget or lower --envs")
    record_plan(out, console, {"settings": s, "tasks": args.tasks, "algos": args.algos, "set": args.set,
                               "conv_window": args.conv_window, "conv_tol": args.conv_tol, "vio_band": args.vio_band,
                               "margin": args.margin,
                               "runs": planned_runs(jobs, "task", "algo", "seed", "config", "overrides")},
                f"study cgpo-table1: {len(jobs)} runs ({len(args.tasks)} tasks × {len(args.algos)} algos × "
                f"{s['seeds']} seeds)")

    t_start = time.perf_counter()
    curves: list[tuple] = []
    done: list[dict] = []

    def finish(record: dict, tag: str) -> None:
        record, rows = _evaluate(record, args)
        done.append(record)
        curves.extend(rows)
        _write_runs(out, done)  # partial results while a long study runs
        _write_table(out, done, args, s)
        if record["status"].startswith("ok"):
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            vio = "-" if record.get("vio_ratio") is None else f"{record['vio_ratio']:.1f}%"
            console.print(f"{tag} done {record['algo']} on {record['task']} seed {record['seed']} "
                          f"in {record.get('wall_s', 0):.0f} s: Conv. Steps {fmt(record.get('conv_steps'), '.3g')}, "
                          f"Vio. Ratio {vio} ({record.get('n_violations')}/{record.get('n_critical')} critical "
                          f"updates), final return {fmt(record.get('final_return'), '.3g')}, "
                          f"cost {fmt(record.get('final_cost'), '.3g')} (limit {record['cost_limit']:g}"
                          + "".join(f"; {m}" for m in task_marks(record["task"], {record["cost_limit"]})) + ")")

    records = run_jobs(jobs, args, console, finish)
    _write_curves(out, curves)
    _write_table(out, records, args, s)
    _plot(out, curves, records, args)
    console.print((out / "table1.md").read_text().split("\n\n")[2])
    return finish_study(console, records, out, t_start, "table1.md, runs.csv, curves.csv, curves.png")
