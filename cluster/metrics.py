"""Metric sinks: CSV + JSONL and TensorBoard in the run directory, Weights & Biases (offline
unless the user opts in)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from saferl.config import RunConfig


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
