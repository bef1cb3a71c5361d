"""A saferl baseline trained side by side with the implementation it follows (OmniSafe 0.5).

    saferl benchmark reference                              PPO-Lag on SafetyPointGoal1-v0, seed 0,
                                                            600,000 env steps (30 iterations of 20,000)
    saferl benchmark reference --algo trpo_lag --steps 200000 --out runs/ref-trpo
    saferl benchmark reference --install                    build .venv-omnisafe first if it is missing
    saferl benchmark reference --reference-from runs/ref-a --out runs/ref-b
                                                            saferl's side again, OmniSafe's reused
    saferl benchmark reference --seeds 0,1 --out runs/ref   one comparison per seed, one table across
    saferl benchmark reference --algo sac_lag --check-update
                                                            the update rules compared step by step
                                                            (reference_update.py), no training
    saferl benchmark reference --algo sac_lag --task SafetyHopperVelocity-v1 --check-data
                                                            the collected transitions compared under
                                                            fixed policies (reference_data.py)

Both sides get the same task, seed, cost limit (the registry's), total env steps and steps per
iteration (OmniSafe's ``steps_per_epoch``); each keeps its own hyper-parameters: saferl the shipped
``configs/<algo>/<task>.yaml`` (which follows OmniSafe's config key by key, see
docs/results/baselines.md), OmniSafe its own ``omnisafe/configs/.../<Algo>.yaml``. Where the
saferl config decays the policy's step size over ``lr_decay_updates`` updates, that is set to the
run's iterations, as OmniSafe's ``linear_lr_decay`` spans its own ``total_steps``.

The reference runs in its own interpreter (``--venv``, default ``.venv-omnisafe``), never imported
by saferl: ``saferl/tools/studies/reference_omnisafe.py`` is executed there as a script, concurrently
with the saferl run (``--sequential``: one after the other). ``--install`` builds that interpreter
with ``INSTALL_STEPS`` (Python 3.11; the Safety-Gymnasium pins of deploy/requirements-sg.txt, torch,
OmniSafe's other dependencies; ``safety-gymnasium``, ``gymnasium-robotics``, ``pettingzoo`` and
``omnisafe`` with ``--no-deps``, since their declared pins have no Python 3.11 wheels).

Outputs in ``--out``:

    comparison.md    one table: final return, cost and λ of each side (means over the last
                     ``--final-steps`` env steps), env steps, wall time
    comparison.csv   (source, env_steps, episode_return, episode_cost, lagrange_multiplier) of both
    comparison.png   return, cost (with the limit) and λ against env steps, both sides in each panel
    reference.json   the settings
    runs/            saferl's run directory;  reference/  OmniSafe's log and its curve

With ``--seeds``, each seed's outputs above are in ``seed<N>/``, and across the seeds:

    seeds.md         final return, cost and λ of each side per seed, their mean and sample std
    seeds.csv        the same rows
    seeds.png        every seed's curves of both sides

OmniSafe logs ``Metrics/EpRet`` and ``Metrics/EpCost`` as means over its last 50 finished episodes;
saferl's curve is shown as that same 50-episode running mean (rebuilt from each iteration's
episode count and mean), so the two curves are smoothed alike.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import time
from pathlib import Path

from saferl.config import REPO_ROOT
from saferl.metric_keys import EPISODE_COST, EPISODE_COUNT, EPISODE_RETURN, LAGRANGE_MULTIPLIER

HELP = "a saferl baseline next to OmniSafe 0.5 on the same task, seed and budget: one plot, one table"

# saferl algorithm -> OmniSafe 0.5's algorithm name
REFERENCE_ALGOS = {"ppo_lag": "PPOLag", "trpo_lag": "TRPOLag", "sac_lag": "SACLag", "td3_lag": "TD3Lag",
                   "ddpg_lag": "DDPGLag", "ppo": "PPO", "trpo": "TRPO", "cppo_pid": "CPPOPID", "cup": "CUP",
                   "focops": "FOCOPS", "cpo": "CPO", "pcpo": "PCPO", "rcpo": "RCPO"}
LAGRANGIAN = {"ppo_lag", "trpo_lag", "sac_lag", "td3_lag", "ddpg_lag", "cup", "focops", "rcpo"}
DEFAULT_VENV = ".venv-omnisafe"
DRIVER = Path(__file__).resolve().with_name("reference_omnisafe.py")
SG_REQUIREMENTS = REPO_ROOT / "deploy" / "requirements-sg.txt"  # the Safety-Gymnasium pins OmniSafe runs on
EPISODE_WINDOW = 50  # OmniSafe's window_lens of Metrics/EpRet / EpCost (the logged running mean)
CURVE_COLUMNS = ["source", "env_steps", "episode_return", "episode_cost", "lagrange_multiplier"]


def install_steps(venv: Path, python: str = "python3.11") -> list[list[str]]:
    """The recipe that builds the reference interpreter (argv lists, run in the repository root)."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    return [[python, "-m", "venv", str(venv)],
            [*pip, "-r", str(SG_REQUIREMENTS), "torch", "tensorboard", "wandb", "moviepy",
             "typer", "rich", "typing-extensions", "pyyaml", "matplotlib", "pandas", "seaborn", "gdown"],
            [*pip, "--no-deps", "safety-gymnasium==1.0.0", "gymnasium-robotics==1.2.2", "pettingzoo==1.23.1",
             "omnisafe==0.5.0"]]


def reference_python(args, console) -> str:
    """The interpreter that runs the reference: ``--reference-python``, or ``--venv``'s, built
    first with ``--install``; a one-line error when there is none."""
    from saferl.config import ConfigError

    if args.reference_python:
        return args.reference_python
    venv = Path(args.venv).expanduser().resolve()
    python = venv / "bin" / "python"
    if not python.is_file():
        if not args.install:
            raise ConfigError(f"usage error: no reference interpreter at {python}: pass --install to build "
                              f"{venv.name} (OmniSafe 0.5, needs network), or --venv / --reference-python")
        if not SG_REQUIREMENTS.is_file():
            raise ConfigError(f"install error: {SG_REQUIREMENTS} not found: --install builds the reference "
                              "interpreter from a source checkout (deploy/ is not in the wheel)")
        for step in install_steps(venv):
            console.print("install: " + " ".join(step))
            done = subprocess.run(step, cwd=REPO_ROOT, capture_output=True, text=True)
            if done.returncode:
                lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()
                         and "is ignored: it is neither a file nor a directory" not in ln]
                raise ConfigError(f"install error: {' '.join(step[:4])} ...: {(lines or ['?'])[-1]}")
    return str(python)


def run_script(argv: list[str], cwd: Path, side: str) -> None:
    """Run one side's script to the end; a failure is a one-line error with its last output line."""
    from saferl.config import ConfigError

    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise ConfigError(f"{side} error: exit {done.returncode}: {(lines or ['?'])[-1][:300]}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from saferl.tools.studies.runner import add_address_argument, add_out_argument

    p.add_argument("--algo", default="ppo_lag", choices=sorted(REFERENCE_ALGOS),
                   help="saferl algorithm (default ppo_lag)")
    p.add_argument("--task", default="SafetyPointGoal1-v0", help="a Safety-Gymnasium task both libraries have")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="several seeds, e.g. 0,1: one side-by-side run per seed in OUT/seed<N>, then one table "
                        "and plot across them (seeds.md, seeds.csv, seeds.png); --reference-from DIR then "
                        "reuses DIR/seed<N>")
    p.add_argument("--steps", type=int, default=600_000, help="total env steps of each side (default 600,000)")
    p.add_argument("--steps-per-iteration", type=int, default=None,
                   help="env steps per update (OmniSafe's steps_per_epoch; default the shipped config's)")
    p.add_argument("--hosts", type=int, default=None, help="saferl env hosts (default the config's)")
    p.add_argument("--envs", type=int, default=None, help="saferl envs per host (default the config's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the reference process (default 1)")
    p.add_argument("--final-steps", type=int, default=None,
                   help="the table's final values: means over the last this many env steps (default 10%% of --steps)")
    p.add_argument("--venv", default=DEFAULT_VENV, help=f"the reference interpreter's venv (default {DEFAULT_VENV})")
    p.add_argument("--install", action="store_true", help="build --venv with OmniSafe 0.5 when it is missing")
    p.add_argument("--reference-python", default=None, help="run the reference with this interpreter instead")
    p.add_argument("--reference-driver", default=str(DRIVER), help=argparse.SUPPRESS)
    p.add_argument("--reference-set", action="append", default=[], metavar="KEY=JSON",
                   help="override an OmniSafe config key, e.g. algo_cfgs.update_iters=10")
    p.add_argument("--sequential", action="store_true", help="run the reference after saferl, not alongside")
    p.add_argument("--reference-from", default=None, metavar="DIR",
                   help="reuse the finished reference run of an earlier comparison (its --out) with the same "
                        "algorithm, task, seed, steps and --reference-set instead of running it again")
    add_out_argument(p, "reference", note="re-running with the same folder keeps finished runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the saferl config")
    p.add_argument("--check-update", action="store_true",
                   help="compare the update rules instead of training: the same weights, minibatches and noise "
                        "through saferl's learner and OmniSafe's update functions (reference_update.py)")
    p.add_argument("--update-steps", type=int, default=20, help="gradient steps of --check-update (default 20)")
    p.add_argument("--check-data", action="store_true",
                   help="compare the collected data instead of training: the same fixed policies through saferl's "
                        "env host and replay and OmniSafe's adapter and buffer (reference_data.py)")
    p.add_argument("--data-steps", type=int, default=20_000,
                   help="env steps per phase and side of --check-data (default 20,000)")
    p.add_argument("--policy-from", default=None, metavar="RUN_DIR",
                   help="--check-data's policy phase acts with this saferl run's newest checkpoint "
                        "(default: OmniSafe's actor at its seeded initialisation)")
    add_address_argument(p)
    p.set_defaults(parallel=1)


def settings(args) -> dict:
    from saferl.config import ConfigError, load_config
    from saferl.tools.studies.runner import shipped_config

    if args.algo not in REFERENCE_ALGOS:
        raise ConfigError(f"usage error: --algo {args.algo!r}: one of {', '.join(sorted(REFERENCE_ALGOS))}")
    source, _ = shipped_config(args.algo, args.task)
    cfg = load_config(source)
    spi = args.steps_per_iteration or cfg.steps_per_iteration
    for flag, value in (("--steps", args.steps), ("--steps-per-iteration", spi), ("--threads", args.threads)):
        if value <= 0:
            raise ConfigError(f"usage error: {flag} must be > 0 (got {value})")
    if args.steps < spi:
        raise ConfigError(f"usage error: --steps {args.steps} is less than one iteration ({spi})")
    iterations = args.steps // spi
    final = args.final_steps or max(spi, int(0.1 * args.steps))
    return {"algo": args.algo, "reference_algo": REFERENCE_ALGOS[args.algo], "task": args.task, "seed": args.seed,
            "steps": iterations * spi, "steps_per_iteration": spi, "iterations": iterations,
            "hosts": args.hosts or cfg.resources.num_env_hosts, "envs": args.envs or cfg.resources.envs_per_host,
            "cost_limit": cfg.limit, "final_steps": final, "threads": args.threads,
            "lr_decay": getattr(cfg.learner_params(), "lr_decay_updates", 0) > 0,
            "saferl_set": list(args.set), "reference_set": list(args.reference_set)}


def saferl_job(s: dict, out: Path) -> dict:
    from saferl.tools.studies.runner import plan_job

    overrides = [f"total_env_steps={s['steps']}", f"steps_per_iteration={s['steps_per_iteration']}",
                 f"resources.num_env_hosts={s['hosts']}", f"resources.envs_per_host={s['envs']}",
                 "schedule.checkpoint_every=1"]
    if s["lr_decay"]:
        overrides.append(f"algo_params.lr_decay_updates={s['iterations']}")
    return plan_job(s["algo"], s["task"], s["seed"], out, overrides, s["saferl_set"])


def ray_worker_niceness() -> int:
    """The niceness Ray gives its worker processes (raylet's ``worker_niceness``, 15 unless
    ``RAY_worker_niceness`` says otherwise). The reference runs at the same niceness as saferl's
    actors: otherwise, on a busy machine, the scheduler hands it the cores and the comparison
    measures priorities instead of algorithms."""
    return int(os.environ.get("RAY_worker_niceness", "15"))  # noqa: SIM112  (Ray spells it so)


def reference_sets(s: dict) -> list[str]:
    """The OmniSafe config overrides of a comparison: the cost limit, then ``--reference-set``."""
    limit = [f"lagrange_cfgs.cost_limit={s['cost_limit']}"] if s["algo"] in LAGRANGIAN else []
    return [*limit, *s["reference_set"]]


def reference_argv(python: str, driver: str, s: dict, ref_dir: Path) -> list[str]:
    argv = [python, driver, "--algo", s["reference_algo"], "--env", s["task"], "--seed", str(s["seed"]),
            "--total-steps", str(s["steps"]), "--steps-per-epoch", str(s["steps_per_iteration"]),
            "--threads", str(s["threads"]), "--out", str(ref_dir)]
    for item in reference_sets(s):
        argv += ["--set", item]
    return argv


def reuse_reference(src: Path, ref_dir: Path, s: dict) -> None:
    """Copy the finished reference run of an earlier comparison (``src``: its ``--out`` or its
    ``reference/``) into ``ref_dir``, after checking it ran the same experiment. The reference
    does not change when saferl does, so a saferl change needs only saferl's side re-run."""
    from saferl.config import ConfigError

    src = src / "reference" if (src / "reference").is_dir() else src
    done = src / "reference_done.json"
    if not done.is_file() or not (src / "reference_curve.csv").is_file():
        raise ConfigError(f"usage error: --reference-from {src}: no finished reference run there "
                          "(reference_done.json and reference_curve.csv)")
    meta = json.loads(done.read_text())
    want = {"algo": s["reference_algo"], "env": s["task"], "seed": s["seed"], "total_steps": s["steps"],
            "steps_per_epoch": s["steps_per_iteration"]}
    if "set" in meta or s["reference_set"]:  # runs before the driver recorded them: no --reference-set
        want["set"] = reference_sets(s)
    diff = [f"{k} {meta.get(k)!r} there, {v!r} here" for k, v in want.items() if meta.get(k) != v]
    if diff:
        raise ConfigError(f"usage error: --reference-from {src}: another experiment ({'; '.join(diff)})")
    for name in ("reference_curve.csv", "log.txt", "reference_done.json"):  # the marker last
        if (src / name).is_file():
            (ref_dir / name).write_bytes((src / name).read_bytes())


def windowed(points: list[tuple[float, int, float, float]], window: int = EPISODE_WINDOW) -> list[tuple]:
    """(env_steps, count, mean return, mean cost) per iteration -> (env_steps, return, cost) as the
    mean of the last ``window`` episodes at each iteration, an iteration's episodes taken at its mean."""
    out, kept = [], []  # kept: [count, return, cost] of recent iterations, oldest first
    for steps, count, ret, cost in points:
        kept.append([count, ret, cost])
        while sum(k[0] for k in kept) - kept[0][0] >= window:
            kept.pop(0)
        total = sum(k[0] for k in kept)
        extra = max(0, total - window)  # the oldest iteration counts only its newest episodes
        n = total - extra
        w = [k[0] - (extra if i == 0 else 0) for i, k in enumerate(kept)]
        out.append((steps, sum(wi * k[1] for wi, k in zip(w, kept)) / n, sum(wi * k[2] for wi, k in zip(w, kept)) / n))
    return out


def read_saferl(metrics_csv: Path) -> list[dict]:
    """saferl's curve: per logged iteration with episodes, the 50-episode running means and λ."""
    by_it: dict[int, dict] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if (row.get(EPISODE_RETURN) or "") == "":
                continue
            by_it[int(float(row["iteration"]))] = row
    rows = [by_it[k] for k in sorted(by_it)]
    pts = [(float(r["env_steps"]), int(float(r.get(EPISODE_COUNT) or 1)), float(r[EPISODE_RETURN]),
            float(r[EPISODE_COST])) for r in rows]
    return [{"source": "saferl", "env_steps": st, "episode_return": ret, "episode_cost": cost,
             "lagrange_multiplier": _float(r.get(LAGRANGE_MULTIPLIER))}
            for (st, ret, cost), r in zip(windowed(pts), rows)]


def read_reference(curve_csv: Path) -> list[dict]:
    with open(curve_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if _float(r.get("episode_return")) is not None]
    return [{"source": "omnisafe", "env_steps": float(r["env_steps"]), "episode_return": float(r["episode_return"]),
             "episode_cost": float(r["episode_cost"]), "lagrange_multiplier": _float(r.get("lagrange_multiplier"))}
            for r in rows]


def _float(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def final_values(curve: list[dict], final_steps: int) -> dict:
    """Means over the points within the last ``final_steps`` env steps of a curve."""
    if not curve:
        return {"return": None, "cost": None, "lambda": None, "points": 0}
    end = curve[-1]["env_steps"]
    last = [p for p in curve if p["env_steps"] > end - final_steps] or curve[-1:]
    lams = [p["lagrange_multiplier"] for p in last if p["lagrange_multiplier"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"return": mean([p["episode_return"] for p in last]), "cost": mean([p["episode_cost"] for p in last]),
            "lambda": mean(lams), "points": len(last), "from_steps": last[0]["env_steps"], "to_steps": end}


def table(s: dict, finals: dict, walls: dict) -> str:
    fmt = lambda v, f=".2f": "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"# {s['algo']} vs OmniSafe 0.5 {s['reference_algo']} on {s['task']}, seed {s['seed']}", "",
             f"{s['steps']:,} env steps, {s['steps_per_iteration']:,} per iteration, cost limit {s['cost_limit']:g}; "
             f"final values: means over the last {s['final_steps']:,} env steps of each curve (return and cost "
             f"as {EPISODE_WINDOW}-episode running means, as OmniSafe logs them).", "",
             "| implementation | final return | final cost | final λ | env steps | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for src, label in (("saferl", f"saferl {s['algo']}"), ("omnisafe", f"OmniSafe {s['reference_algo']}")):
        f = finals[src]
        lines.append(f"| {label} | {fmt(f['return'])} | {fmt(f['cost'])} | {fmt(f['lambda'], '.3f')} | "
                     f"{int(f.get('to_steps') or 0):,} | {fmt(walls.get(src), '.0f')} |")
    return "\n".join(lines) + "\n"


def _draw(axes, curve: list[dict], **style) -> None:
    """One curve's return, cost and λ (where logged) on the three panels."""
    x = [p["env_steps"] for p in curve]
    axes[0].plot(x, [p["episode_return"] for p in curve], **style)
    axes[1].plot(x, [p["episode_cost"] for p in curve], **style)
    lam = [(p["env_steps"], p["lagrange_multiplier"]) for p in curve if p["lagrange_multiplier"] is not None]
    if lam and len(axes) > 2:
        axes[2].plot(*zip(*lam), **style)


def _panels(plt, curves: list[list[dict]]):
    """The figure and its return and cost panels, and a λ panel when any curve logs λ."""
    n = 3 if any(p["lagrange_multiplier"] is not None for c in curves for p in c) else 2
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.6))
    return fig, list(axes)


def _label_panels(axes, s: dict) -> None:
    axes[1].axhline(s["cost_limit"], color="k", ls="--", lw=1, label="cost limit")
    for ax, name in zip(axes, ("episode return", "episode cost", "λ")):
        ax.set_xlabel("env steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)


def plot(path: Path, s: dict, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saferl.tools.studies.runner import save_figure

    fig, axes = _panels(plt, list(curves.values()))
    for (src, curve), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        label = f"saferl {s['algo']}" if src == "saferl" else f"OmniSafe {s['reference_algo']}"
        _draw(axes, curve, color=color, label=label)
    _label_panels(axes, s)
    axes[1].legend(fontsize=8)
    save_figure(fig, path, f"{s['task']}, seed {s['seed']}: saferl {s['algo']} vs OmniSafe 0.5 {s['reference_algo']}")


def write_outputs(out: Path, s: dict, curves: dict, walls: dict) -> None:
    from saferl.tools.studies.runner import write_csv

    write_csv(out / "comparison.csv", CURVE_COLUMNS, [p for c in curves.values() for p in c])
    finals = {src: final_values(c, s["final_steps"]) for src, c in curves.items()}
    (out / "comparison.md").write_text(table(s, finals, walls))
    (out / "reference.json").write_text(json.dumps({**s, "finals": finals, "wall_s": walls}, indent=1))
    plot(out / "comparison.png", s, curves)


def start_ray_patiently(cfg, args, console, attempts: int = 8) -> bool:
    """``runner.start_ray`` for one run, retried when Ray's node misses its fixed 30 s startup
    deadline (a busy machine); True when this call started Ray."""
    import ray

    from saferl.cluster.session import connect
    from saferl.tools.studies.runner import needs

    if ray.is_initialized():
        return False
    if args.address or os.environ.get("RAY_ADDRESS"):
        return connect(None, address=args.address)
    for attempt in range(1, attempts + 1):
        try:  # runner.start_ray's local Ray, without the dashboard (one process less to start)
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needs(cfg)[0])), logging_level="warning",
                     include_dashboard=False)
            return True
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            ray.shutdown()
            console.print(f"Ray's startup timed out (attempt {attempt} of {attempts}): retrying")
    return False


def parse_seeds(text: str) -> list[int]:
    from saferl.config import ConfigError

    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"usage error: --seeds {text!r}: a comma-separated list of integers, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"usage error: --seeds {text!r}: distinct seeds ≥ 0, e.g. 0,1")
    return seeds


def across_seeds(per_seed: dict[int, dict]) -> list[dict]:
    """One row per (source, seed) with its final values, then a mean and a sample-std row per source
    (std only with 2+ seeds)."""
    from saferl.tools.studies.runner import summarise

    keys, rows = ("return", "cost", "lambda"), []
    for src in ("saferl", "omnisafe"):
        finals = [(seed, f[src]) for seed, f in sorted(per_seed.items())]
        rows += [{"source": src, "seed": seed, **{k: f[k] for k in keys}} for seed, f in finals]
        stats = {k: summarise([f[k] for _, f in finals]) for k in keys}
        rows += [{"source": src, "seed": "mean", **{k: st[0] for k, st in stats.items()}},
                 {"source": src, "seed": "std", **{k: st[1] for k, st in stats.items()}}]
    return rows


def seeds_table(s: dict, rows: list[dict]) -> str:
    fmt = lambda v, f=".2f": "-" if v is None else format(v, f)  # noqa: E731
    seeds = sorted({r["seed"] for r in rows if isinstance(r["seed"], int)})
    lines = [f"# {s['algo']} vs OmniSafe 0.5 {s['reference_algo']} on {s['task']}, seeds {', '.join(map(str, seeds))}",
             "", f"{s['steps']:,} env steps per run; final values: means over the last {s['final_steps']:,} env "
             f"steps of each run ({EPISODE_WINDOW}-episode running means); std: sample std over seeds.", "",
             "| implementation | seed | final return | final cost | final λ |", "|---|---|---|---|---|"]
    for r in rows:
        label = f"saferl {s['algo']}" if r["source"] == "saferl" else f"OmniSafe {s['reference_algo']}"
        lines.append(f"| {label} | {r['seed']} | {fmt(r['return'])} | {fmt(r['cost'])} | {fmt(r['lambda'], '.3f')} |")
    return "\n".join(lines) + "\n"


def plot_seeds(path: Path, s: dict, curves: dict[int, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saferl.tools.studies.runner import save_figure

    fig, axes = _panels(plt, [c for by_source in curves.values() for c in by_source.values()])
    for src, color in (("saferl", "tab:blue"), ("omnisafe", "tab:orange")):
        label = f"saferl {s['algo']}" if src == "saferl" else f"OmniSafe {s['reference_algo']}"
        for i, (seed, by_source) in enumerate(sorted(curves.items())):
            _draw(axes, by_source[src], color=color, lw=1, ls=("-", "--", ":", "-.")[i % 4],
                  label=f"{label}, seed {seed}")
    _label_panels(axes, s)
    axes[0].legend(fontsize=7)
    save_figure(fig, path, f"{s['task']}: saferl {s['algo']} vs OmniSafe 0.5 {s['reference_algo']}, every seed")


def run_seeds(args) -> Path:
    """``--seeds``: one side-by-side run per seed (``run``), in OUT/seed<N>, then the table across them."""
    import copy

    from saferl.tools.studies.runner import study_console_and_out, write_csv

    console, out = study_console_and_out("reference", args)
    seeds = parse_seeds(args.seeds)
    finals, curves = {}, {}
    for i, seed in enumerate(seeds, 1):
        console.print(f"seed {seed} ({i}/{len(seeds)})")
        one = copy.copy(args)
        one.seed, one.seeds, one.out = seed, None, str(out / f"seed{seed}")
        if args.reference_from:
            one.reference_from = str(Path(args.reference_from) / f"seed{seed}")
        run(one)
        saved = json.loads((out / f"seed{seed}" / "reference.json").read_text())
        finals[seed] = saved["finals"]
        with open(out / f"seed{seed}" / "comparison.csv", newline="") as fh:
            points = [{**r, **{k: _float(r[k]) for k in CURVE_COLUMNS[1:]}} for r in csv.DictReader(fh)]
        curves[seed] = {src: [p for p in points if p["source"] == src] for src in ("saferl", "omnisafe")}
    s = {**saved, "seeds": seeds}
    rows = across_seeds(finals)
    write_csv(out / "seeds.csv", ["source", "seed", "return", "cost", "lambda"], rows)
    (out / "seeds.md").write_text(seeds_table(s, rows))
    plot_seeds(out / "seeds.png", s, curves)
    console.print((out / "seeds.md").read_text(), markup=False)
    return out


def run(args) -> Path:
    from saferl.config import ConfigError
    from saferl.tools.studies.runner import DONE_MARKER, run_jobs, study_console_and_out

    if getattr(args, "seeds", None):
        return run_seeds(args)
    console, out = study_console_and_out("reference", args)
    if args.check_update:
        from saferl.tools.studies import reference_update

        return reference_update.run(args, console, out, lambda: reference_python(args, console))
    if args.check_data:
        from saferl.tools.studies import reference_data

        return reference_data.run(args, console, out, lambda: reference_python(args, console))
    s = settings(args)
    out.mkdir(parents=True, exist_ok=True)
    job = saferl_job(s, out)
    ref_dir = out / "reference"
    ref_dir.mkdir(exist_ok=True)
    proc, log, t0 = None, None, time.perf_counter()

    def start_reference():
        nonlocal log
        if (ref_dir / "reference_done.json").is_file():
            console.print("reference: finished earlier, kept")
            return None
        if args.reference_from:
            reuse_reference(Path(args.reference_from), ref_dir, s)
            console.print(f"reference: {args.reference_from}'s finished run, reused")
            return None
        argv = reference_argv(reference_python(args, console), args.reference_driver, s, ref_dir)
        console.print(f"reference: {' '.join(argv[1:])} (log: {ref_dir / 'log.txt'})")
        log = open(ref_dir / "log.txt", "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(argv, cwd=ref_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=lambda: os.nice(ray_worker_niceness()))

    def wait_reference(p) -> None:
        if p is None:
            return
        rc = p.wait()
        log.close()
        if rc:
            lines = [ln.strip() for ln in (ref_dir / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
            raise ConfigError(f"reference error: exit {rc}: {(lines or ['?'])[-1][:300]} (log: {ref_dir / 'log.txt'})")

    if not args.sequential:
        proc = start_reference()
    started = False
    try:
        if not (Path(job["cfg"].run_root) / job["name"] / DONE_MARKER).is_file():
            started = start_ray_patiently(job["cfg"], args, console)
        records = run_jobs([job], args, console, lambda record, tag: None)
        if args.sequential:
            proc = start_reference()
        wait_reference(proc)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.terminate()
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    record = records[0]
    if not record["status"].startswith("ok"):
        raise ConfigError(f"study error: the saferl run failed: {record['status']}")
    walls = {"saferl": record.get("wall_s")}
    done = ref_dir / "reference_done.json"
    if done.is_file():
        walls["omnisafe"] = json.loads(done.read_text()).get("wall_s")
    curves = {"saferl": read_saferl(Path(record["run_dir"]) / "metrics.csv"),
              "omnisafe": read_reference(ref_dir / "reference_curve.csv")}
    write_outputs(out, s, curves, walls)
    console.print(f"{time.perf_counter() - t0:.0f} s; table: {out / 'comparison.md'}")
    console.print((out / "comparison.md").read_text(), markup=False)
    assert (Path(record["run_dir"]) / DONE_MARKER).is_file()
    return out
