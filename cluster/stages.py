"""Stages a run needs before its own training (``AlgoSpec.pretrain``), run by ``session.train``
in the same Ray session and the same run directory, resumable like the run itself."""
from __future__ import annotations

import shutil
from pathlib import Path

from saferl.config import ConfigError, RunConfig, load_config

DONE_MARKER = "stage_done"


def unsafe_policy_stage(cfg: RunConfig, run_dir: Path, console=None) -> RunConfig:
    """sTRPO's stage 1 (sTRPO paper, §4.1): unless ``algo_params.unsafe_policy`` names a trained
    π_unsafe, train ``trpo_unsafe`` on the same task (its shipped config, this run's seed,
    resources and device, ``algo_params.unsafe_steps`` steps) in RUN_DIR/unsafe_policy, and
    return the config pointing at it (also written to RUN_DIR/config.yaml, so a resume reuses it)."""
    from saferl.cluster import rundir
    from saferl.cluster.session import train

    params = cfg.learner_params()
    if params.unsafe_policy is not None or not params.exclusion:
        return cfg
    stage_dir = Path(run_dir) / "unsafe_policy"
    if not (stage_dir / DONE_MARKER).is_file():
        try:
            base = load_config(f"trpo_unsafe/{cfg.task}")
        except ConfigError:
            raise ConfigError(f"config error: algo_params.unsafe_policy: unset, and no stage-1 config "
                              f"configs/trpo_unsafe/{cfg.task}.yaml is shipped; train a trpo_unsafe run "
                              "and set its path") from None
        data = {**base.model_dump(mode="json"), "seed": cfg.seed, "total_env_steps": params.unsafe_steps,
                "steps_per_iteration": cfg.steps_per_iteration, "device": cfg.device,
                "resources": cfg.resources.model_dump(), "logging": cfg.logging.model_dump(),
                "run_root": str(run_dir), "name": stage_dir.name, "task": cfg.task}
        stage = load_config(data)
        if console is not None:
            console.print(f"[bold]sTRPO stage 1[/bold]: training the unsafe policy (trpo_unsafe, "
                          f"{params.unsafe_steps:,} steps) in {stage_dir}")
        resumable = stage_dir.is_dir() and rundir.checkpoints(stage_dir)
        if stage_dir.is_dir() and not resumable:
            shutil.rmtree(stage_dir)  # killed before its first checkpoint: start it again
        train(stage, run_dir=stage_dir if resumable else None, console=console)
        (stage_dir / DONE_MARKER).write_text("done\n")
    cfg = load_config({**cfg.model_dump(mode="json"),
                       "algo_params": {**cfg.algo_params, "unsafe_policy": str(stage_dir)}})
    (Path(run_dir) / "config.yaml").write_text(cfg.to_yaml())
    return cfg
