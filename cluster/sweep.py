"""``saferl sweep``: hyper-parameter sweeps as Ray Tune trials (docs/sweeps.md).

    saferl sweep ppo_lag/FunctionEnv-v0 --grid algo_params.lr=1e-4,3e-4 --grid algo_params.cost_lr=0.01,0.05 \\
        --seeds 3 --out sweeps/lr
    saferl sweep ppo_lag/FunctionEnv-v0 --random algo_params.lr=1e-5:1e-3:log --samples 8 --seeds 2
    saferl sweep --resume sweeps/lr                     # after an interruption: only unfinished trials run

Every combination (the grid's product, times ``--samples`` draws of the ``--random`` ranges)
runs once per seed, each as one Ray Tune trial. A trial is a whole saferl run (coordinator,
learner, env hosts) inside a placement group sized from its config (``trial_resources``), so
Tune starts only as many trials as the cluster holds. Random values are drawn here, once per
combination, so all seeds of a combination share them. Each trial reports every logged metrics
row to Tune (ASHA, ``--asha METRIC[:max|min]``, can stop it early on one of them), keeps its
saferl run directory (``OUT/runs/c<k>-s<seed>``; a resumed sweep resumes unfinished runs from
their checkpoints) and ends with a deterministic evaluation of its final checkpoint.

Outputs in ``OUT``: ``trials.csv`` (one row per trial), ``summary.csv`` and ``summary.md``
(per combination: evaluation return and cost, mean ± std over seeds, and whether the mean cost
is within the cost limit), ``return_vs_cost.png``, ``best.json`` (the highest mean return
among the combinations that satisfy the limit; none if no combination does).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import yaml

from saferl.config import ConfigError, RunConfig, load_config
from saferl.metric_keys import EPISODE_COST, EPISODE_RETURN

SPEC_FILE = "sweep.json"


# -- the search space -------------------------------------------------------------------------
def parse_grid(items: list[str]) -> dict[str, list]:
    """``["algo_params.lr=1e-4,3e-4"]`` -> ``{"algo_params.lr": [0.0001, 0.0003]}`` (YAML values)."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"usage error: --grid {item!r}: expected key=v1,v2,...")
        grid[key.strip()] = [_value(v) for v in raw.split(",")]
    return grid


def _value(raw: str):
    """A YAML value, with YAML 1.1's dot-less exponents (``1e-4``, a string there) as numbers."""
    v = yaml.safe_load(raw)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def parse_random(items: list[str]) -> dict[str, tuple[float, float, bool]]:
    """``["algo_params.lr=1e-5:1e-3:log"]`` -> ``{"algo_params.lr": (1e-5, 1e-3, True)}``."""
    out: dict[str, tuple[float, float, bool]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = raw.split(":")
        try:
            if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
                raise ValueError
            lo, hi = float(parts[0]), float(parts[1])
        except ValueError:
            raise ConfigError(f"usage error: --random {item!r}: expected key=lo:hi or key=lo:hi:log") from None
        log = len(parts) == 3
        if not lo < hi or (log and lo <= 0):
            raise ConfigError(f"usage error: --random {item!r}: needs lo < hi (and lo > 0 with :log)")
        out[key.strip()] = (lo, hi, log)
    return out


def combinations(grid: dict[str, list], random: dict[str, tuple], samples: int, seed: int = 0) -> list[dict]:
    """The grid's product × ``samples`` random draws (uniform, or log-uniform), in a fixed order."""
    import itertools

    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
    if not random:
        return points
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        draw = {}
        for key, (lo, hi, log) in random.items():
            v = math.exp(rng.uniform(math.log(lo), math.log(hi))) if log else rng.uniform(lo, hi)
            draw[key] = float(f"{v:.4g}")
        out += [{**p, **draw} for p in points]
    return out


def overrides_of(combo: dict, seed: int) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in combo.items()] + [f"seed={seed}"]


def trial_resources(cfg: RunConfig) -> list[dict]:
    """The placement-group bundles one trial needs: its driver (the coordinator; an empty head
    bundle, as ``saferl train`` counts no CPU for it: it waits on its actors), the learner, and the
    env hosts / gradient workers, world model and inference server as the coordinator makes them
    (``cluster/coordinator.py``; the replay buffer takes no CPU)."""
    res, algo = cfg.resources, cfg.algo_spec
    bundles: list[dict[str, float]] = [{}, {"CPU": 1.0, "GPU": res.num_gpus_per_learner}]
    gpus = res.num_gpus_per_host if algo.kind == "gradient" else 0.0
    bundles += [{"CPU": res.num_cpus_per_host, "GPU": gpus}] * res.num_env_hosts
    if algo.world_model:
        bundles.append({"CPU": res.num_cpus_per_host, "GPU": res.num_gpus_per_host})
    if res.inference == "server":
        bundles.append({"CPU": 1.0, "GPU": res.inference_gpus})
    return [{k: v for k, v in b.items() if v} for b in bundles]


# -- one trial ----------------------------------------------------------------------------------
def _trial(params: dict, spec: dict) -> None:
    """A Ray Tune function trainable: one saferl run (resumed from its checkpoint when the sweep
    is resumed), every logged row reported to Tune, then the final evaluation."""
    from ray import tune

    from saferl.api import load
    from saferl.cluster import rundir
    from saferl.cluster.session import train

    k, seed = params["combo"], params["seed"]
    out = Path(spec["out"])
    name = f"c{k:03d}-s{seed}"
    cfg = load_config(spec["config"], [*spec["overrides"], *overrides_of(spec["combos"][k], seed),
                                       f"run_root={out / 'runs'}", f"name={name}"])
    run_dir = out / "runs" / name
    if run_dir.exists() and not rundir.checkpoints(run_dir):
        shutil.rmtree(run_dir)  # interrupted before its first checkpoint: start it again
    resume = run_dir if run_dir.exists() else None

    def report(row: dict) -> None:
        tune.report({k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)})

    run_dir = train(cfg, run_dir=resume, on_log=report)
    episodes = spec["eval_episodes"]
    if episodes:
        ev = load(run_dir).evaluate(episodes)
        final = {"eval/return": ev["return_mean"], "eval/cost": ev["cost_mean"],
                 "eval/violation_rate": ev["violation_rate"]}
    else:  # the last logged training episodes
        import pandas as pd

        m = pd.read_csv(run_dir / "metrics.csv")
        final = {"eval/return": float(m[EPISODE_RETURN].dropna().iloc[-1]),
                 "eval/cost": float(m[EPISODE_COST].dropna().iloc[-1]), "eval/violation_rate": math.nan}
    tune.report({**final, "cost_limit": cfg.limit, "finished": 1, "run_dir": str(run_dir)})


# -- the sweep ----------------------------------------------------------------------------------
def run_sweep(config: str, out: Path, grid: dict | None = None, random: dict | None = None, samples: int = 1,
              seeds: int = 1, overrides: list[str] | None = None, eval_episodes: int = 10,
              asha: str | None = None, asha_grace: int = 2, max_concurrent: int = 0, console=None) -> dict:
    """Run a new sweep into ``out`` (which must not hold one); returns ``summarise``'s result."""
    out = Path(out).expanduser().resolve()
    if (out / SPEC_FILE).exists():
        raise ConfigError(f"usage error: {out} already holds a sweep: continue it with `saferl sweep --resume {out}`")
    if seeds < 1 or samples < 1:
        raise ConfigError("usage error: --seeds and --samples must be at least 1")
    if random is None and samples != 1:
        raise ConfigError("usage error: --samples needs --random ranges")
    grid, random = grid or {}, random or {}
    combos = combinations(grid, random, samples)
    if Path(config).is_file():  # trials run in their own folders: a relative path would not resolve
        config = str(Path(config).resolve())
    base = load_config(config, overrides)  # bad input fails here, before Ray starts
    limits = []
    for k, combo in enumerate(combos):
        try:
            limits.append(load_config(config, [*(overrides or []), *overrides_of(combo, 0)]).limit)
        except ConfigError as err:
            raise ConfigError(f"{err} (sweep combination {k}: {combo})") from None
    _metric, _mode = _asha(asha)
    spec = {"config": str(config), "overrides": list(overrides or []), "grid": grid,
            "random": {k: list(v) for k, v in random.items()}, "samples": samples, "seeds": seeds,
            "combos": combos, "limits": limits, "eval_episodes": eval_episodes, "asha": asha, "asha_grace": asha_grace,
            "max_concurrent": max_concurrent, "out": str(out), "iterations": _iterations(base)}
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return _fit(spec, base, restore=False, console=console)


def resume_sweep(out: Path, console=None) -> dict:
    """Continue an interrupted sweep: finished trials are kept, the others run (from their
    saferl checkpoints where they have one)."""
    out = Path(out).expanduser().resolve()
    if not (out / SPEC_FILE).is_file():
        raise ConfigError(f"usage error: {out} holds no sweep ({SPEC_FILE} missing)")
    spec = json.loads((out / SPEC_FILE).read_text())
    return _fit(spec, load_config(spec["config"], spec["overrides"]), restore=True, console=console)


def _trial_name(trial) -> str:
    return f"c{trial.config['combo']:03d}-s{trial.config['seed']}"


def _asha(asha: str | None) -> tuple[str | None, str]:
    if not asha:
        return None, "max"
    metric, _, mode = asha.partition(":")
    mode = mode or ("min" if "cost" in metric else "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"usage error: --asha {asha!r}: expected METRIC, METRIC:max or METRIC:min")
    return metric, mode


def asha_scheduler(spec: dict):
    """ASHA (Li et al. 2020) on the named metric of the logged rows, or None. Its time is Tune's
    ``training_iteration`` (one per logged row, plus the final evaluation's report)."""
    metric, mode = _asha(spec["asha"])
    if not metric:
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = spec["iterations"] + 1
    return ASHAScheduler(metric=metric, mode=mode, time_attr="training_iteration", max_t=max_t,
                         grace_period=max(1, min(spec["asha_grace"], max_t)))


def _iterations(cfg: RunConfig) -> int:
    """Logged iterations of a sampling/off-policy run (ASHA's max_t); gradient runs: an upper bound."""
    return max(1, math.ceil(cfg.total_env_steps / cfg.steps_per_iteration / cfg.schedule.log_every))


def _fit(spec: dict, base: RunConfig, restore: bool, console=None) -> dict:
    import os

    import ray
    from ray import tune

    from saferl.cluster.session import connect

    out = Path(spec["out"])
    bundles = trial_resources(base)
    trainable = tune.with_resources(tune.with_parameters(_trial, spec=spec),
                                    tune.PlacementGroupFactory(bundles, strategy="PACK"))
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # the last report is the evaluation
    need = sum(b.get("CPU", 0) for b in bundles)
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            started = connect(base)
        else:  # room for at least one trial (logical CPUs may exceed the cores: Ray time-shares them)
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), logging_level="warning")
            started = True
    try:
        if restore:
            tuner = tune.Tuner.restore(str(out / "tune"), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            scheduler = asha_scheduler(spec)
            param_space = {"combo": tune.grid_search(list(range(len(spec["combos"])))),
                           "seed": tune.grid_search(list(range(spec["seeds"])))}
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=spec["max_concurrent"] or None,
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        trials = []
        for result in grid:
            m = dict(result.metrics or {})
            cfg = result.config or {}
            trials.append({"combo": cfg.get("combo"), "seed": cfg.get("seed"),
                           "status": "error" if result.error else ("finished" if m.get("finished") else "stopped"),
                           "return": m.get("eval/return"), "cost": m.get("eval/cost"),
                           "violation_rate": m.get("eval/violation_rate"), "cost_limit": m.get("cost_limit"),
                           "iterations": m.get("training_iteration"), "run_dir": m.get("run_dir"),
                           "error": str(result.error).strip().splitlines()[0] if result.error else None})
    finally:
        if started:
            ray.shutdown()
    # Ctrl-C: Tune saves its state and returns; the trials not run yet are missing from the grid,
    # the one running is neither finished nor failed (without ASHA, nothing else stops a trial)
    expected = len(spec["combos"]) * spec["seeds"]
    interrupted = len(trials) < expected or (not spec["asha"] and any(t["status"] == "stopped" for t in trials))
    result = summarise(out, spec, trials, base.limit, console)
    return {**result, "interrupted": interrupted}


def summarise(out: Path, spec: dict, trials: list[dict], default_limit: float, console=None) -> dict:
    """Write trials.csv, summary.csv/.md, return_vs_cost.png and best.json; returns them as data."""
    import pandas as pd

    trials = sorted(trials, key=lambda t: (t["combo"], t["seed"]))
    combos = spec["combos"]
    shown = lambda v: v if isinstance(v, (int, float, str, bool)) else str(v)  # noqa: E731 (lists, dicts)
    pd.DataFrame([{**{key: shown(v) for key, v in combos[t["combo"]].items()}, **t} for t in trials]
                 ).to_csv(out / "trials.csv", index=False)
    rows = []
    for k, combo in enumerate(combos):
        done = [t for t in trials if t["combo"] == k and t["status"] == "finished"]
        ret = np.array([t["return"] for t in done], float)
        cost = np.array([t["cost"] for t in done], float)
        limit = done[0]["cost_limit"] if done else spec.get("limits", [default_limit] * len(combos))[k]
        rows.append({"combo": k, **{key: shown(v) for key, v in combo.items()}, "seeds": len(done),
                     "return_mean": float(ret.mean()) if len(done) else math.nan,
                     "return_std": float(ret.std()) if len(done) else math.nan,
                     "cost_mean": float(cost.mean()) if len(done) else math.nan,
                     "cost_std": float(cost.std()) if len(done) else math.nan,
                     "cost_limit": limit,
                     "satisfied": bool(len(done) and cost.mean() <= limit)})
    sdf = pd.DataFrame(rows)
    sdf.to_csv(out / "summary.csv", index=False)
    ok = sdf[sdf["satisfied"]]
    best = None
    if len(ok):
        b = ok.loc[ok["return_mean"].idxmax()]
        best = {"combo": int(b["combo"]), "params": combos[int(b["combo"])], "return_mean": float(b["return_mean"]),
                "return_std": float(b["return_std"]), "cost_mean": float(b["cost_mean"]),
                "cost_std": float(b["cost_std"]), "cost_limit": float(b["cost_limit"]), "seeds": int(b["seeds"])}
    (out / "best.json").write_text(json.dumps(best, indent=2))
    keys = sorted({k for c in combos for k in c})
    lines = ["| combination | " + " | ".join(keys) + " | seeds | return | cost | limit | within limit |",
             "|---" * (len(keys) + 6) + "|"]
    for r in rows:
        mark = "**yes** (best)" if best and r["combo"] == best["combo"] else ("yes" if r["satisfied"] else "no")
        lines.append(f"| c{r['combo']:03d} | " + " | ".join(str(combos[r['combo']].get(k, "")) for k in keys)
                     + f" | {r['seeds']} | {r['return_mean']:.3g} ± {r['return_std']:.2g} | "
                     f"{r['cost_mean']:.3g} ± {r['cost_std']:.2g} | {r['cost_limit']:g} | {mark} |")
    failed = [t for t in trials if t["status"] != "finished"]
    if failed:
        lines.append("")
        lines.append(f"{len(failed)} trial(s) not finished (stopped early by ASHA, interrupted, or failed; "
                     "see trials.csv): "
                     + ", ".join(f"c{t['combo']:03d}-s{t['seed']} {t['status']}" for t in failed))
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(table)
    _plot(out / "return_vs_cost.png", rows, best)
    if console is not None:
        console.print(table)
        console.print(f"best within the cost limit: {best['params']} (return {best['return_mean']:.3g}, cost "
                      f"{best['cost_mean']:.3g} ≤ {best['cost_limit']:g})" if best
                      else "no combination satisfies the cost limit")
    return {"trials": trials, "summary": rows, "best": best, "out": str(out)}


def _plot(path: Path, rows: list[dict], best: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if not r["seeds"]:
            continue
        ax.errorbar(r["cost_mean"], r["return_mean"], xerr=r["cost_std"], yerr=r["return_std"], fmt="o",
                    color="tab:green" if r["satisfied"] else "tab:red", capsize=3)
        ax.annotate(f"c{r['combo']:03d}" + (" (best)" if best and best["combo"] == r["combo"] else ""),
                    (r["cost_mean"], r["return_mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    limits = {r["cost_limit"] for r in rows}
    for lim in limits:
        ax.axvline(lim, ls="--", c="k", lw=1, label="cost limit" if lim == min(limits) else None)
    ax.set_xlabel("episode cost (mean ± std over seeds)")
    ax.set_ylabel("episode return (mean ± std over seeds)")
    ax.set_title("sweep: return vs cost (green: within the limit)")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- CLI --------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="YAML file or configs/ short name, e.g. ppo_lag/FunctionEnv-v0")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis (repeatable; the sweep runs the product)")
    p.add_argument("--random", action="append", default=[], metavar="KEY=LO:HI[:log]",
                   help="a random range (uniform, or log-uniform with :log), drawn --samples times")
    p.add_argument("--samples", type=int, default=1, help="random draws (with --random; default 1)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per combination (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every trial")
    p.add_argument("--eval-episodes", type=int, default=10,
                   help="deterministic evaluation episodes per trial (0: the last logged training episodes)")
    p.add_argument("--asha", metavar="METRIC[:max|min]", default=None,
                   help="stop trials early with ASHA on a logged metric, e.g. episode/return")
    p.add_argument("--asha-grace", type=int, default=2, help="ASHA's grace period in logged iterations")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as many as fit)")
    p.add_argument("--out", default=None, help="sweep folder (default sweeps/<algo>-<task>-<time>)")
    p.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")


def run_cli(args, console) -> dict:
    """Returns ``run_sweep``'s / ``resume_sweep``'s result (``out``, ``interrupted``, ...)."""
    if args.resume:
        result = resume_sweep(Path(args.resume), console=console)
    else:
        if not args.config:
            raise ConfigError("usage error: saferl sweep needs CONFIG or --resume SWEEP_DIR")
        if not args.grid and not args.random and args.seeds == 1:
            raise ConfigError("usage error: saferl sweep needs --grid, --random or --seeds N > 1")
        out = args.out
        if out is None:
            import time

            cfg = load_config(args.config, args.set)
            out = f"sweeps/{cfg.algo}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = run_sweep(args.config, Path(out), parse_grid(args.grid), parse_random(args.random) or None,
                           args.samples, args.seeds, args.set, args.eval_episodes, args.asha, args.asha_grace,
                           args.max_concurrent, console=console)
    return result
