"""SafeGBPO paper ("Provably Safe Reinforcement Learning from Analytic Gradients"), Tables 2-6:
safeguarded training (boundary projection, ray mask and their modifications) with SHAC, PPO and
SAC on the Pendulum and the planar Quadrotor.

    saferl study safeguards                 reduced run (< 1 h on 2 cores): Pendulum; none, BP, RM
                                            × SHAC, PPO, SAC; 2 seeds; short budgets
    saferl study safeguards --paper         10 seeds, both tasks, Tables 3-6: {none, BP, RM} × the
                                            three algorithms, plus every SHAC modification of
                                            Tables 4-5 (BPReg, RMReg, RMPass, RMHyp, RMHypReg, RMOrth)
    saferl study safeguards --tasks SafeGBPOQuadrotor-v0 --variants none,RM --algos shac --seeds 3

A run is ``saferl train <algo>/<task>-<variant>-v0`` (``none``: the unsafeguarded task) with the
shipped config of the base task, ``total_env_steps`` from ``--budget``. Every run's final
checkpoint is evaluated (``--eval-episodes`` deterministic episodes). Outputs in ``--out``:

    table.md      per task, one row per (safeguard, algorithm): # Steps, Reward with bootstrap 95%
                  CI, # Stuck, violations in training and evaluation, wall-clock ratio to unsafe
    runs.csv      one row per run with every number the table is computed from
    curves.csv    (task, variant, algo, seed, env steps, episode return, episode cost)
    curves.png    episode return vs env steps, one panel per (task, algorithm), a line per variant
    study.json    the settings
    runs/         the run directories ``<algo>-<task>-s<seed>``

Re-running with the same ``--out`` keeps finished runs and resumes interrupted ones.

The safe set is built from the next-state set linearised at the current state (paper eq 13).
The *Reg variants' regulariser c_reg·MSE(a_safe, a) is a term of SHAC's policy loss, never of
the rewards: every return here (training curves and evaluation) is the task's reward alone. PPO
and SAC post-process actions through the safeguard without a regulariser (the reference applies
it in SHAC only), so they run the *Reg variants as the plain ones.

**Definitions** (the paper, §6: "# Steps until convergence, defined as reaching within 5% of the
final policy, and the number of runs that did not converge within the maximum allowed simulation
steps (# Stuck) ... non-convergent runs [are excluded] from the reward and step calculations"):

* the curve: per logged iteration the mean return R_i of the episodes finished in it, smoothed by
  a trailing mean over ``--smooth`` points (default 3); x_i = env steps so far;
* R_final = the smoothed curve's last value;
* # Steps = the first x_k from which the smoothed curve stays within ``--band`` (default 5%) of
  |R_final|: |R_i − R_final| ≤ band · |R_final| for every i ≥ k;
* stuck = # Steps later than (1 − ``--settle``) of the budget (default settle 0.1: the curve has
  not stayed in the band over at least the last 10% of the run);
* Reward = mean deterministic evaluation return of the final policies of the converged runs,
  with a percentile-bootstrap 95% CI over their pooled evaluation episodes (2000 resamples);
  over all runs, marked †, when none converged;
* violations = Σ episode costs (steps outside the RCI set or the state box) over all training
  episodes; must be 0 for every safeguarded run (the study reports any that is not);
* wall-clock ratio = (training seconds per env step) / (the same algorithm's unsafe runs'), the
  iteration times summed from metrics.csv (actor start-up excluded), mean over seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from saferl.metric_keys import EPISODE_COST, EPISODE_COUNT
from saferl.tools.studies.runner import (
    add_run_arguments,
    csv_list,
    failed_note,
    finish_study,
    plan_job,
    planned_runs,
    plot_mean_std,
    record_plan,
    run_jobs,
    save_figure,
    study_console_and_out,
    write_csv,
)

HELP = "SafeGBPO paper, Tables 2-6: safeguards (boundary projection, ray mask) with SHAC, PPO and SAC"

TASKS = ("SafeGBPOPendulum-v0", "SafeGBPOQuadrotor-v0")
BASE_VARIANTS = ("none", "BP", "RM")
MODIFICATIONS = ("BPReg", "RMReg", "RMPass", "RMHyp", "RMHypReg", "RMOrth")
ALGOS = ("shac", "ppo", "sac")
ALGO_LABELS = {"shac": "SHAC", "ppo": "PPO", "sac": "SAC"}
DEFAULT_BUDGET = {"shac": 48_000, "ppo": 192_000, "sac": 24_000}
PAPER_BUDGET = {"shac": 192_000, "ppo": 400_000, "sac": 200_000}
# The SafeGBPO paper, Table 6 (wall-clock relative to unsafe, Pendulum, 10k steps) for reference.
PAPER_WALL = {"BP": {"shac": 5.089, "ppo": 4.483, "sac": 4.774}, "RM": {"shac": 9.857, "ppo": 8.100, "sac": 7.500}}


# ---------------------------------------------------------------------------------------------
# the metrics (pure functions; unit-tested)
# ---------------------------------------------------------------------------------------------
def smooth(values: list[float], k: int) -> list[float]:
    """Trailing mean over up to k points."""
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def steps_to_band(steps: list[float], returns: list[float], band: float) -> float | None:
    """First x_k from which every R_i (i ≥ k) is within band · |R_final| of R_final."""
    if not returns:
        return None
    final = returns[-1]
    width = band * abs(final)
    k = len(returns) - 1
    while k > 0 and abs(returns[k - 1] - final) <= width:
        k -= 1
    return float(steps[k])


def bootstrap_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap 95% CI of the mean."""
    import numpy as np

    if len(values) < 2:
        return None
    v = np.asarray(values, float)
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def training_violations(metrics_csv: Path) -> tuple[float, int]:
    """(Σ episode costs, episodes) over a run's training, from the logged means × counts (the last
    row wins for an iteration logged twice by a resume)."""
    import csv

    rows: dict[int, tuple[float, int]] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get(EPISODE_COUNT):
                rows[int(float(row["iteration"]))] = (float(row[EPISODE_COST]), int(float(row[EPISODE_COUNT])))
    return sum(c * n for c, n in rows.values()), sum(n for _, n in rows.values())


def train_seconds(metrics_csv: Path) -> float:
    import csv

    per_it: dict[int, float] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            per_it[int(float(row["iteration"]))] = float(row["time/iteration_s"])
    return sum(per_it.values())


def shac_in_process(config: str, overrides: list[str] | None = None, iterations: int = 8,
                    device: str = "cpu", on_update=None) -> list[dict]:
    """Train a window learner (SHAC) for ``iterations`` windows in this process — one gradient
    worker over all envs, no Ray, exactly the learner/worker pair a run uses — and return each
    update's metrics plus ``episodes`` (the returns and costs of the episodes that ended). For
    the tests and the gradient-norm measurement of docs/results/safegbpo.md. ``on_update(i,
    metrics)`` is called after each update."""
    import torch

    from saferl.actors.gradient_worker import GradientWorker, make_diff_env
    from saferl.config import load_config
    from saferl.learners.base import EnvSpec

    cfg = load_config(config, overrides or [])
    env = make_diff_env(cfg.task)
    spec = EnvSpec.of_env(env)
    learner = cfg.algo_spec.load()(cfg.learner_params(), spec, cfg.limit, torch.device(device), cfg.seed)
    n = cfg.resources.num_env_hosts * cfg.resources.envs_per_host
    worker = GradientWorker(cfg.task, 0, n, n, cfg.seed, learner.arch, device)
    out = []
    for it in range(iterations):
        result, summary = worker.compute(learner.policy_state(), it, learner.horizon, learner.p.stochastic)
        metrics = learner.update([result])
        if hasattr(learner, "phase_dual"):
            learner.phase_dual({})
        out.append({**metrics, "episodes": summary["episodes"]})
        if on_update is not None:
            on_update(it, out[-1])
    return out


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--tasks", type=csv_list, default=None,
                   help=f"base tasks (default SafeGBPOPendulum-v0; paper {','.join(TASKS)})")
    p.add_argument("--variants", type=csv_list, default=list(BASE_VARIANTS),
                   help="safeguards run with every --algos ('none' = unsafe; default none,BP,RM)")
    p.add_argument("--modifications", type=csv_list, default=None,
                   help=f"variants run with SHAC only (Tables 4-5; default none; paper {','.join(MODIFICATIONS)})")
    p.add_argument("--algos", type=csv_list, default=list(ALGOS), help="default shac,ppo,sac")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per cell (default 2; paper 10)")
    p.add_argument("--budget", type=csv_list, default=None,
                   help="env steps per run, per algorithm as algo=steps (default "
                        + ",".join(f"{a}={b}" for a, b in DEFAULT_BUDGET.items()) + "; paper "
                        + ",".join(f"{a}={b}" for a, b in PAPER_BUDGET.items()) + ")")
    p.add_argument("--paper", action="store_true", help="paper scale (explicit flags still win)")
    p.add_argument("--eval-episodes", type=int, default=16, help="deterministic episodes per final policy")
    p.add_argument("--band", type=float, default=0.05, help="convergence band, fraction of |final return|")
    p.add_argument("--settle", type=float, default=0.1,
                   help="a run is stuck unless it stays in the band over this last fraction of its budget")
    p.add_argument("--smooth", type=int, default=3, help="trailing-mean window of the return curve (points)")
    add_run_arguments(p, "safeguards", out_note=None, set_help="override for every run",
                      parallel_help="runs trained at the same time",
                      address_help="Ray cluster to join (default $RAY_ADDRESS or a local one)")


def _settings(args) -> dict:
    from saferl import registry
    from saferl.config import ConfigError

    s = {"tasks": args.tasks or (list(TASKS) if args.paper else [TASKS[0]]),
         "variants": args.variants, "algos": args.algos,
         "modifications": args.modifications if args.modifications is not None
         else (list(MODIFICATIONS) if args.paper else []),
         "seeds": args.seeds or (10 if args.paper else 2)}
    budget = dict(PAPER_BUDGET if args.paper else DEFAULT_BUDGET)
    for item in args.budget or []:
        algo, _, steps = item.partition("=")
        try:
            budget[algo] = int(float(steps))
        except ValueError:
            raise ConfigError(f"usage error: --budget {item!r}: expected algo=steps") from None
    s["budget"] = budget
    variants = set(registry.SAFEGUARD_VARIANTS) | {"none"}
    for v in [*s["variants"], *s["modifications"]]:
        if v not in variants:
            raise ConfigError(f"usage error: unknown variant {v!r}; known: {', '.join(sorted(variants))}")
    for t in s["tasks"]:
        if t not in TASKS:
            raise ConfigError(f"usage error: --tasks {t!r}: the safeguards exist for {', '.join(TASKS)}")
    missing = [a for a in [*s["algos"], *(["shac"] if s["modifications"] else [])] if a not in budget]
    if missing:
        raise ConfigError(f"usage error: --budget has no entry for {missing[0]} (give {missing[0]}=STEPS)")
    if s["seeds"] <= 0 or args.eval_episodes <= 0 or args.parallel <= 0 or args.smooth <= 0:
        raise ConfigError("usage error: --seeds, --eval-episodes, --parallel and --smooth must be > 0")
    return s


def variant_task(base: str, variant: str) -> str:
    return base if variant == "none" else base.replace("-v0", f"-{variant}-v0")


def _plan(args, s: dict, out: Path) -> list[dict]:
    cells = [(t, v, a) for t in s["tasks"] for v in s["variants"] for a in s["algos"]]
    cells += [(t, v, "shac") for t in s["tasks"] for v in s["modifications"] if v not in s["variants"]]
    return [{**plan_job(algo, variant_task(base, variant), seed, out, [f"total_env_steps={s['budget'][algo]}"],
                        args.set), "base": base, "variant": variant}
            for base, variant, algo in cells for seed in range(s["seeds"])]


# ---------------------------------------------------------------------------------------------
# per-run numbers and outputs
# ---------------------------------------------------------------------------------------------
def _measure(record: dict, job: dict, args) -> tuple[dict, list[tuple]]:
    from saferl.tools.evaluate import evaluate
    from saferl.tools.studies.runner import read_curve

    record.update(base=job["base"], variant=job["variant"])
    path = Path(record["run_dir"]) / "metrics.csv"
    if not record["status"].startswith("ok") or not path.is_file():
        return record, []
    x, ret, cost = read_curve(path)
    sm = smooth(ret, args.smooth)
    steps = steps_to_band(x, sm, args.band)
    ev = evaluate(Path(record["run_dir"]), args.eval_episodes)
    viol, episodes = training_violations(path)
    secs = train_seconds(path)
    record.update(steps_to_5pct=steps, stuck=steps is None or steps > (1 - args.settle) * record["total_env_steps"],
                  final_curve_return=sm[-1] if sm else None, eval_return=ev["return_mean"],
                  eval_returns=json.dumps(ev["returns"]), eval_violations=float(sum(ev["costs"])),
                  train_violations=viol, train_episodes=episodes, train_s=secs,
                  s_per_1k_steps=1000 * secs / record["total_env_steps"])
    rows = [(record["task"], job["variant"], record["algo"], record["seed"], xi, ri, ci)
            for xi, ri, ci in zip(x, ret, cost)]
    return record, rows


RUN_COLUMNS = ["base", "variant", "algo", "seed", "status", "steps_to_5pct", "stuck", "final_curve_return",
               "eval_return", "eval_violations", "train_violations", "train_episodes", "train_s", "s_per_1k_steps",
               "total_env_steps", "wall_s", "task", "run_dir", "eval_returns"]


def _fmt(v, f=".3g") -> str:
    return "-" if v is None else format(v, f)


def table(records: list[dict], s: dict) -> str:
    ok = [r for r in records if r["status"].startswith("ok") and "stuck" in r]
    lines = ["# SafeGBPO paper, Tables 2-6: reproduction", "",
             f"{s['seeds']} seed(s) per row; budgets {', '.join(f'{a} {b:,}' for a, b in s['budget'].items())} "
             "env steps. # Steps and Reward over converged runs (mean; Reward with bootstrap 95% CI over their "
             "evaluation episodes); violations = steps outside the RCI set / state box, summed over training "
             "(and evaluation) episodes of all seeds; wall-clock = training time per step relative to the same "
             "algorithm unsafeguarded.", ""]
    marked = False  # a row's Reward is over unconverged runs (the † footnote)
    for base in s["tasks"]:
        lines += [f"## {base}", "", "| Safeguard | Algorithm | # Steps | Reward [95% CI] | # Stuck | "
                  "Violations train (eval) | Wall-clock ratio |", "|---|---|---|---|---|---|---|"]
        unsafe_speed = {}
        for a in s["algos"]:
            rs = [r["s_per_1k_steps"] for r in ok if r["base"] == base and r["variant"] == "none" and r["algo"] == a]
            unsafe_speed[a] = statistics.fmean(rs) if rs else None
        order = [(v, a) for v in s["variants"] for a in s["algos"]] + \
                [(v, "shac") for v in s["modifications"] if v not in s["variants"]]
        for variant, algo in order:
            rs = [r for r in ok if r["base"] == base and r["variant"] == variant and r["algo"] == algo]
            if not rs:
                continue
            conv = [r for r in rs if not r["stuck"]]
            steps = statistics.fmean(r["steps_to_5pct"] for r in conv) if conv else None
            pooled = [v for r in (conv or rs) for v in json.loads(r["eval_returns"])]
            reward = statistics.fmean(pooled)
            ci = bootstrap_ci(pooled)
            ci_text = (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "") + ("" if conv else " †")
            marked = marked or not conv
            viol = sum(r["train_violations"] for r in rs)
            ev_viol = sum(r["eval_violations"] for r in rs)
            speed = statistics.fmean(r["s_per_1k_steps"] for r in rs)
            ratio = speed / unsafe_speed[algo] if unsafe_speed.get(algo) else None
            lines.append(f"| {variant} | {ALGO_LABELS.get(algo, algo)} | {_fmt(steps, '.0f')} | "
                         f"{_fmt(reward, '.4g')}{ci_text} | {len(rs) - len(conv)}/{len(rs)} | {viol:g} ({ev_viol:g}) | "
                         f"{_fmt(ratio, '.2f')} |")
        lines.append("")
    if marked:
        lines += ["† no run converged within its budget: Reward is over all runs.", ""]
    bad = [r for r in ok if r["variant"] != "none" and (r["train_violations"] or r["eval_violations"])]
    lines.append("Safeguarded runs with a violation: " + (", ".join(Path(r["run_dir"]).name for r in bad) or "none")
                 + ".")
    lines += ["", "Paper, Table 6 (Pendulum, wall-clock relative to unsafe): "
              + "; ".join(f"{v}: " + ", ".join(f"{ALGO_LABELS[a]} {x}" for a, x in d.items())
                          for v, d in PAPER_WALL.items()) + "."]
    if note := failed_note(records):
        lines.append(note)
    return "\n".join(lines) + "\n"


def _plot(out: Path, curves: list[tuple], s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    algos = list(dict.fromkeys([*s["algos"], *(["shac"] if s["modifications"] else [])]))
    variants = list(dict.fromkeys([*s["variants"], *s["modifications"]]))
    fig, axes = plt.subplots(len(s["tasks"]), len(algos), figsize=(4.2 * len(algos), 3.4 * len(s["tasks"])),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, base in enumerate(s["tasks"]):
        for j, algo in enumerate(algos):
            ax = axes[i][j]
            for k, variant in enumerate(variants):
                task = variant_task(base, variant)
                series: dict[int, list] = {}
                for t, _v, a, seed, x, ret, _ in curves:
                    if t == task and a == algo:
                        series.setdefault(seed, []).append((x, ret))
                if series:
                    plot_mean_std(ax, [np.array(sorted(v)) for v in series.values()], colors[k % len(colors)],
                                  variant)
            ax.set_title(f"{base.removesuffix('-v0')}: {ALGO_LABELS.get(algo, algo)}", fontsize=9)
            ax.set_xlabel("env steps")
            ax.set_ylabel("episode return")
            ax.set_yscale("symlog")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    save_figure(fig, out / "curves.png", "SafeGBPO safeguards study (mean ± std over seeds)")


def run(args) -> Path:
    import csv

    s = _settings(args)
    console, out = study_console_and_out("safeguards", args)
    jobs = _plan(args, s, out)  # every config validated before anything starts
    by_name = {j["name"]: j for j in jobs}
    record_plan(out, console, {**s, "band": args.band, "settle": args.settle, "smooth": args.smooth,
                               "eval_episodes": args.eval_episodes, "set": args.set,
                               "runs": planned_runs(jobs, "task", "algo", "seed", "overrides")},
                f"study safeguards: {len(jobs)} runs")
    t0 = time.perf_counter()
    done: list[dict] = []
    curves: list[tuple] = []

    def finish(record: dict, tag: str) -> None:
        record, rows = _measure(record, by_name[f"{record['algo']}-{record['task']}-s{record['seed']}"], args)
        done.append(record)
        curves.extend(rows)
        write_csv(out / "runs.csv", RUN_COLUMNS, done)
        (out / "table.md").write_text(table(done, s))
        if "stuck" in record:
            console.print(f"{tag} done {record['algo']} on {record['task']} seed {record['seed']}: "
                          f"# steps {_fmt(record['steps_to_5pct'], '.0f')}{' (stuck)' if record['stuck'] else ''}, "
                          f"eval return {record['eval_return']:.4g}, violations {record['train_violations']:g}, "
                          f"{record['s_per_1k_steps']:.2f} s per 1k steps")

    records = run_jobs(jobs, args, console, finish)
    with open(out / "curves.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "variant", "algo", "seed", "env_steps", "episode_return", "episode_cost"])
        w.writerows(sorted(curves, key=lambda r: r[:5]))
    _plot(out, curves, s)
    console.print(table(records, s))
    return finish_study(console, records, out, t0, "table.md, runs.csv, curves.csv, curves.png")
