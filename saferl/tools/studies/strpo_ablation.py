"""The sTRPO paper ("Safe, Trust Region Policy Optimization for Constrained RL"), Appendix C: the
ablations of sTRPO on one task.

    saferl study strpo-ablation                reduced default (this 2-core machine): SafetyCarCircle1-v0,
                                               every variant, 2 seeds, stage 2 60,000 env steps per run
                                               (6,000 per iteration), stage 1 30,000, 1 host × 2 envs
    saferl study strpo-ablation --seeds 5 --steps 10000000 --unsafe-steps 1000000 \\
        --steps-per-iteration 15000 --hosts 2 --envs 10 --parallel 8 --address auto
                                               paper scale (the shipped configs' budgets, 15,000 steps per
                                               epoch, 2 hosts × 10 envs; the paper gives no seed count) on a
                                               Ray cluster; run it once per --task (the paper: Car-Circle1,
                                               Car-Goal1, Ant/Hopper-Velocity)
    saferl study strpo-ablation --task FunctionEnv-v0 --variants strpo,no-unsafe-term --steps 20000 \\
        --unsafe-steps 10000 --steps-per-iteration 2000 --envs 20       a quick sanity run of both stages

The variants (``--variants``, a comma list of names or labels; default all), each a stage-2
``strpo`` run of ``configs/strpo/<task>.yaml`` that differs from sTRPO in exactly one factor
(``FACTORS``: the algo_params keys it may change):

    strpo               sTRPO                  the config's defaults (δ1 1e-2, δ2 1e-4, λ2 =
                                               max(0.01, the least λ2 meeting the exclusion))
    no-joint-advantage  no joint advantage     joint_advantage=false: z(Â_r) alone (C.4)
    no-unsafe-term      no unsafe term         exclusion=false: no φ, no π_unsafe, and so no eq-10
                                               fallback either: TRPO on the joint advantage (C.4)
    lambda2-0.01        λ2 = 0.01 fixed        lambda2=0.01, adapt_lambda2=false (C.3)
    lambda2-1           λ2 = 1 fixed           lambda2=1.0, adapt_lambda2=false (C.3): the λ2
                                               rule is the one factor; the two arms differ in λ2 only
    unsafe-trpo         unsafe policy by TRPO  π_unsafe trained by plain TRPO, not DTRPO (C.2)
    delta-1e-2          δ = 1e-2               target_kl = delta2 = 1e-2 (C.1's single δ)
    delta-1e-3          δ = 1e-3               target_kl = delta2 = 1e-3
    delta-1e-4          δ = 1e-4               target_kl = delta2 = 1e-4

**Stage 1 once per seed.** π_unsafe is trained first, once per seed and per kind, and shared by
the variants: ``trpo_unsafe`` runs of ``configs/trpo_unsafe/<task>.yaml`` with ``--unsafe-steps``
env steps and the stage-2 runs' steps per iteration, hosts and envs, ``distributional=true``
(DTRPO, the CVaR quantile critic) and, only when "unsafe policy by TRPO" is selected,
``distributional=false`` (TRPO). Each stage-2 run then gets
``algo_params.unsafe_policy=<its seed's stage-1 run dir>``, so no run trains its own stage 1
("no unsafe term" needs none). A variant whose stage-1 run failed is reported failed. ``--set``
overrides every stage-2 run (and wins over a variant's own overrides); its ``resources.*``,
``device`` and ``logging.*`` entries go to the stage-1 runs too, as ``saferl train`` passes them
to its own stage 1. Outputs in ``--out``:

    ablation.md   one row per variant: final return and final cost (mean ± std over seeds) and the
                  shares of updates that took the forward step of eq 9, the reverse step of eq 10
                  and kept θ_k (``strpo/case`` = 0, 1, 2)
    summary.csv   the same numbers at full precision
    runs.csv      one row per run (stage 1 too): final return and cost, forward / reverse / kept shares,
                  logged points, K, π_unsafe, wall time, run dir
    curves.csv    (variant, label, algo, seed, env steps, episode return, episode cost) of every run
    ablation.png  return and cost vs env steps per variant (mean ± std over seeds), the cost limit
                  dashed; with more than 4 variants a grid, sTRPO repeated in each row
    study.json    the settings and every run's config and overrides
    runs/         ``trpo_unsafe-<task>-{dtrpo,trpo}-s<seed>`` and ``strpo-<task>-<variant>-s<seed>``

Re-running with the same ``--out`` keeps finished runs, resumes interrupted ones from their last
checkpoint and recomputes the outputs (another ``--last-k`` costs no training).

**The numbers.** A run's curve is its logged iterations in which episodes finished (every
iteration is logged): R_i, C_i = mean return / cost of the episodes that ended in iteration i.
Its final return and cost are the means of R_i and C_i over its last K points, K = ``--last-k``
or by default the last 10% of its points (at least 1). Its forward / reverse / kept shares are the
fractions of its iterations (one sTRPO update each) whose ``strpo/case`` is 0 (the step of eq 9
met both constraints of eq 8), 1 (the reverse step of eq 10) or 2 (θ_k kept). The table shows
mean ± sample std (ddof 1) over seeds; "(k/n)" when only k of n seeds have the number.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from saferl.tools.studies.runner import (
    DONE_MARKER,
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
    require_task,
    run_jobs,
    save_figure,
    start_ray,
    study_console_and_out,
    summarise,
    warn_if_no_episode,
    write_csv,
)

HELP = "sTRPO App. C: ablations (joint advantage, unsafe term, λ2, TRPO vs DTRPO π_unsafe, δ sweep) on one task"

# key: (table label, what changes, stage-2 overrides, stage-1 kind or None); table row order
VARIANTS: dict[str, tuple[str, str, tuple[str, ...], str | None]] = {
    "strpo": ("sTRPO", "the config's δ1, δ2, λ2", (), "dtrpo"),
    "no-joint-advantage": ("no joint advantage", "joint_advantage=false", ("algo_params.joint_advantage=false",),
                           "dtrpo"),
    "no-unsafe-term": ("no unsafe term", "exclusion=false", ("algo_params.exclusion=false",), None),
    **{f"lambda2-{v}": (f"λ2 = {v} fixed", f"lambda2={float(v)}, adapt_lambda2=false",
                        (f"algo_params.lambda2={float(v)}", "algo_params.adapt_lambda2=false"), "dtrpo")
       for v in ("0.01", "1")},
    "unsafe-trpo": ("unsafe policy by TRPO", "π_unsafe: distributional=false", (), "trpo"),
    **{f"delta-{d}": (f"δ = {d}", f"target_kl=delta2={d}",
                      (f"algo_params.target_kl={float(d)}", f"algo_params.delta2={float(d)}"), "dtrpo")
       for d in ("1e-2", "1e-3", "1e-4")},
}
# the one factor each variant changes: the algo_params keys its stage-2 config may differ in from sTRPO's
FACTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "strpo": ("none", ()),
    "no-joint-advantage": ("joint advantage", ("joint_advantage",)),
    "no-unsafe-term": ("unsafe term", ("exclusion", "unsafe_policy")),
    "lambda2-0.01": ("λ2 rule", ("lambda2", "adapt_lambda2")),
    "lambda2-1": ("λ2 rule", ("lambda2", "adapt_lambda2")),
    "unsafe-trpo": ("π_unsafe's critic", ("unsafe_policy",)),
    **{f"delta-{d}": ("single δ", ("target_kl", "delta2")) for d in ("1e-2", "1e-3", "1e-4")},
}
# stage-1 kind: (label, its overrides of configs/trpo_unsafe/<task>.yaml)
STAGE1 = {"dtrpo": ("DTRPO", "algo_params.distributional=true"),
          "trpo": ("TRPO", "algo_params.distributional=false")}
# plot rows when more than 4 variants: the paper's sections, sTRPO added to each as the reference
PLOT_GROUPS = (("no-joint-advantage", "no-unsafe-term"), ("lambda2-0.01", "lambda2-1", "unsafe-trpo"),
               ("delta-1e-2", "delta-1e-3", "delta-1e-4"))
STAGE1_SET_PREFIXES = ("resources.", "device", "logging.")  # --set entries stage 1 also gets
DEFAULTS = {"task": "SafetyCarCircle1-v0", "seeds": "2", "steps": 60_000, "unsafe_steps": 30_000,
            "steps_per_iteration": 6_000, "hosts": 1, "envs": 2}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " -_")


def variant_keys(names: list[str]) -> list[str]:
    """``--variants`` (keys or labels, any case) as keys in table order."""
    from saferl.config import ConfigError

    lookup = {_norm(k): k for k in VARIANTS} | {_norm(v[0]): k for k, v in VARIANTS.items()}
    chosen = set()
    for name in names:
        if _norm(name) not in lookup:
            known = ", ".join(f"{k} ({v[0]})" for k, v in VARIANTS.items())
            raise ConfigError(f"usage error: --variants {name!r}: unknown variant; known: {known}")
        chosen.add(lookup[_norm(name)])
    if not chosen:
        raise ConfigError("usage error: --variants needs at least one variant")
    return [k for k in VARIANTS if k in chosen]


def variant_overrides(key: str, unsafe_policy: str | None = None) -> list[str]:
    """A variant's stage-2 overrides, with its π_unsafe when it has one."""
    over = list(VARIANTS[key][2])
    if unsafe_policy is not None and VARIANTS[key][3] is not None:
        over.append(f"algo_params.unsafe_policy={unsafe_policy}")
    return over


def stage1_kinds(keys: list[str]) -> list[str]:
    """The stage-1 runs the selected variants need (DTRPO, TRPO: in that order)."""
    return [kind for kind in STAGE1 if any(VARIANTS[k][3] == kind for k in keys)]


def case_fractions(metrics_csv: Path) -> dict[str, float] | None:
    """Shares of a run's logged iterations whose ``strpo/case`` is 0, 1, 2 (forward step, reverse
    step, θ_k kept); a resumed run's repeated iteration counts once (the last row). None when none
    logged it."""
    by_iteration: dict[int, float] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            case = row.get("strpo/case") or ""
            if case != "":
                by_iteration[int(float(row.get("iteration") or len(by_iteration)))] = float(case)
    if not by_iteration:
        return None
    n = len(by_iteration)
    return {name: sum(c == code for c in by_iteration.values()) / n for name, code in CASES.items()}


CASES = {"forward": 0, "reverse": 1, "kept": 2}  # ``strpo/case`` (learners/strpo.py)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the command and variant lists' layout
    p.description = "\n\n".join(__doc__.split("\n\n")[:4])  # what, the commands, the variants
    p.epilog = ("Stage 1 runs once per seed (DTRPO; TRPO too with unsafe-trpo) and is shared by the variants. "
                "Outputs: ablation.md, summary.csv, runs.csv, curves.csv, ablation.png, study.json, runs/.")
    p.add_argument("--task", default=DEFAULTS["task"],
                   help=f"the task (default {DEFAULTS['task']}, the paper's Circle; it needs configs/strpo/<task>.yaml "
                   "and configs/trpo_unsafe/<task>.yaml)")
    p.add_argument("--variants", type=csv_list, default=list(VARIANTS),
                   help=f"comma-separated variants, names or labels (default all: {','.join(VARIANTS)})")
    p.add_argument("--seeds", default=DEFAULTS["seeds"],
                   help=f"N for seeds 0..N-1, or a comma list of seeds (default {DEFAULTS['seeds']})")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help=f"env steps per stage-2 run (default {DEFAULTS['steps']:,}; the configs' 10000000)")
    p.add_argument("--unsafe-steps", type=int, default=DEFAULTS["unsafe_steps"],
                   help=f"env steps per stage-1 run, π_unsafe (default {DEFAULTS['unsafe_steps']:,}; the configs' "
                   "1000000)")
    p.add_argument("--steps-per-iteration", type=int, default=DEFAULTS["steps_per_iteration"],
                   help=f"env steps per iteration over all envs, both stages; must divide by hosts × envs "
                   f"(default {DEFAULTS['steps_per_iteration']:,}; the paper 15000)")
    p.add_argument("--hosts", type=int, default=DEFAULTS["hosts"],
                   help=f"env hosts per run (default {DEFAULTS['hosts']}; the configs 2)")
    p.add_argument("--envs", "--envs-per-host", dest="envs", type=int, default=DEFAULTS["envs"],
                   help=f"envs per env host (default {DEFAULTS['envs']}; the configs 10)")
    add_run_arguments(p, "strpo-ablation", last_k="logged iterations",
                      set_help="config override for every stage-2 run (resources.*, device, logging.* also for "
                      "stage 1), e.g. resources.num_gpus_per_learner=0.25")


def _settings(args) -> dict:
    keys = variant_keys(args.variants)
    seeds = parse_seeds(str(args.seeds))
    require_positive(("--steps", args.steps), ("--unsafe-steps", args.unsafe_steps),
                     ("--steps-per-iteration", args.steps_per_iteration), ("--hosts", args.hosts),
                     ("--envs", args.envs), ("--parallel", args.parallel), ("--last-k", args.last_k))
    require_task(args.task)
    return {"task": args.task, "variants": keys, "stage1": stage1_kinds(keys), "seeds": seeds, "steps": args.steps,
            "unsafe_steps": args.unsafe_steps, "steps_per_iteration": args.steps_per_iteration,
            "hosts": args.hosts, "envs": args.envs, "last_k": args.last_k, "set": list(args.set)}


def _common(s: dict) -> list[str]:
    return [f"steps_per_iteration={s['steps_per_iteration']}", f"resources.num_env_hosts={s['hosts']}",
            f"resources.envs_per_host={s['envs']}"]


def plan_stage1(s: dict, out: Path) -> dict[tuple[str, int], dict]:
    """(kind, seed) -> the stage-1 ``trpo_unsafe`` job."""
    user = [x for x in s["set"] if x.split("=", 1)[0].startswith(STAGE1_SET_PREFIXES)]
    jobs = {}
    for kind in s["stage1"]:
        for seed in s["seeds"]:
            job = plan_job("trpo_unsafe", s["task"], seed, out,
                           [f"total_env_steps={s['unsafe_steps']}", *_common(s), STAGE1[kind][1]], user, suffix=kind)
            jobs[kind, seed] = job | {"variant": f"stage1-{kind}", "label": f"stage 1 ({STAGE1[kind][0]})",
                                      "stage": 1}
    return jobs


def plan_stage2(s: dict, out: Path, unsafe: dict[tuple[str, int], str | None]) -> list[dict]:
    """Every (variant, seed) ``strpo`` job; ``unsafe[kind, seed]`` is π_unsafe's run dir (None:
    unset, to validate the configs before stage 1 exists)."""
    jobs = []
    for key in s["variants"]:
        kind = VARIANTS[key][3]
        for seed in s["seeds"]:
            over = [f"total_env_steps={s['steps']}", *_common(s),
                    *variant_overrides(key, unsafe.get((kind, seed)) if kind else None)]
            job = plan_job("strpo", s["task"], seed, out, over, s["set"], suffix=key)
            jobs.append(job | {"variant": key, "label": VARIANTS[key][0], "stage": 2})
    return jobs


# ---------------------------------------------------------------------------------------------
# the numbers and the outputs
# ---------------------------------------------------------------------------------------------
def measure(record: dict, job: dict, last_k: int | None) -> tuple[dict, list[tuple]]:
    """Add a run's variant, final performance and forward / reverse / kept shares to its record;
    return its curve rows."""
    record.update(variant=job["variant"], label=job["label"], stage=job["stage"],
                  unsafe_policy=job["cfg"].algo_params.get("unsafe_policy"))
    path = Path(record["run_dir"]) / "metrics.csv"
    if not record["status"].startswith("ok") or not path.is_file():
        return record, []
    x, ret, cost = read_curve(path)
    final_r, final_c, k = final_performance(ret, cost, last_k)
    shares = (case_fractions(path) if job["stage"] == 2 else None) or {}
    record.update(final_return=final_r, final_cost=final_c, n_points=len(x), last_k=k,
                  **{f"{c}_fraction": shares.get(c) for c in CASES})
    return record, [(job["variant"], job["label"], record["algo"], record["seed"], xi, ri, ci)
                    for xi, ri, ci in zip(x, ret, cost)]


def summary_rows(records: list[dict], keys: list[str]) -> list[dict]:
    """Per variant: mean and sample std over seeds of the final return, final cost and the
    forward / reverse / kept shares."""
    rows = []
    for key in keys:
        rs = [r for r in records if r.get("variant") == key and r["status"].startswith("ok")]
        if not rs:
            continue
        rets, costs = ([r.get(c) for r in rs] for c in ("final_return", "final_cost"))
        shares = {c: [r.get(f"{c}_fraction") for r in rs] for c in CASES}
        r_mean, r_std, n = summarise(rets)
        c_mean, c_std, _ = summarise(costs)
        row = {"variant": key, "label": VARIANTS[key][0], "change": VARIANTS[key][1], "seeds": len(rs),
               "seeds_with_episodes": n, "return_mean": r_mean, "return_std": r_std, "cost_mean": c_mean,
               "cost_std": c_std, "cost_limit": rs[0]["cost_limit"], "total_env_steps": rs[0]["total_env_steps"],
               "return": format_mean_std(rets), "cost": format_mean_std(costs)}
        for c, values in shares.items():
            m, sd, _ = summarise(values)
            row.update({f"{c}_mean": m, f"{c}_std": sd, c: format_mean_std(values)})
        rows.append(row)
    return rows


def table(records: list[dict], s: dict) -> str:
    k_text = f"K = {s['last_k']}" if s["last_k"] else f"K = the last {FINAL_FRACTION:.0%} of its points, at least 1"
    stage1 = ", ".join(f"{STAGE1[k][0]}" for k in s["stage1"]) or "none needed"
    rows = summary_rows(records, s["variants"])
    limit = next((r["cost_limit"] for r in rows), None)
    lines = [f"# sTRPO ablation on {s['task']} (Appendix C)", "",
             f"{len(s['seeds'])} seed(s) per row ({', '.join(map(str, s['seeds']))}); stage 2: {s['steps']:,} "
             f"env steps per run, {s['steps_per_iteration']:,} per iteration, {s['hosts']} host(s) × {s['envs']} "
             f"env(s); π_unsafe (stage 1, once per seed, shared: {stage1}): {s['unsafe_steps']:,} env steps. Final "
             f"return / cost of a run = mean episode return / cost over its last K logged iterations ({k_text}); "
             "forward / reverse / kept = shares of its updates that took the step of eq 9, the reverse step of "
             "eq 10, or kept θ_k (strpo/case = 0, 1, 2); mean ± std (ddof 1) over seeds"
             + (f"; cost limit {limit:g}." if limit is not None else "."), "",
             "| Variant | Change | Return | Cost | Forward | Reverse | Kept |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['change']} | {r['return']} | {r['cost']} | {r['forward']} | {r['reverse']} | "
              f"{r['kept']} |" for r in rows]
    if note := failed_note(records):
        lines += ["", note]
    return "\n".join(lines) + "\n"


RUN_COLUMNS = ["variant", "label", "stage", "algo", "seed", "status", "final_return", "final_cost", "forward_fraction",
               "reverse_fraction", "kept_fraction",
               "n_points", "last_k", "unsafe_policy", "cost_limit", "total_env_steps", "num_envs", "wall_s", "run_dir"]
SUMMARY_COLUMNS = ["variant", "label", "change", "seeds", "seeds_with_episodes", "return_mean", "return_std",
                   "cost_mean", "cost_std", "forward_mean", "forward_std", "reverse_mean", "reverse_std", "kept_mean",
                   "kept_std", "cost_limit", "total_env_steps"]
CURVE_COLUMNS = ["variant", "label", "algo", "seed", "env_steps", "episode_return", "episode_cost"]


def _write(out: Path, records: list[dict], s: dict) -> None:
    order = {k: i for i, k in enumerate([f"stage1-{k}" for k in STAGE1] + list(VARIANTS))}
    write_csv(out / "runs.csv", RUN_COLUMNS,
              sorted(records, key=lambda r: (order.get(r.get("variant"), 99), r["seed"])))
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows(records, s["variants"]))
    (out / "ablation.md").write_text(table(records, s))


def plot_rows(keys: list[str]) -> list[list[str]]:
    """The variants of each plot row: all in one row up to 4, else the paper's sections (sTRPO,
    when selected, in each)."""
    if len(keys) <= 4:
        return [keys]
    ref = ["strpo"] if "strpo" in keys else []
    rows = [ref + [k for k in group if k in keys] for group in PLOT_GROUPS]
    return [r for r in rows if len(r) > len(ref)] or [keys]


def _plot(out: Path, curves: list[tuple], records: list[dict], s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {k: colors[i % len(colors)] for i, k in enumerate(VARIANTS)}
    rows = plot_rows(s["variants"])
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows)), squeeze=False)
    limit = next((r["cost_limit"] for r in records if r.get("stage") == 2), None)
    for (ax_r, ax_c), keys in zip(axes, rows):
        for key in keys:
            series = by_seed(curves, lambda variant, *_: variant == key)  # noqa: B023  (called within the iteration)
            plot_return_and_cost(ax_r, ax_c, series, color[key], VARIANTS[key][0])
        finish_return_and_cost(ax_r, ax_c, limit)
    save_figure(fig, out / "ablation.png", f"{s['task']}: sTRPO ablation (mean ± std over seeds)")


def _failed_record(job: dict, why: str) -> dict:
    cfg = job["cfg"]
    return {"task": job["task"], "algo": job["algo"], "seed": job["seed"], "cost_limit": cfg.limit,
            "total_env_steps": cfg.total_env_steps, "status": f"failed: {why}",
            "num_envs": cfg.resources.num_env_hosts * cfg.resources.envs_per_host,
            "run_dir": str(Path(cfg.run_root) / job["name"])}


def run(args) -> Path:
    import ray

    s = _settings(args)
    console, out = study_console_and_out("strpo-ablation", args)
    stage1 = plan_stage1(s, out)
    draft = plan_stage2(s, out, {})  # every config validated before anything is created or started
    for job in [*stage1.values(), *draft][:: len(s["seeds"])]:  # one warning per stage-1 kind / variant
        warn_if_no_episode(job, console)
    record_plan(out, console, {**s, "stage1_runs": planned_runs(
        stage1.values(), "variant", "algo", "seed", "name", "config", "overrides"), "variant_overrides": {
        k: variant_overrides(k, "<stage-1 run dir>") for k in s["variants"]}},
        f"study strpo-ablation: {len(stage1)} stage-1 run(s) ({', '.join(STAGE1[k][0] for k in s['stage1'])}"
        f" × {len(s['seeds'])} seeds, {s['unsafe_steps']:,} env steps each), then {len(draft)} sTRPO runs "
        f"({len(s['variants'])} variants × {len(s['seeds'])} seeds, {s['steps']:,} env steps each) on {s['task']}")
    t0 = time.perf_counter()
    curves: list[tuple] = []
    done: list[dict] = []
    by_name = {j["name"]: j for j in [*stage1.values(), *draft]}

    def finish(record: dict, tag: str) -> None:
        record, rows = measure(record, by_name[Path(record["run_dir"]).name], s["last_k"])
        done.append(record)
        curves.extend(rows)
        _write(out, done, s)  # partial results while a long study runs
        if record.get("final_return") is not None:
            fwd = record.get("forward_fraction")
            console.print(f"{tag} done {record['label']} seed {record['seed']} in {record.get('wall_s', 0):.0f} s: "
                          f"final return {record['final_return']:.3g}, cost {record['final_cost']:.3g} "
                          f"(limit {record['cost_limit']:g})"
                          + (f", forward / reverse / kept {fwd:.0%} / {record['reverse_fraction']:.0%} / "
                             f"{record['kept_fraction']:.0%}" if fwd is not None else ""))

    to_train = [j["cfg"] for j in by_name.values()
                if not (Path(j["cfg"].run_root) / j["name"] / DONE_MARKER).is_file()]
    started = start_ray(to_train, args) if to_train else False  # one Ray session for both stages
    try:
        records = run_jobs(list(stage1.values()), args, console, finish) if stage1 else []
        trained = {Path(r["run_dir"]).name for r in records if r["status"].startswith("ok")}
        ok = {ks: str(Path(j["cfg"].run_root) / j["name"]) for ks, j in stage1.items() if j["name"] in trained}
        jobs, skipped = [], []
        for job in plan_stage2(s, out, ok):
            kind = VARIANTS[job["variant"]][3]
            if kind is not None and (kind, job["seed"]) not in ok:
                skipped.append(_failed_record(job, f"its stage-1 run ({STAGE1[kind][0]}, seed {job['seed']}) failed"))
            else:
                jobs.append(job)
        by_name.update({j["name"]: j for j in jobs})
        for record in skipped:
            finish(record, "[skipped]")
        records += skipped + (run_jobs(jobs, args, console, finish) if jobs else [])
    finally:
        if started:
            ray.shutdown()
    _write(out, records, s)
    write_csv(out / "curves.csv", CURVE_COLUMNS,
              [dict(zip(CURVE_COLUMNS, c)) for c in sorted(curves, key=lambda c: (c[0], c[3], c[4]))])
    _plot(out, curves, records, s)
    console.print((out / "ablation.md").read_text())
    return finish_study(console, records, out, t0, "ablation.md, summary.csv, runs.csv, curves.csv, ablation.png")
