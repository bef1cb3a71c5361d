"""The reference side of ``saferl benchmark reference --check-update`` (``reference_update.py``).

Executed as a script by the reference interpreter (``.venv-omnisafe``), never imported by saferl:
loads saferl's initial weights, minibatches and noise queue (``--input``), builds OmniSafe 0.5's
networks from its own config for the task, and steps its algorithm's own ``_update`` (one
minibatch per call, as its training loop does), saving the parameters at each checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_omnisafe import apply_shims, nested  # scripts beside it
from reference_update import queued_normal_noise


class _Log:
    """The logger calls ``_update`` makes: nothing is logged; no episode cost yet."""

    def store(self, *args, **kwargs) -> None:
        pass

    def get_stats(self, key: str, min_and_max: bool = False):
        return (0.0,)


class _Buffer:
    def __init__(self, batches: list[dict]):
        self.batches = iter(batches)

    def sample_batch(self) -> dict:
        return next(self.batches)


def build(algo: str, env: str, overrides: list[str], init: dict, obs_dim: int, act_dim: int):
    """OmniSafe's algorithm object with only what ``_update`` reads, its networks holding ``init``."""
    import numpy as np
    import torch
    from gymnasium.spaces import Box
    from omnisafe.algorithms import registry
    from omnisafe.common.lagrange import Lagrange
    from omnisafe.models.actor_critic.constraint_actor_q_critic import ConstraintActorQCritic
    from omnisafe.utils.config import get_default_kwargs_yaml

    cfgs = get_default_kwargs_yaml(algo, env, "off-policy")
    cfgs.recurisve_update(nested(overrides))  # OmniSafe spells it so
    cls = registry.get(algo)
    ac = ConstraintActorQCritic(Box(-np.inf, np.inf, (obs_dim,)), Box(-1.0, 1.0, (act_dim,)), cfgs.model_cfgs, 1)
    with torch.no_grad():
        for name, values in init.items():
            params = list(getattr(ac, name).parameters())
            if [p.shape for p in params] != [v.shape for v in values]:
                raise ValueError(f"{name}: saferl's network has other shapes than OmniSafe's config builds")
            for p, v in zip(params, values):
                p.copy_(v)
    algo_obj = object.__new__(cls)
    algo_obj._cfgs, algo_obj._actor_critic, algo_obj._logger = cfgs, ac, _Log()
    algo_obj._device, algo_obj._epoch, algo_obj._update_count = torch.device("cpu"), 0, 0
    algo_obj._lagrange = Lagrange(**cfgs.lagrange_cfgs)
    if not cfgs.algo_cfgs.auto_alpha:
        algo_obj._log_alpha = torch.log(torch.tensor(cfgs.algo_cfgs.alpha))
    else:
        raise ValueError("auto_alpha: the check covers OmniSafe's fixed-α configs")
    return algo_obj, ac


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", required=True)
    ap.add_argument("--env", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    apply_shims()
    import torch

    d = torch.load(args.input)
    steps = d["obs"].shape[0]
    algo, ac = build(args.algo, args.env, args.set, d["init"], d["obs"].shape[-1], d["u"].shape[-1])
    batches = [{"obs": d["obs"][i], "act": torch.tanh(d["u"][i]), "reward": d["reward"][i], "cost": d["cost"][i],
                "done": d["done"][i], "next_obs": d["next_obs"][i]} for i in range(steps)]
    algo._buf = _Buffer(batches)
    snapshots, done = {}, 0
    with queued_normal_noise(list(d["noise"])) as queue:
        for k in d["checkpoints"]:
            for _ in range(k - done):
                algo._update()
            done = k
            snapshots[k] = {name: [p.detach().clone() for p in getattr(ac, name).parameters()] for name in d["init"]}
    torch.save({"snapshots": snapshots, "noise_used": len(d["noise"]) - len(queue)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
