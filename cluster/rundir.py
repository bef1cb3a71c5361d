"""The run directory: resolved config, metrics, checkpoints.

    runs/<name>/config.yaml          the validated config the run uses (resume reads it back)
    runs/<name>/metrics.csv          one row per logged iteration (also metrics.jsonl)
    runs/<name>/tb/                  TensorBoard event files
    runs/<name>/wandb/               Weights & Biases files (offline unless configured online)
    runs/<name>/checkpoints/ckpt_<iteration>.pt   atomic; the last ``keep`` are kept
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from saferl.checkpoint_files import checkpoint_path, checkpoints
from saferl.config import ConfigError, RunConfig, load_config


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{cfg.algo}-{cfg.task}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(cfg.run_root).expanduser()
    path = root / name
    suffix = 1
    while path.exists():
        path = root / f"{name}-{suffix}"
        suffix += 1
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.yaml").write_text(cfg.to_yaml())
    return path


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"run error: {run_dir} is not a run directory (no config.yaml)")
    return load_config(cfg_path, overrides)


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary name, fsync, rename: a crash never leaves a half-written file
    under the final name."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(run_dir: Path, iteration: int, payload: dict, keep: int) -> Path:
    path = checkpoint_path(run_dir, iteration)
    atomic_save(payload, path)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: Path, cfg: RunConfig) -> dict | None:
    """The newest checkpoint, refused with a clear message if it belongs to another algorithm
    or task."""
    found = checkpoints(run_dir)
    if not found:
        return None
    try:
        ckpt = torch.load(found[-1], map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — any unreadable file is reported the same way
        raise ConfigError(f"checkpoint error: {found[-1]} cannot be read ({err.__class__.__name__})") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint error: {found[-1]} is not a saferl checkpoint")
    for key in ("algo", "task"):
        if ckpt.get(key) != getattr(cfg, key):
            raise ConfigError(f"checkpoint error: {found[-1]} is for {key} {ckpt.get(key)!r}, "
                              f"the config says {getattr(cfg, key)!r}")
    ckpt["path"] = str(found[-1])  # for state_error
    return ckpt


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def state_error(path: str | Path, err: BaseException) -> ConfigError:
    """A checkpoint whose tensors do not fit the run's modules (``load_state_dict`` failed, e.g.
    other network sizes or task shapes), as one line naming the file and the first mismatching
    tensor. ``err`` may be a Ray task error wrapping the learner actor's."""
    while getattr(err, "cause", None) is not None:  # ray.exceptions.RayTaskError
        err = err.cause
    text = str(err)
    if m := _SIZE_MISMATCH.search(text):
        detail = f"tensor {m[1]} has shape [{m[2]}] there, [{m[3]}] in this run's model"
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = f"{err.__class__.__name__}: " + (lines[1] if len(lines) > 1 else lines[0] if lines else "")
    return ConfigError(f"checkpoint error: {path} does not fit this run: {detail}")
