"""What every study shares: one ``saferl train`` per job in one Ray session (embedded, or a
cluster's with ``--address``), finished runs kept and interrupted ones resumed when a study is
re-run with the same ``--out``, a heartbeat line per run, ``--parallel`` runs gated on the
cluster's resources, and the curves read back from each run's ``metrics.csv``.

A job is a dict with ``task``, ``algo``, ``seed``, ``name`` (its run directory under the config's
``run_root``) and ``cfg`` (a validated RunConfig).

A study's parser takes the options studies share from ``add_run_arguments`` (``--last-k``,
``--parallel``, ``--out``, ``--set``, ``--address``); its settings check bad input with
``require_positive`` / ``require_task`` / ``choose_keys``; ``record_plan`` writes study.json and
prints the plan, ``finish_study`` the closing line.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

from saferl.cluster.metrics import eta
from saferl.metric_keys import EPISODE_COST, EPISODE_RETURN

DONE_MARKER = "study_done.json"
HEARTBEAT_S = 30.0


def read_curve(metrics_csv: Path) -> tuple[list[float], list[float], list[float]]:
    """(env steps, mean episode return, mean episode cost) of the logged iterations in which
    episodes finished. A resumed run may have logged an iteration twice: the last row wins."""
    by_iteration: dict[int, tuple[float, float, float]] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            ret, cost = row.get(EPISODE_RETURN) or "", row.get(EPISODE_COST) or ""
            if ret == "" or cost == "":
                continue
            it = int(float(row.get("iteration") or len(by_iteration)))
            by_iteration[it] = (float(row["env_steps"]), float(ret), float(cost))
    pts = [by_iteration[k] for k in sorted(by_iteration)]
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def summarise(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std over the defined values, and how many are defined."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def format_mean_std(values: list[float | None], fmt: str = ".2f") -> str:
    """A table cell "mean ± std" over the defined values (sample std; one value: the mean alone),
    "(k/n)" when only k of the n are defined, "-" when none is."""
    mean, std, k = summarise(values)
    if mean is None:
        return "-"
    cell = format(mean, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")
    return cell + (f" ({k}/{len(values)})" if k < len(values) else "")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ---- the options every study shares (help texts are the CLI's; a study may pass its own) ----
OUT_NOTE = "an existing one is continued"
SET_HELP = "config override for every run, e.g. device=cuda"
PARALLEL_HELP = "runs trained at the same time (default 1)"
ADDRESS_HELP = "Ray cluster to join (default $RAY_ADDRESS; none: a local one)"


def add_out_argument(p, study: str, note: str | None = OUT_NOTE) -> None:
    """``--out``: the study's folder, by default ``runs/studies/<study>-<time>``
    (``study_console_and_out``)."""
    p.add_argument("--out", default=None,
                   help=f"output folder (default runs/studies/{study}-<time>)" + (f"; {note}" if note else ""))


def add_address_argument(p, help_text: str = ADDRESS_HELP) -> None:
    p.add_argument("--address", default=None, help=help_text)


def add_run_arguments(p, study: str, *, last_k: str | None = None, set_help: str = SET_HELP,
                      parallel_help: str = PARALLEL_HELP, address_help: str = ADDRESS_HELP,
                      out_note: str | None = OUT_NOTE) -> None:
    """The options of a study that trains runs through ``run_jobs``: ``--last-k`` (when ``last_k``
    names what a run's curve counts: "points", "logged iterations"), ``--parallel``, ``--out``,
    ``--set`` (applied after the study's own overrides, so it wins) and ``--address``."""
    if last_k:
        p.add_argument("--last-k", type=int, default=None,
                       help=f"final performance over a run's last K {last_k} (default the last 10%%, at least 1)")
    p.add_argument("--parallel", type=int, default=1, help=parallel_help)
    add_out_argument(p, study, out_note)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    add_address_argument(p, address_help)


def add_budget_arguments(p, defaults: dict, *, steps_note: str, hosts_help: str, envs_note: str = "") -> None:
    """``--seeds``, ``--steps``, ``--hosts``, ``--envs``: every arm's budget, from ``defaults``
    (keys seeds, steps, hosts, envs); checked by ``require_budget``."""
    p.add_argument("--seeds", default=defaults["seeds"], help=f"N or a comma list (default {defaults['seeds']})")
    p.add_argument("--steps", type=int, default=defaults["steps"],
                   help=f"env steps per run (default {defaults['steps']:,}; {steps_note})")
    p.add_argument("--hosts", type=int, default=defaults["hosts"], help=f"{hosts_help} (default {defaults['hosts']})")
    p.add_argument("--envs", "--envs-per-host", dest="envs", type=int, default=defaults["envs"],
                   help=f"envs per worker (default {defaults['envs']}{envs_note})")


def require_budget(args) -> None:
    """Bad input in the options of ``add_budget_arguments`` and ``add_run_arguments``."""
    require_positive(("--steps", args.steps), ("--hosts", args.hosts), ("--envs", args.envs),
                     ("--parallel", args.parallel), ("--last-k", getattr(args, "last_k", None)))


def choose_keys(names: list[str], keys, groups: dict[str, list[str]], flag: str, what: str) -> list[str]:
    """A comma-list option of keys or group names (any case) as keys in the order of ``keys``;
    a one-line usage error for an unknown name or an empty choice."""
    from saferl.config import ConfigError

    chosen = set()
    for name in names:
        key = name.strip().lower()
        if key in groups:
            chosen.update(groups[key])
        elif key in keys:
            chosen.add(key)
        else:
            raise ConfigError(f"usage error: {flag} {name!r}: unknown {what}; known: "
                              f"{', '.join(groups)} (groups), {', '.join(keys)}")
    if not chosen:
        raise ConfigError(f"usage error: {flag} needs at least one {what}")
    return [k for k in keys if k in chosen]


def require_positive(*flags: tuple[str, int | float | None]) -> None:
    """Bad input: a one-line usage error naming the first (flag, value) that is given and ≤ 0."""
    from saferl.config import ConfigError

    for flag, v in flags:
        if v is not None and v <= 0:
            raise ConfigError(f"usage error: {flag} must be > 0 (got {v})")


def require_task(task: str, flag: str | None = None) -> None:
    """Bad input: a one-line usage error for a task the registry does not know."""
    from saferl import registry
    from saferl.config import ConfigError

    if task not in registry.TASKS:
        raise ConfigError(f"usage error: {flag + ': ' if flag else ''}unknown task {task!r}; see `saferl list`")


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: N for seeds 0..N-1, or a comma list of distinct seeds ≥ 0."""
    from saferl.config import ConfigError

    try:
        seeds = [int(x) for x in csv_list(text)] if "," in text else list(range(int(text)))
    except ValueError:
        raise ConfigError(f"usage error: --seeds {text!r}: expected N or a comma list of seeds") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"usage error: --seeds {text!r}: expected N > 0 or distinct seeds ≥ 0")
    return seeds


FINAL_FRACTION = 0.1  # default K of final_performance: the last 10% of a run's logged points


def final_performance(returns: list[float], costs: list[float],
                      last_k: int | None = None) -> tuple[float | None, float | None, int]:
    """(mean return, mean cost, K) over a run's last K logged points; K = last_k, or by default
    ceil(10% of the points), at least 1 and at most the points there are."""
    n = len(returns)
    if n == 0:
        return None, None, 0
    k = min(n, last_k) if last_k else max(1, math.ceil(FINAL_FRACTION * n))
    return statistics.fmean(returns[-k:]), statistics.fmean(costs[-k:]), k


def shipped_config(algo: str, task: str) -> tuple[str, Path]:
    """The shipped ``configs/<algo>/<task>.yaml`` as (the source for ``load_config``, the file):
    a wrapped task without its own file (e.g. ``SafeGBPOPendulum-RM-v0``) uses its base task's,
    as ``load_config("algo/task")`` does; a one-line study error when there is none."""
    from saferl.config import CONFIG_DIR, ConfigError, resolve_path

    source = str(CONFIG_DIR / algo / task)  # anchored at configs/, never a path under the cwd
    try:
        path, _ = resolve_path(source)
    except ConfigError:
        path = CONFIG_DIR / algo / f"{task}.yaml"
        raise ConfigError(f"study error: no shipped config {path.relative_to(CONFIG_DIR.parent)} "
                          f"for {algo} on {task}") from None
    return source, path


def plan_job(algo: str, task: str, seed: int, out: Path, overrides: list[str], user_set: list[str],
             suffix: str = "") -> dict:
    """One study job: ``configs/<algo>/<task>.yaml`` (validated now) as run ``<algo>-<task>-s<seed>``
    (``<algo>-<task>-<suffix>-s<seed>`` with a suffix, for several runs of one algorithm) under
    ``out/runs``, logging every iteration (no finished episode is dropped from the curve), with
    the study's ``overrides`` and then the user's ``--set`` (which win)."""
    from saferl.config import CONFIG_DIR, load_config

    source, path = shipped_config(algo, task)
    name = f"{algo}-{task}-{suffix}-s{seed}" if suffix else f"{algo}-{task}-s{seed}"
    mine = [f"seed={seed}", f"run_root={out / 'runs'}", f"name={name}", "schedule.log_every=1", *overrides]
    every = mine + list(user_set)
    return {"task": task, "algo": algo, "seed": seed, "name": name, "cfg": load_config(source, every),
            "config": str(path.relative_to(CONFIG_DIR.parent)), "overrides": every}


def warn_if_no_episode(job: dict, console) -> None:
    """Warn when a job's envs get too few steps to end one episode (its curve would be empty)."""
    cfg = job["cfg"]
    per_env = cfg.total_env_steps // (cfg.resources.num_env_hosts * cfg.resources.envs_per_host)
    if per_env < cfg.task_spec.max_episode_steps:
        console.print(f"[yellow]warning[/yellow]: {job['algo']} on {job['task']}: {per_env:,} steps per env end "
                      f"no {cfg.task_spec.max_episode_steps}-step episode; raise --steps or lower --hosts/--envs")


class Heartbeat:
    """A console for one run's coordinator that forwards at most one line per HEARTBEAT_S."""

    def __init__(self, console, prefix: str):
        self.console, self.prefix, self.last = console, prefix, time.monotonic()

    def print(self, msg, *a, **kw) -> None:
        now = time.monotonic()
        if now - self.last >= HEARTBEAT_S:
            self.last = now
            self.console.print(f"    {self.prefix} {msg}")


def train_one(job: dict, console, tag: str) -> dict:
    from saferl.cluster import rundir
    from saferl.cluster.session import train

    cfg = job["cfg"]
    what = job.get("label") or job["algo"]  # a study's variant label, or the algorithm
    run_dir = Path(cfg.run_root) / job["name"]
    done = run_dir / DONE_MARKER
    record = {"task": job["task"], "algo": job["algo"], "seed": job["seed"], "cost_limit": cfg.limit,
              "total_env_steps": cfg.total_env_steps,
              "num_envs": cfg.resources.num_env_hosts * cfg.resources.envs_per_host, "run_dir": str(run_dir)}
    if done.is_file():
        kept = json.loads(done.read_text())
        note = ""
        if "total_env_steps" in kept and (kept["total_env_steps"], kept.get("num_envs")) != (
                record["total_env_steps"], record["num_envs"]):
            note = (f" (note: it ran {kept.get('total_env_steps'):,} env steps with {kept.get('num_envs')} envs; "
                    "use another --out to rerun)")
        record.update(kept, status="ok (kept)")
        console.print(f"{tag} {what} on {job['task']} seed {job['seed']}: finished earlier, kept{note}")
        return record
    resume = None
    if run_dir.exists():
        if rundir.checkpoints(run_dir):
            resume = run_dir
        else:  # started but nothing to resume from: start over
            shutil.rmtree(run_dir)
    console.print(f"{tag} {'resume' if resume else 'start'} {what} on {job['task']} seed {job['seed']} "
                  f"({cfg.total_env_steps:,} env steps, {record['num_envs']} envs)")
    t0 = time.perf_counter()
    try:
        out = train(cfg, run_dir=resume, console=Heartbeat(console, f"{tag} {what}/{job['task']}"))
    except Exception as err:  # noqa: BLE001 — one failed run must not lose the others
        import traceback

        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        record.update(status=f"failed: {err.__class__.__name__}: {(lines[-1] if lines else '')[:300]}",
                      wall_s=time.perf_counter() - t0)
        if run_dir.exists():
            (run_dir / "study_error.txt").write_text("".join(traceback.format_exception(err)))
        console.print(f"{tag} FAILED {what} on {job['task']} seed {job['seed']}: "
                      f"{record['status']} (traceback in {run_dir / 'study_error.txt'})", markup=False)
        return record
    record["run_dir"] = str(out)
    wall = time.perf_counter() - t0
    (Path(out) / DONE_MARKER).write_text(json.dumps({k: record[k] for k in (
        "total_env_steps", "num_envs", "cost_limit")} | {"wall_s": wall}))
    record.update(status="ok", wall_s=wall)
    return record


def needs(cfg) -> tuple[float, float]:
    """(CPUs, GPUs) a run's actors hold: its env hosts / gradient workers and its learner."""
    from saferl.cluster.session import required_cpus

    r = cfg.resources
    return required_cpus(cfg), r.num_gpus_per_learner + r.num_env_hosts * r.num_gpus_per_host


def start_ray(cfgs: list, args) -> bool:
    """Join ``--address`` / $RAY_ADDRESS, or start a local Ray sized for the ``--parallel``
    largest runs (logical CPUs may exceed the cores: Ray time-shares them). True when this
    call started Ray."""
    import ray

    from saferl.cluster.session import connect

    if ray.is_initialized():
        return False
    if args.address or os.environ.get("RAY_ADDRESS"):
        return connect(None, address=args.address)
    need = sum(sorted((needs(c)[0] for c in cfgs), reverse=True)[: args.parallel])
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), logging_level="warning")
    return True


class ResourceGate:
    """With ``--parallel``, start a run only when the cluster has the CPUs/GPUs for all of its
    actors: runs that each got a learner but wait for hosts would otherwise deadlock."""

    def __init__(self):
        import ray

        total = ray.cluster_resources()
        self.cpus, self.gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
        self.used_cpus = self.used_gpus = 0.0
        self.running = 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, cfg):
        cpus, gpus = needs(cfg)
        with self.cond:
            self.cond.wait_for(lambda: self.running == 0 or (self.used_cpus + cpus <= self.cpus + 1e-9
                                                               and self.used_gpus + gpus <= self.gpus + 1e-9))
            self.used_cpus, self.used_gpus = self.used_cpus + cpus, self.used_gpus + gpus
            self.running += 1
        try:
            yield
        finally:
            with self.cond:
                self.used_cpus, self.used_gpus, self.running = (self.used_cpus - cpus, self.used_gpus - gpus,
                                                                self.running - 1)
                self.cond.notify_all()


def run_jobs(jobs: list[dict], args, console, finish) -> list[dict]:
    """Train every job (``args.parallel`` at a time; Ray started here unless it runs already)
    and call ``finish(record, tag)`` on each run's record under a lock, for partial outputs.
    Returns the records in completion order."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    to_train = [j["cfg"] for j in jobs if not (Path(j["cfg"].run_root) / j["name"] / DONE_MARKER).is_file()]
    started = start_ray(to_train, args) if to_train else False
    gate = ResourceGate() if args.parallel > 1 and to_train else None
    records: list[dict] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(i_job):
        i, job = i_job
        tag = f"[{i + 1}/{len(jobs)}]"
        with gate.hold(job["cfg"]) if gate is not None else contextlib.nullcontext():
            record = train_one(job, console, tag)
        with lock:
            records.append(record)
            finish(record, tag)
            trained = sum(not r["status"].endswith("(kept)") for r in records)  # kept runs take no time
            console.print(f"{len(records)}/{len(jobs)} runs done | "
                          f"{eta(time.monotonic() - t0, trained, len(jobs) - len(records))}")

    try:
        if args.parallel == 1:
            for item in enumerate(jobs):
                one(item)
        else:
            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(one, enumerate(jobs)))
    except KeyboardInterrupt:
        out = Path(jobs[0]["cfg"].run_root).parent if jobs else "the same folder"
        console.print(f"interrupted: run the same command with --out {out} to continue (finished runs are "
                      "kept, interrupted ones resume from their last checkpoint)")
        raise
    finally:
        if started:
            ray.shutdown()
    return records


def train_and_measure(jobs: list[dict], args, console, measure, write, describe) -> tuple[list, list, list]:
    """``run_jobs`` with a study's per-run step: ``measure(record, job)`` adds the run's numbers to
    its record and returns ``(record, curve_points, other_points)``; ``write(records)`` rewrites
    the study's tables with the runs measured so far (partial outputs), and ``describe(record)``
    is the line printed after the run's tag once it has numbers. Returns the records and the
    points of every run."""
    by_name = {j["name"]: j for j in jobs}
    done, curves, points = [], [], []

    def finish(record: dict, tag: str) -> None:
        record, curve, other = measure(record, by_name[Path(record["run_dir"]).name])
        done.append(record)
        curves.extend(curve)
        points.extend(other)
        write(done)
        if record.get("final_return") is not None:
            console.print(f"{tag} done {describe(record)}")

    records = run_jobs(jobs, args, console, finish)
    write(records)
    return records, curves, points


def failed_runs(records: list[dict]) -> list[dict]:
    return [r for r in records if not r["status"].startswith("ok")]


def failed_note(records: list[dict]) -> str | None:
    """A study table's note that its failed runs are left out (None when none failed)."""
    failed = failed_runs(records)
    return f"{len(failed)} run(s) failed and are left out; see runs.csv." if failed else None


def fail_if_any_failed(records: list[dict], out: Path) -> None:
    failed = failed_runs(records)
    if failed:
        from saferl.config import ConfigError

        raise ConfigError(f"study error: {len(failed)} of {len(records)} runs failed (see {out / 'runs.csv'}); "
                          "the table leaves them out")


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Atomically (a study may be interrupted while writing partial results)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    os.replace(tmp, path)


def plot_mean_std(ax, runs: list, color, label: str) -> None:
    """Curves (arrays [n, 2] of x, y) of several seeds: mean ± std on their common x range
    (one seed: the curve itself)."""
    import numpy as np

    if len(runs) == 1:
        ax.plot(runs[0][:, 0], runs[0][:, 1], color=color, label=label)
        return
    lo, hi = max(r[0, 0] for r in runs), min(r[-1, 0] for r in runs)
    grid = np.linspace(lo, hi, 200) if hi > lo else np.array([lo])
    ys = np.stack([np.interp(grid, r[:, 0], r[:, 1]) for r in runs])
    mean, std = ys.mean(0), ys.std(0)
    ax.plot(grid, mean, color=color, label=f"{label} ({len(runs)} seeds)")
    ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def by_seed(curves: list[tuple], match) -> dict[int, list[tuple]]:
    """Rows ``(*keys, seed, x, return, cost)`` of a study's curves whose keys satisfy ``match``,
    as seed -> [(x, return, cost)]."""
    series: dict[int, list] = {}
    for *keys, seed, x, ret, cost in curves:
        if match(*keys):
            series.setdefault(seed, []).append((x, ret, cost))
    return series


def plot_return_and_cost(ax_r, ax_c, series: dict[int, list[tuple]], color, label: str) -> None:
    """Mean ± std over seeds of the return (on ``ax_r``) and the cost (on ``ax_c``)."""
    import numpy as np

    if series:
        for ax, col in ((ax_r, 1), (ax_c, 2)):
            plot_mean_std(ax, [np.array(sorted(v))[:, [0, col]] for v in series.values()], color, label)


def finish_return_and_cost(ax_r, ax_c, limit: float | None) -> None:
    """The cost-limit line, axis labels, grid and legends of a return / cost pair of panels."""
    if limit is not None:
        ax_c.axhline(limit, color="k", linestyle="--", linewidth=1, label=f"cost limit {limit:g}")
    for ax, name in ((ax_r, "episode return"), (ax_c, "episode cost")):
        ax.set_xlabel("env steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


def planned_runs(jobs, *keys: str) -> list[dict]:
    """What ``study.json`` records of each planned job."""
    return [{k: j[k] for k in keys} for j in jobs]


def record_plan(out: Path, console, settings: dict, plan: str, filename: str = "study.json") -> None:
    """Create ``out``, write ``settings`` there (``study.json``: what the outputs were produced
    with) and print the plan, "<plan> into <out>"."""
    out.mkdir(parents=True, exist_ok=True)
    (out / filename).write_text(json.dumps(settings, indent=2))
    console.print(f"{plan} into {out}")


def finish_study(console, records: list[dict], out: Path, t0: float, outputs: str) -> Path:
    """The closing line (runs, seconds since ``t0``, where the ``outputs`` are), then a one-line
    study error when a run failed."""
    console.print(f"{len(records)} runs in {time.perf_counter() - t0:.0f} s; {outputs} in {out}")
    fail_if_any_failed(records, out)
    return out


def study_console_and_out(name: str, args):
    """The console a study prints to and its output folder (``--out``, or a fresh timestamped one)."""
    from rich.console import Console

    out = Path(args.out or f"runs/studies/{name}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    return Console(highlight=False, soft_wrap=True), out


def save_figure(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
