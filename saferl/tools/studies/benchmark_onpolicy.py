"""On-policy benchmark in OmniSafe's format: every on-policy algorithm × Safety-Gymnasium task ×
seed, final Reward and Cost as mean ± std over seeds.

    saferl benchmark onpolicy                  reduced default (2-core machine, ~6 min): SafetyPointGoal1-v0,
                                               every algorithm, 2 seeds, 20,000 env steps per run
                                               (2,000 per iteration), 1 host × 2 envs
    saferl benchmark onpolicy --tasks all --seeds 5 --steps 10000000 --steps-per-iteration 20000 \\
        --hosts 2 --envs 10 --parallel 8 --address auto
                                               OmniSafe's scale (1e7 steps, 20k per iteration, the shipped
                                               configs' 2 hosts × 10 envs) on a Ray cluster
    saferl benchmark onpolicy --algos ppo_lag,cpo --tasks SafetyCarCircle1-v0 --seeds 0,3

A run is ``saferl train <algo>/<task>`` with the shipped config (``configs/<algo>/<task>.yaml``,
its hyper-parameters untouched) and ``total_env_steps``, ``steps_per_iteration`` and the env
hosts from the flags; ``--set`` overrides every run. All runs share one Ray session (a local one,
or a cluster's with ``--address`` / $RAY_ADDRESS). Outputs in ``--out``:

    benchmark.md     per task, one row per algorithm: Reward and Cost, mean ± std over seeds
    summary.csv      the same numbers at full precision (one row per task × algorithm)
    runs.csv         one row per run: final return and cost, logged points, K, wall time, run dir
    curves.csv       (task, algo, seed, env steps, episode return, episode cost) of every run
    curves_<task>.png  return and cost vs env steps per algorithm (mean ± std over seeds), with
                     the cost limit
    benchmark.json   the settings
    runs/            the run directories ``<algo>-<task>-s<seed>``

Re-running with the same ``--out`` keeps finished runs, resumes interrupted ones from their last
checkpoint and recomputes the outputs (so another ``--last-k`` costs no training).

The implementation is ``benchmark.py``'s, shared with ``saferl benchmark offpolicy``; this module
is its on-policy preset. **Final performance** (``benchmark.py``): a run's final Reward and Cost
are the means of its logged iterations' mean episode return / cost over its last K points, K =
``--last-k`` or the last 10% (at least 1); the table shows mean ± sample std over the seeds.
"""
from __future__ import annotations

import argparse
import functools

from saferl.tools.studies import benchmark as _b

HELP = "on-policy algorithms × Safety-Gymnasium tasks: OmniSafe-style Reward/Cost table (mean ± std), curves"

# The benchmark's algorithms, table row order. A new on-policy algorithm is one more name here
# (and its configs/<algo>/<task>.yaml for every task below: tests/test_shipped_configs.py checks).
ONPOLICY_ALGOS = ("ppo", "trpo", "ppo_lag", "trpo_lag", "cppo_pid", "rcpo", "focops", "cup", "cpo", "pcpo", "strpo")
SAFETY_GYM_TASKS = ("SafetyPointGoal1-v0", "SafetyCarGoal1-v0", "SafetyCarCircle1-v0", "SafetyPointButton1-v0",
                    "SafetyAntVelocity-v1", "SafetyHopperVelocity-v1")
ALGO_LABELS = {"ppo": "PPO", "trpo": "TRPO", "ppo_lag": "PPOLag", "trpo_lag": "TRPOLag", "cppo_pid": "CPPOPID",
               "rcpo": "RCPO", "focops": "FOCOPS", "cup": "CUP", "cpo": "CPO", "pcpo": "PCPO",
               "strpo": "sTRPO"}
DEFAULTS = {"tasks": ("SafetyPointGoal1-v0",), "seeds": "2", "steps": 20_000, "steps_per_iteration": 2_000,
            "hosts": "1", "envs": "2"}


def _extra_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unsafe-steps", type=int, default=None,
                   help="sTRPO's stage-1 budget (its unsafe policy; extra env steps, reported in runs.csv); "
                   "default half of --steps")


def _extra_settings(args, s: dict) -> dict:
    return {"unsafe_steps": args.unsafe_steps or max(1, s["steps"] // 2)}


def _job_overrides(s: dict, cfg) -> list[str]:
    return [f"algo_params.unsafe_steps={s['unsafe_steps']}"] if cfg.algo == "strpo" else []


PRESET = _b.Preset(
    name="onpolicy", title="On-policy", kind="sampling", kind_text="an on-policy (sampling)",
    algos=ONPOLICY_ALGOS, tasks=SAFETY_GYM_TASKS, labels=ALGO_LABELS, defaults=DEFAULTS,
    scale={"seeds": "OmniSafe 5", "steps": "OmniSafe 10000000", "steps_per_iteration": "OmniSafe 20000"},
    doc=__doc__, help=HELP, extra_arguments=_extra_arguments, extra_settings=_extra_settings,
    job_overrides=_job_overrides)

final_performance = _b.final_performance  # the rule the table uses (runner.py)
label = PRESET.label
summary_rows = functools.partial(_b.summary_rows, PRESET)
table = functools.partial(_b.table, PRESET)
add_arguments = functools.partial(_b.add_arguments, PRESET)
run = functools.partial(_b.run, PRESET)
