"""The ``saferl`` command line.

    saferl train CONFIG [--set key=value ...]      run on the embedded local Ray cluster
    saferl train --resume RUN_DIR                   continue from the last checkpoint
    saferl submit CONFIG --address ADDR             run as a Ray job on a cluster
    saferl status|logs|stop JOB_ID --address ADDR   follow a submitted job (status: + latest metrics)
    saferl dashboard RUN_DIR [RUN_DIR ...]          TensorBoard over the runs, live (Ctrl-C stops it)
    saferl eval RUN_DIR --episodes N                return, cost and violation rate
    saferl eval RUN_DIR --video [--format gif|mp4]  render episodes to RUN_DIR/videos/
    saferl report RUN_DIR... [--out report.html]    self-contained HTML report + CSVs of runs
    saferl sweep CONFIG --grid k=a,b --seeds N      Ray Tune sweep: table, plot, best combination
    saferl list                                     algorithms and tasks
    saferl bench rollout|gradients|e2e|learner|memory  throughput, end to end, memory
    saferl bench device                             the same work on the CPU and each GPU (no Ray)
    saferl bench soak                               training while env hosts are SIGKILLed
    saferl study NAME                               reproduce a paper's table/figure
    saferl benchmark onpolicy                       OmniSafe-style Reward/Cost table of the on-policy
                                                    algorithms on the Safety-Gymnasium tasks
    saferl benchmark offpolicy                      the same for the off-policy algorithms on CVPO's
                                                    tasks, with reward vs cumulative cost (its Figure 4)
    saferl benchmark reference                      a baseline next to OmniSafe 0.5 (same task, seed, budget):
                                                    one plot, one table

User errors print one line (``config error: …``) and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from saferl import registry
from saferl.config import ConfigError, load_config

# `saferl bench memory`'s default runs: env hosts + learner, + replay buffer, gradient workers
MEMORY_RUNS = ("ppo_lag/SafetyPointGoal1-v0", "sac_lag/SafetyPointGoal1-v0", "cgpo/BraxReacher-v0")


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def cmd_list(args) -> int:
    con = _console()
    con.print("[bold]algorithms[/bold]")
    for a in registry.ALGORITHMS.values():
        con.print(f"  {a.name:<12} {a.kind:<9} phases={','.join(a.phases):<8} {a.paper}")
    con.print("[bold]tasks[/bold]")
    _list_sg_tasks(con)
    for t in registry.TASKS.values():
        if t.name in registry.SG_TASKS:
            continue
        diff = "differentiable" if t.differentiable else ""
        con.print(f"  {t.name:<26} {t.kind:<17} cost_limit={t.cost_limit:<6g} T={t.max_episode_steps:<5} {diff}")
    return 0


def _braces(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else "{" + ",".join(items) + "}"


def _list_sg_tasks(con) -> None:
    """Safety-Gymnasium's tasks as brace patterns (one line per levels and episode length), which
    have config files, and which ids are refused."""
    from saferl.config import CONFIG_DIR

    groups: dict[tuple, list[str]] = {}
    for task, (levels, steps) in registry.SG_NAVIGATION.items():
        groups.setdefault((levels, steps), []).append(task)
    agents = _braces(registry.SG_AGENTS)
    lines = [(f"Safety{agents}{_braces(tasks)}{_braces(levels)}-v0", steps)
             for (levels, steps), tasks in groups.items()]
    velocity = registry.TASKS[f"Safety{registry.SG_VELOCITY_AGENTS[0]}Velocity-v1"]
    lines.append((f"Safety{_braces(registry.SG_VELOCITY_AGENTS)}Velocity-{{v0,v1}}", velocity.max_episode_steps))
    limit = registry.TASKS[registry.SG_TASKS[0]].cost_limit
    con.print(f"  Safety-Gymnasium: {len(registry.SG_TASKS)} tasks, safety_gymnasium, cost_limit={limit:g}")
    width = max(len(pattern) for pattern, _ in lines)
    for pattern, steps in lines:
        con.print(f"    {pattern:<{width}}  T={steps}")
    shipped = sorted({p.stem for p in CONFIG_DIR.glob("*/*.yaml")} & set(registry.SG_TASKS))
    con.print(f"    config files for {', '.join(shipped)}; a task without one uses its family's "
              "(Circle, Velocity), else SafetyPointGoal1-v0's")
    refused = ", ".join(f"Safety*{marker}*-v0" for marker in registry.SG_UNSUPPORTED)
    con.print(f"    not supported ({len(registry.UNSUPPORTED_TASKS)} ids; config loading says why): {refused}")


def cmd_train(args) -> int:
    from saferl.api import train_config
    from saferl.cluster import rundir

    con = _console()
    if args.resume:
        run_dir = Path(args.resume)
        cfg = rundir.load_run_config(run_dir, args.set)
        con.print(f"resuming {run_dir}")
    else:
        if not args.config:
            raise ConfigError("usage error: saferl train needs CONFIG or --resume RUN_DIR")
        cfg = load_config(args.config, args.set)
        run_dir = None
    out = train_config(cfg, run_dir=run_dir, console=con, stop_after=args.stop_after).run_dir
    con.print(f"[bold green]done[/bold green]: results in {out}  "
              f"(metrics.csv, tb/, checkpoints/; `saferl eval {out} --episodes 10`)")
    if not args.no_report:
        from saferl.tools.report import write_run_report

        paths = write_run_report(out)
        con.print(f"report: {paths['html']}  curves: {paths['png']}")
    return 0


def cmd_eval(args) -> int:
    from saferl.tools.evaluate import render_videos

    if args.video:
        for path in render_videos(Path(args.run_dir), args.episodes or 1, args.format,
                                  deterministic=not args.stochastic, max_frames=args.max_frames):
            print(path)
        return 0
    from saferl.api import evaluate_run

    result = evaluate_run(Path(args.run_dir), args.episodes or 10, deterministic=not args.stochastic)
    print(json.dumps({k: v for k, v in result.items() if k not in ("returns", "costs")}, indent=2))
    if args.save:
        from saferl.tools.evaluate import save_result

        print(f"saved {save_result(Path(args.run_dir), result, not args.stochastic)}", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    from saferl.cluster import sweep

    result = sweep.run_cli(args, _console())
    if result["interrupted"]:
        print(f"interrupted; the table holds the finished trials only: continue with "
              f"`saferl sweep --resume {result['out']}`", file=sys.stderr)
        return 130
    _console().print(f"[bold green]done[/bold green]: sweep results in {result['out']} (summary.md, trials.csv, "
                     "return_vs_cost.png, best.json)")
    return 0


def cmd_report(args) -> int:
    from saferl.tools.report import build_report

    paths = build_report(args.run_dirs, Path(args.out))
    print(f"wrote {paths['html']} ({paths['summary'].name}, {paths['curves'].name} next to it)")
    return 0


def cmd_submit(args) -> int:
    from saferl.cluster import jobs

    cfg = load_config(args.config, args.set)  # fail here, not on the cluster
    overrides = list(args.set)
    if not (cfg.run_root.startswith("~") or Path(cfg.run_root).is_absolute()):
        # a relative run_root would land in the job's temporary copy of the repository
        overrides.append(f"run_root=~/saferl-runs/{cfg.run_root}")
    job_id = jobs.submit(args.address, args.config, overrides, env_vars=args.env, python=args.python, cfg=cfg)
    where = dict(o.split("=", 1) for o in overrides if o.startswith("run_root="))
    print(f"submitted {job_id} to {args.address}; results under {where.get('run_root', cfg.run_root)} "
          f"on the node running the job; follow with: saferl status {job_id} --address {args.address}")
    return 0


def cmd_job(args) -> int:
    from saferl.cluster import jobs

    if args.command == "status":
        print(jobs.status(args.address, args.job_id))
        latest = jobs.latest_metrics(args.address, args.job_id)
        print(f"latest metrics: {latest or 'none yet'}")
    elif args.command == "logs":
        print(jobs.logs(args.address, args.job_id), end="")
    else:
        print(jobs.stop(args.address, args.job_id))
    return 0


def cmd_dashboard(args) -> int:
    import time

    from saferl.cluster.metrics import start_dashboard

    # Ctrl-C stops it even when started as a background job, which inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    url = start_dashboard(args.run_dirs, port=args.port)
    print(f"TensorBoard at {url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr, flush=True)
        os._exit(0)  # TensorBoard's reload threads may not be daemons: a plain return can hang on exit


def _specs(path: str | None) -> dict | None:
    """``--specs``: env specs by task name (JSON), for tasks whose simulator this machine lacks."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--specs {path}: {err}") from err


def cmd_bench(args) -> int:
    if args.bench in ("learner", "device"):  # in one process, no Ray
        return _bench_local(args)
    from saferl.tools import bench

    if args.bench == "rollout":
        bench.bench_rollout(out_dir=Path(args.out), task=args.task, steps=args.steps,
                            envs_per_host=args.envs_per_host, hosts=args.hosts, console=_console())
    elif args.bench == "gradients":
        bench.bench_gradients(out_dir=Path(args.out), task=args.task, workers=args.workers,
                              envs_per_worker=args.envs_per_worker, horizon=args.horizon,
                              windows=args.windows, console=_console())
    elif args.bench == "e2e":
        bench.bench_e2e(out_dir=Path(args.out), config=args.config, steps=args.steps, overrides=args.set,
                        reference=not args.no_reference, match=args.match,
                        reference_python=args.reference_python, console=_console())
    elif args.bench == "soak":
        bench.bench_soak(out_dir=Path(args.out), config=args.config, steps=args.steps, kill_every=args.kill_every,
                         seed=args.seed, hosts=args.hosts, episodes=args.episodes, overrides=args.set,
                         console=_console())
    else:
        bench.bench_memory(out_dir=Path(args.out), runs=args.runs, iterations=args.iterations, console=_console())
    return 0


def _bench_local(args) -> int:
    from saferl.tools import bench_local

    if args.bench == "learner":
        bench_local.bench_learner(out_dir=Path(args.out), algos=args.algos, updates=args.updates,
                                  device=args.device, specs=_specs(args.specs), overrides=args.set,
                                  console=_console())
    else:
        out = bench_local.bench_device(out_dir=Path(args.out), algos=args.algos, updates=args.updates,
                                       batches=args.batches, tasks=args.tasks, envs=args.envs, horizon=args.horizon,
                                       windows=args.windows, specs=_specs(args.specs), overrides=args.set,
                                       console=_console())
        return int(any("error" in r for r in out["learner"]))
    return 0


def cmd_study(args) -> int:
    from saferl.tools import studies

    out = studies.load(args.study).run(args)
    _console().print(f"[bold green]done[/bold green]: study results in {out}")
    return 0


def cmd_benchmark(args) -> int:
    from saferl.tools.studies import benchmark

    out = benchmark.load(args.benchmark).run(args)
    _console().print(f"[bold green]done[/bold green]: benchmark results in {out}")
    return 0



def _learner_bench_args(b: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options ``bench learner`` and ``bench device`` share."""
    b.add_argument("--algos", nargs="+", default=["ppo_lag", "sac_lag", "cvpo", "cgpo"],
                   help="algorithms (their default configs) or configs as <algo>/<task>")
    b.add_argument("--updates", type=int, default=3, help="timed update calls per algorithm, after one warm-up")
    b.add_argument("--specs", metavar="JSON", help="env specs by task name, for tasks whose simulator is not here")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every benchmarked config, e.g. algo_params.cuda_graph=false")
    b.add_argument("--out", default="bench_results")
    b.set_defaults(fn=cmd_bench)
    return b

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="saferl", description="Distributed safe RL on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="algorithms and tasks")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("train", help="train on the embedded local Ray cluster (or $RAY_ADDRESS)")
    p.add_argument("config", nargs="?", help="YAML file or configs/ short name, e.g. ppo_lag/SafetyPointGoal1-v0")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many iterations")
    p.add_argument("--no-report", action="store_true",
                   help="skip RUN_DIR/report.html and RUN_DIR/curves.png (return and cost against env steps)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=None, help="default 10 (with --video: 1)")
    p.add_argument("--stochastic", action="store_true", help="sample actions instead of the mean")
    p.add_argument("--video", action="store_true", help="render episodes to RUN_DIR/videos/eval_ep{k}.FORMAT")
    p.add_argument("--format", choices=["gif", "mp4"], default="gif", help="video format (default gif)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N",
                   help="cut each rendered episode at N frames (default: the whole episode, T + 1)")
    p.add_argument("--save", action="store_true", help="also write the result to RUN_DIR/eval.json (for saferl report)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("sweep", help="grid / random search × seeds as Ray Tune trials; table, plot, best combination")
    from saferl.cluster.sweep import add_arguments as sweep_arguments  # numpy and yaml at module level

    sweep_arguments(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("report", help="self-contained HTML report (and CSVs) of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="report.html", help="the HTML file; report_summary.csv and "
                   "report_curves.csv go next to it (default report.html)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("submit", help="submit a training job to a Ray cluster (Ray Jobs API)")
    p.add_argument("config")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="environment variable to forward to the job (none are sent otherwise)")
    p.add_argument("--python", metavar="PATH", default=None,
                   help="the job's interpreter on the head node (default: the one Ray runs its workers with there)")
    p.set_defaults(fn=cmd_submit)

    for name, help_ in (("status", "status of a submitted job"), ("logs", "logs of a submitted job"),
                        ("stop", "stop a submitted job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job_id")
        p.add_argument("--address", required=True)
        p.set_defaults(fn=cmd_job)

    p = sub.add_parser("dashboard", help="TensorBoard over runs' tb/ folders, live, on 127.0.0.1")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--port", type=int, default=6006)
    p.set_defaults(fn=cmd_dashboard)

    p = sub.add_parser("bench", help="benchmarks that write result files")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("rollout", help="env steps/s: env hosts on Ray vs one plain process")
    b.add_argument("--task", default="SafetyPointGoal1-v0")
    b.add_argument("--steps", type=int, default=1000,
                   help="steps per env per measurement (1000 = one navigation episode, resets included)")
    b.add_argument("--envs-per-host", type=int, nargs="+", default=[4, 16, 32])
    b.add_argument("--hosts", type=int, nargs="+", default=[1, 2])
    b.add_argument("--out", default="bench_results")
    b.set_defaults(fn=cmd_bench)
    b = bsub.add_parser("gradients", help="gradient-worker throughput vs workers and envs per worker")
    b.add_argument("--task", default="BraxReacher-v0")
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    b.add_argument("--envs-per-worker", type=int, nargs="+", default=[16, 64])
    b.add_argument("--horizon", type=int, default=10, help="window length h")
    b.add_argument("--windows", type=int, default=5, help="timed windows after the first")
    b.add_argument("--out", default="bench_results")
    b.set_defaults(fn=cmd_bench)
    b = bsub.add_parser("e2e", help="end-to-end training wall-clock (updates included) vs one process without Ray")
    b.add_argument("--config", default="ppo_lag/SafetyPointGoal1-v0", help="configs/<algo>/<task> or a YAML path")
    b.add_argument("--steps", type=int, default=100_000, help="env steps to train (batch settings stay the config's)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    b.add_argument("--no-reference", action="store_true", help="skip the one-process reference")
    b.add_argument("--match", action="store_true",
                   help="then OmniSafe 0.5 on the same task, seed and budget at its own settings, in the same table "
                        "(needs the reference interpreter: saferl benchmark reference --install)")
    b.add_argument("--reference-python", help="OmniSafe's interpreter for --match (default .venv-omnisafe's)")
    b.add_argument("--out", default="bench_results")
    b.set_defaults(fn=cmd_bench)
    b = _learner_bench_args(bsub.add_parser(
        "learner", help="learner update throughput (samples/s) on fixed synthetic batches, no Ray"))
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    b = _learner_bench_args(bsub.add_parser(
        "device", help="learner updates, inference, gradient windows on the CPU and each GPU; no Ray"))
    b.add_argument("--batches", nargs="+", type=int, default=[64, 1024, 16384], help="observations per inference call")
    b.add_argument("--tasks", nargs="+", default=["BraxCartPole-v1", "SafeGBPOPendulum-BP-v0"],
                   help="differentiable tasks for the gradient-worker windows")
    b.add_argument("--envs", nargs="+", type=int, default=[16, 256, 4096], help="envs of one gradient worker")
    b.add_argument("--horizon", type=int, default=32, help="window length h")
    b.add_argument("--windows", type=int, default=3, help="timed windows per setting, after the first")
    b = bsub.add_parser("memory", help="peak resident memory per actor kind in short runs")
    b.add_argument("--runs", nargs="+", default=list(MEMORY_RUNS), help="configs (configs/<algo>/<task>)")
    b.add_argument("--iterations", type=int, default=2, help="iterations per run")
    b.add_argument("--out", default="bench_results")
    b.set_defaults(fn=cmd_bench)
    b = bsub.add_parser("soak", help="a long training run while a random env host is SIGKILLed every N seconds")
    b.add_argument("--config", default="ppo_lag/FunctionEnv-v0", help="configs/<algo>/<task> or a YAML path")
    b.add_argument("--steps", type=int, default=2_000_000, help="env steps to train")
    b.add_argument("--kill-every", type=float, default=10.0, metavar="S", help="seconds between kills")
    b.add_argument("--seed", type=int, default=0, help="the run's seed and the choice of hosts to kill")
    b.add_argument("--hosts", type=int, default=2, help="env hosts (resources.num_env_hosts)")
    b.add_argument("--episodes", type=int, default=10, help="evaluation episodes of the final checkpoint")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    b.add_argument("--out", default="bench_results")
    b.set_defaults(fn=cmd_bench)
    from saferl.tools import studies

    p = sub.add_parser("study", help="studies reproducing the papers' evidence (tables, plots, raw numbers)")
    ssub = p.add_subparsers(dest="study", required=True)
    for name in studies.STUDIES:
        module = studies.load(name)  # study modules import only the stdlib at module level
        s = ssub.add_parser(name, help=module.HELP)
        module.add_arguments(s)
        s.set_defaults(fn=cmd_study)

    from saferl.tools.studies import benchmark  # the stdlib only at module level

    p = sub.add_parser("benchmark", help="algorithm × task × seed benchmarks in OmniSafe's table format")
    bsub = p.add_subparsers(dest="benchmark", required=True)
    for name in benchmark.BENCHMARKS:  # onpolicy, offpolicy, reference
        module = benchmark.load(name)
        b = bsub.add_parser(name, help=module.HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(b)
        b.set_defaults(fn=cmd_benchmark)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with `saferl train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
