"""The reference side of ``saferl benchmark reference --check-data`` (``reference_data.py``).

Executed as a script by the reference interpreter (``.venv-omnisafe``), never imported by saferl:
builds OmniSafe 0.5's ``OffPolicyAdapter`` (its env and wrapper stack) and ``VectorOffPolicyBuffer``
from its own config for the task, and its actor with its own initialisation (``torch.manual_seed``)
or the given weights (``--actor``), then collects each phase's steps through the adapter's own
``rollout``: ``uniform`` (its warm-up actions) and ``policy`` (that actor, sampled), each from fresh
episodes. Writes ``actor.npz`` (the actor's parameters, in order, for saferl's side) and
``<phase>.npz`` (the buffer's transitions and the finished episodes' statistics, in
``reference_data.FIELDS``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_omnisafe import apply_shims, nested  # scripts beside it


class _Episodes:
    """The logger ``rollout`` reports finished episodes to."""

    def __init__(self):
        self.rows: list[dict] = []

    def store(self, data: dict | None = None, **kwargs) -> None:
        data = {**(data or {}), **kwargs}
        if "Metrics/EpRet" in data:
            self.rows.append({k: float(data[f"Metrics/{k}"]) for k in ("EpRet", "EpCost", "EpLen")})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", required=True)
    ap.add_argument("--env", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--actor", default=None, help="npz of the actor's parameters, in order (default: its own init)")
    args = ap.parse_args(argv)
    apply_shims()
    import numpy as np
    import torch
    from omnisafe.adapter.offpolicy_adapter import OffPolicyAdapter
    from omnisafe.common.buffer.vector_offpolicy_buffer import VectorOffPolicyBuffer
    from omnisafe.models.actor_critic.constraint_actor_q_critic import ConstraintActorQCritic
    from omnisafe.utils.config import get_default_kwargs_yaml

    torch.set_num_threads(1)
    cfgs = get_default_kwargs_yaml(args.algo, args.env, "off-policy")
    cfgs.recurisve_update(nested(args.set))  # OmniSafe spells it so
    cfgs.train_cfgs.device = "cpu"
    torch.manual_seed(args.seed)
    out = Path(args.out)
    actor = None
    for i, phase in enumerate(("uniform", "policy")):
        adapter = OffPolicyAdapter(args.env, 1, args.seed + i, cfgs)
        if actor is None:
            actor = ConstraintActorQCritic(adapter.observation_space, adapter.action_space, cfgs.model_cfgs, 1)
            if args.actor:
                with np.load(args.actor) as z, torch.no_grad():
                    given = [z[f"arr_{k}"] for k in range(len(z.files))]
                    params = list(actor.actor.parameters())
                    if [p.shape for p in params] != [torch.Size(w.shape) for w in given]:
                        raise SystemExit("reference error: the given actor's shapes are not OmniSafe's config's")
                    for p, w in zip(params, given):
                        p.copy_(torch.as_tensor(w))
            np.savez(out / "actor.npz", *[p.detach().numpy() for p in actor.actor.parameters()])
        buffer = VectorOffPolicyBuffer(adapter.observation_space, adapter.action_space, args.steps, 1, 1)
        episodes = _Episodes()
        with torch.no_grad():
            adapter.rollout(args.steps, actor, buffer, episodes, use_rand_action=phase == "uniform")
        data = {k: v[:args.steps, 0].numpy() for k, v in buffer.data.items()}
        np.savez(out / f"{phase}.npz", **data,
                 **{f"ep_{k}": np.array([r[src] for r in episodes.rows])
                    for k, src in (("return", "EpRet"), ("cost", "EpCost"), ("length", "EpLen"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
