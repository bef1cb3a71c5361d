"""Run one OmniSafe 0.5 training and write its curve as a small CSV (``saferl benchmark reference``).

Executed as a script by the reference interpreter (``.venv-omnisafe``: Python 3.11, OmniSafe 0.5,
Safety-Gymnasium 1.0 on numpy 1.26), never imported by saferl: the standard library only at module
level. Before ``import omnisafe`` it applies the two shims saferl's own Safety-Gymnasium
interpreter uses, loaded from saferl's source files by path (``envs/np_compat.py``: the
``numpy._core`` aliases; ``envs/safety_gym.py``: ndarray dataclass defaults on Python 3.11).

    python reference_omnisafe.py --algo PPOLag --env SafetyPointGoal1-v0 --seed 0 \\
        --total-steps 600000 --steps-per-epoch 20000 --out DIR [--threads 1] [--set KEY=JSON ...]

Writes ``DIR/reference_curve.csv``: one row per OmniSafe epoch with ``env_steps``,
``episode_return``, ``episode_cost`` (OmniSafe's ``Metrics/EpRet`` / ``Metrics/EpCost``: means of
its last 50 finished episodes, as logged), ``lagrange_multiplier`` (empty for algorithms without
one) and ``episode_length``; and ``DIR/reference_done.json`` when training finished.
``--set a.b.c=VALUE`` (VALUE parsed as JSON, else a string) overrides an OmniSafe config key.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve()
# envs/ beside saferl/ in a source checkout, saferl/envs in an installed package
SAFERL_ENVS = next((p / "envs" for p in _HERE.parents[2:4] if (p / "envs" / "__init__.py").is_file()),
                   _HERE.parents[3] / "envs")
COLUMNS = {"env_steps": "TotalEnvSteps", "episode_return": "Metrics/EpRet", "episode_cost": "Metrics/EpCost",
           "lagrange_multiplier": "Metrics/LagrangeMultiplier", "episode_length": "Metrics/EpLen"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_saferl_shim_{name}", SAFERL_ENVS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_shims() -> None:
    _load("np_compat").alias_numpy2_modules()
    _load("safety_gym")._patch_dataclasses_for_ndarray_defaults()


def nested(overrides: list[str]) -> dict:
    out: dict = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a


def convert(progress: Path, dest: Path) -> int:
    """OmniSafe's progress.csv -> the curve CSV; returns the rows written."""
    with open(progress, newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(dest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(COLUMNS))
        for row in rows:
            w.writerow([row.get(src, "") for src in COLUMNS.values()])
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", required=True)
    ap.add_argument("--env", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--total-steps", type=int, required=True)
    ap.add_argument("--steps-per-epoch", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    apply_shims()
    import omnisafe  # noqa: PLC0415 — after the shims

    cfgs = {"seed": args.seed,
            "train_cfgs": {"total_steps": args.total_steps, "vector_env_nums": 1, "parallel": 1,
                           "torch_threads": args.threads, "device": "cpu"},
            "algo_cfgs": {"steps_per_epoch": args.steps_per_epoch},
            "logger_cfgs": {"log_dir": str(out / "omnisafe"), "use_wandb": False, "use_tensorboard": False}}
    merge(cfgs, nested(args.set))
    t0 = time.time()
    agent = omnisafe.Agent(args.algo, args.env, custom_cfgs=cfgs)
    agent.learn()
    progress = sorted((out / "omnisafe").rglob("progress.csv"), key=lambda p: p.stat().st_mtime)
    if not progress:
        print(f"reference error: no progress.csv under {out / 'omnisafe'}", file=sys.stderr)
        return 1
    n = convert(progress[-1], out / "reference_curve.csv")
    (out / "reference_done.json").write_text(json.dumps({
        "algo": args.algo, "env": args.env, "seed": args.seed, "total_steps": args.total_steps,
        "steps_per_epoch": args.steps_per_epoch, "set": args.set, "epochs": n, "wall_s": time.time() - t0,
        "omnisafe": getattr(omnisafe, "__version__", "?"), "progress_csv": str(progress[-1])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
