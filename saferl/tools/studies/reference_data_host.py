"""saferl's side of ``saferl benchmark reference --check-data`` (``reference_data.py``).

Run as ``python -m saferl.tools.studies.reference_data_host`` by the Safety-Gymnasium interpreter
(numpy only, no torch): the env host and replay buffer a training run uses (``EnvHost.rollout``,
``ReplayBuffer.add``) collect each phase's steps with a fixed policy, and the transitions the
replay would hand the learner are written in the fields both sides share (``reference_data.FIELDS``).
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

from saferl.actors.env_host import EnvHost
from saferl.actors.replay import ReplayBuffer


def collect(task: str, policy: dict, steps: int, seed: int, replay: dict) -> dict:
    """One env, ``steps`` steps from fresh episodes: the finished episodes' statistics and the
    stored transitions (actions as the env got them, ``done`` = the bootstrap is cut)."""
    host = EnvHost(task, 1, seed)
    batch, summary = host.rollout(policy, steps)
    host.close()
    buffer = ReplayBuffer(steps, replay["n_step"], replay["gamma"], seed, replay["cost_normalize"])
    buffer.add(batch)
    d = {k: v[:buffer.size] for k, v in buffer.data.items()}
    episodes = summary["episodes"]
    return {"obs": d["obs"], "act": np.tanh(d["act"]), "reward": d["reward"], "cost": d["cost"],
            "done": (d["discount"] == 0).astype(np.float32), "next_obs": d["next_obs"],
            "ep_return": np.array([e["return"] for e in episodes]), "ep_cost": np.array([e["cost"] for e in episodes]),
            "ep_length": np.array([e["length"] for e in episodes])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--policy", required=True,
                    help="pickle: the NumpyPolicy (policy), act_dim and the replay's n_step, gamma, cost_normalize")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with open(args.policy, "rb") as fh:
        given = pickle.load(fh)
    phases = {"uniform": {"uniform": True, "act_dim": given["act_dim"]}, "policy": given["policy"]}
    out = Path(args.out)
    for i, (phase, policy) in enumerate(phases.items()):
        data = collect(args.task, policy, args.steps, args.seed + i, given)
        np.savez(out / f"{phase}.npz", **data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
