"""Where a run directory keeps its checkpoints: RUN_DIR/checkpoints/ckpt_<iteration>.pt. The one
place the file names are known; the run directory's other parts are ``saferl.cluster.rundir``'s.
Here, below every layer, so a learner that loads another run's policy (sTRPO's π_unsafe) need
not import the runtime."""
from __future__ import annotations

import re
from pathlib import Path

CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")


def checkpoint_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt_{iteration:07d}.pt"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("ckpt_*.pt")
             if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]
