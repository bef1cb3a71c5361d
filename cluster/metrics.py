"""Metric sinks: CSV + JSONL and TensorBoard in the run directory, Weights & Biases (offline
unless the user opts in), and Ray metrics (Prometheus export) when running under Ray.

``MetricsLogger.log`` is the one path every metric row takes; it fans the row out to each sink.
``serve_dashboard`` is ``saferl dashboard``: TensorBoard over the runs' ``tb/`` folders.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from saferl.config import ConfigError, RunConfig
from saferl.metric_keys import COST_LIMIT, EPISODE_COST, EPISODE_RETURN, LAGRANGE_MULTIPLIER

# The fixed set published as Ray Gauges: row key -> gauge name. Ray's Prometheus export
# prefixes each with ``ray_`` (e.g. ``ray_saferl_episode_return``); tags: run, algo, task.
RAY_GAUGES = {
    EPISODE_RETURN: "saferl_episode_return",
    EPISODE_COST: "saferl_episode_cost",
    COST_LIMIT: "saferl_cost_limit",
    "episode/violation_rate": "saferl_violation_rate",
    LAGRANGE_MULTIPLIER: "saferl_lagrange_multiplier",
    "iteration": "saferl_iteration",
    "env_steps": "saferl_env_steps",
    "time/env_steps_per_s": "saferl_env_steps_per_s",
    "time/learner_updates_per_s": "saferl_learner_updates_per_s",
    "health/actors_alive": "saferl_actors_alive",
}
RAY_TAGS = ("run", "algo", "task")


class RayMetricsSink:
    """``ray.util.metrics.Gauge`` per entry of ``RAY_GAUGES``, set from each logged row (a metric
    absent from a row keeps its last value). Ray's metrics agent on the driver's node exports
    them for Prometheus, so the Ray dashboard's Grafana panels can plot a run."""

    def __init__(self, run_name: str, cfg: RunConfig):
        from ray.util.metrics import Gauge

        self.tags = {"run": run_name, "algo": cfg.algo, "task": cfg.task}
        self.gauges = {key: Gauge(name, description=f"saferl {key}", tag_keys=RAY_TAGS)
                       for key, name in RAY_GAUGES.items()}

    def log(self, row: dict) -> None:
        for key, gauge in self.gauges.items():
            if key in row:
                gauge.set(float(row[key]), tags=self.tags)


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: RunConfig):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.csv_path = self.run_dir / "metrics.csv"
        self.columns: list[str] = []
        if self.csv_path.exists():  # resumed run: keep appending with the same header
            with open(self.csv_path, newline="") as fh:
                self.columns = next(csv.reader(fh), [])
        self.tb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.wandb = None
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb_mode,
                                    dir=str(self.run_dir), name=self.run_dir.name, resume="allow",
                                    id=self.run_dir.name, config=cfg.model_dump(mode="json"))
        self.ray = None
        if cfg.logging.ray_metrics:
            import ray

            if ray.is_initialized():  # a driver of a Ray cluster (the embedded one included)
                self.ray = RayMetricsSink(self.run_dir.name, cfg)

    def log(self, step: int, row: dict) -> None:
        row = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.cfg.logging.csv:
            self._csv(row)
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if self.ray is not None:
            self.ray.log(row)

    def _csv(self, row: dict) -> None:
        new = [k for k in row if k not in self.columns]
        if new:  # a metric appeared (e.g. the first finished episode): rewrite with a wider header
            old_rows = []
            if self.csv_path.exists():
                with open(self.csv_path, newline="") as fh:
                    old_rows = list(csv.DictReader(fh))
            self.columns += new
            with open(self.csv_path, "w", newline="") as fh:
                w = csv.DictWriter(fh, self.columns)
                w.writeheader()
                w.writerows(old_rows)
        with open(self.csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, self.columns).writerow(row)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# -- saferl dashboard ----------------------------------------------------------------------------
def _tb_name(text: str) -> str:
    return re.sub(r"[^\w.\-]", "_", text)


def dashboard_spec(run_dirs: list[str | Path]) -> str:
    """TensorBoard's ``--logdir_spec``: ``name:RUN/tb,...``, each run named by its directory
    (made unique with its parent's name, then a number)."""
    names: dict[str, Path] = {}
    for raw in run_dirs:
        run = Path(raw).expanduser().resolve()
        if not (run / "tb").is_dir() and not (run / "config.yaml").is_file():
            raise ConfigError(f"dashboard error: {raw} is not a run directory (no tb/ or config.yaml)")
        if any(c in str(run) for c in ",:"):
            raise ConfigError(f"dashboard error: {raw}: TensorBoard cannot take a path with ',' or ':'")
        name = _tb_name(run.name)
        if name in names:
            name = f"{_tb_name(run.parent.name)}_{name}"
        base, n = name, 1
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names[name] = run / "tb"
    return ",".join(f"{name}:{path}" for name, path in names.items())


def start_dashboard(run_dirs: list[str | Path], port: int = 6006, host: str = "127.0.0.1") -> str:
    """Start TensorBoard (in this process, on background threads) over the runs; returns its
    address. TensorBoard reloads the event files itself, so live runs update as they train."""
    from tensorboard import program

    spec = dashboard_spec(run_dirs)
    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir_spec", spec, "--host", host, "--port", str(port),
                       "--reload_interval", "5"])
    try:
        return tb.launch()
    except program.TensorBoardServerException as err:  # e.g. the port is taken
        raise ConfigError(f"dashboard error: {err.msg.strip()}") from None


def clock(seconds: float) -> str:
    """45s, 3m07s, 2h05m."""
    s = int(round(seconds))  # noqa: RUF046  (a numpy float rounds to a float)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(elapsed_s: float, done: int, remaining: int) -> str:
    """Progress text for a loop of equal-cost items: elapsed time and, from the mean so far, the
    time left (the first item's start-up cost makes the early estimates high)."""
    text = f"elapsed {clock(elapsed_s)}"
    if done > 0 and remaining > 0:
        text += f" | ETA {clock(elapsed_s / done * remaining)}"
    return text
