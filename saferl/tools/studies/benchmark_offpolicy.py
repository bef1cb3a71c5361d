"""Off-policy benchmark in OmniSafe's format, with CVPO's Figure 4: every off-policy algorithm ×
Safety-Gymnasium task × seed, final Reward and Cost as mean ± std over seeds, and reward vs
cumulative cost.

    saferl benchmark offpolicy                 reduced default (2-core machine, ~30 min): SafetyPointCircle1-v0,
                                               every algorithm, 2 seeds, 10,000 env steps per run
                                               (2,000 per iteration, warm-up 1,000), 1 host × 2 envs
    saferl benchmark offpolicy --tasks all --seeds 5 --steps 1000000 --steps-per-iteration 2000 \\
        --hosts config --envs config --parallel 8 --address auto --set resources.num_gpus_per_learner=0.25
                                               the shipped configs' scale (1e6 steps, 2k per iteration,
                                               2 hosts × 10 envs, their warm-up) on a Ray cluster
    saferl benchmark offpolicy --algos cvpo,sac_lag --tasks SafetyCarButton1-v0 --seeds 0,3

The tasks are CVPO's (CVPO paper): Point/Car Goal1, Button1 and Circle1, cost limit 25. A run is
``saferl train <algo>/<task>`` with the shipped config (``configs/<algo>/<task>.yaml``, its
hyper-parameters untouched but the warm-up) and ``total_env_steps``, ``steps_per_iteration`` and
the env hosts from the flags; the uniform warm-up is the config's, at most 10% of ``--steps``
(``--warmup-steps`` sets it); ``--set`` overrides every run. Every iteration is logged. Outputs in
``--out``: those of ``saferl benchmark onpolicy`` (benchmark.md, summary.csv, runs.csv with each
run's final cumulative cost, curves.csv, curves_<task>.png, benchmark.json, runs/), and

    cumulative_cost.csv       per run and logged iteration with finished episodes: episodes,
                              mean episode cost and return, cumulative cost Σ episode/count ×
                              episode/cost so far
    cumulative_cost_mean.csv  the figure's points: per algorithm and task, the mean over seeds
                              of cumulative cost and episode return at each shared step
    cumulative_cost.png       CVPO's Figure 4: episode return vs cumulative cost (log x axis),
                              one panel per task, one line per algorithm

Re-running with the same ``--out`` keeps finished runs, resumes interrupted ones and recomputes
the outputs. The implementation (final performance, table, figures) is ``benchmark.py``'s.
"""
from __future__ import annotations

import argparse
import functools

from saferl.tools.studies import benchmark as _b

HELP = ("off-policy algorithms × CVPO's Safety-Gymnasium tasks: OmniSafe-style Reward/Cost table, "
        "reward vs cumulative cost (CVPO's Figure 4)")

# The benchmark's algorithms, table row order; each needs configs/<algo>/<task>.yaml for every task
# below (tests/test_offpolicy_configs.py checks). fac_sis / fac need a geometry tail: not here.
OFFPOLICY_ALGOS = ("cvpo", "sac_lag", "td3_lag", "ddpg_lag", "sac")
# CVPO's Safety-Gymnasium tasks (CVPO paper, §6: Goal1, Button1 and Circle1 for Point and Car)
OFFPOLICY_TASKS = ("SafetyPointGoal1-v0", "SafetyCarGoal1-v0", "SafetyPointButton1-v0", "SafetyCarButton1-v0",
                   "SafetyPointCircle1-v0", "SafetyCarCircle1-v0")
ALGO_LABELS = {"cvpo": "CVPO", "sac_lag": "SACLag", "td3_lag": "TD3Lag", "ddpg_lag": "DDPGLag", "sac": "SAC",
               "td3": "TD3", "ddpg": "DDPG", "fac_sis": "FAC-SIS", "fac": "FAC"}
# Reduced default: Circle1 (500-step episodes: 4 finish per iteration on 2 envs, the cheapest
# simulation of the six, 28 observations) and a budget whose updates a 2-core machine does in minutes.
DEFAULTS = {"tasks": ("SafetyPointCircle1-v0",), "seeds": "2", "steps": 10_000, "steps_per_iteration": 2_000,
            "hosts": "1", "envs": "2"}
WARMUP_FRACTION = 0.1  # default warm-up cap: 10% of --steps


def _extra_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="uniform-action env steps before learning, every run (default: the config's, at most "
                        f"{WARMUP_FRACTION:.0%}% of --steps)")


def _extra_settings(args, s: dict) -> dict:
    from saferl.config import ConfigError

    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ConfigError(f"usage error: --warmup-steps must be >= 0 (got {args.warmup_steps})")
    return {"warmup_steps": args.warmup_steps, "warmup_cap": int(WARMUP_FRACTION * s["steps"])}


def _job_overrides(s: dict, cfg) -> list[str]:
    if s["warmup_steps"] is not None:
        return [f"algo_params.warmup_steps={s['warmup_steps']}"]
    if cfg.learner_params().warmup_steps > s["warmup_cap"]:
        return [f"algo_params.warmup_steps={s['warmup_cap']}"]
    return []


PRESET = _b.Preset(
    name="offpolicy", title="Off-policy", kind="offpolicy", kind_text="an off-policy",
    algos=OFFPOLICY_ALGOS, tasks=OFFPOLICY_TASKS, labels=ALGO_LABELS, defaults=DEFAULTS,
    scale={"seeds": "cluster scale 5", "steps": "the configs' 1000000",
           "steps_per_iteration": "the configs' 2000"},
    doc=__doc__, help=HELP, cumulative_cost=True, extra_arguments=_extra_arguments,
    extra_settings=_extra_settings, job_overrides=_job_overrides,
    outputs=("benchmark.md", "summary.csv", "runs.csv", "curves.csv", "curves_<task>.png", "cumulative_cost.csv",
             "cumulative_cost_mean.csv", "cumulative_cost.png", "benchmark.json", "runs/"))

label = PRESET.label
summary_rows = functools.partial(_b.summary_rows, PRESET)
table = functools.partial(_b.table, PRESET)
add_arguments = functools.partial(_b.add_arguments, PRESET)
run = functools.partial(_b.run, PRESET)
