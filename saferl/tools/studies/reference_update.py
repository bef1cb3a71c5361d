"""Does saferl's update do what the reference's update functions do? One gradient step at a time.

    saferl benchmark reference --algo sac_lag --check-update --out runs/check-sac
    saferl benchmark reference --algo sac_lag --check-update --update-steps 200 --set algo_params.cost_target=sample

A side-by-side training run compares two random processes; this compares the update rules
themselves. Both sides start from the same weights (saferl's, built from the shipped config) and
take the same gradient steps on the same synthetic minibatches, with the same Gaussian draws:
``torch.distributions.Normal.rsample`` is replaced, on both sides, by loc + scale · ε with ε
taken in order from one queue of pre-drawn noise. saferl steps through its learner's ``update``;
the reference (OmniSafe 0.5, in its own interpreter: ``reference_update_omnisafe.py``) through
its algorithm's own ``_update``, with its own config for the task (``get_default_kwargs_yaml``),
so a setting that differs between the two configs shows up as a difference too.

Outputs in ``--out``: ``update_check.md`` (each network's largest parameter difference, relative
to its largest parameter, after each checkpoint step, and the verdict), ``update_check.json``.
The verdict is "same update" when no difference exceeds ``TOLERANCE`` in the first
``VERDICT_STEPS`` steps: the two codes round differently (summation order), so they agree to a
few ulps per step; over hundreds of Adam steps such differences grow (its normalisation magnifies
tiny gradients, a ReLU flips), which the table's control column measures for saferl alone: the same
run from initial weights changed by a rounding-sized ``PERTURBATION``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

DRIVER = Path(__file__).resolve().with_name("reference_update_omnisafe.py")
TOLERANCE = 1e-4
VERDICT_STEPS = 20  # the verdict reads these first steps
PERTURBATION = 1e-7  # the control's relative change of the initial weights
OBS_DIM, ACT_DIM, BATCH = 11, 3, 256  # synthetic minibatches (a Hopper-sized problem)
# saferl learner attribute -> the reference's ConstraintActorQCritic attribute, per algorithm
MODULES = {"sac_lag": {"policy": "actor", "q_r": "reward_critic", "q_c": "cost_critic",
                       "q_r_target": "target_reward_critic", "q_c_target": "target_cost_critic"}}


def checkpoints(steps: int) -> list[int]:
    return sorted({k for k in (1, 2, 5, 20, 50, 100, 200, 500, 1000) if k < steps} | {steps})


@contextlib.contextmanager
def queued_normal_noise(queue: list[torch.Tensor]):
    """``Normal.rsample`` draws ε from the front of ``queue`` (same shape as the distribution's)."""
    original = torch.distributions.Normal.rsample

    def rsample(self, sample_shape=torch.Size()):  # noqa: B008  (torch's own default)
        if not queue:
            raise RuntimeError("the noise queue is exhausted")
        eps = queue.pop(0)
        if eps.shape != self.loc.shape:
            raise RuntimeError(f"queued noise {tuple(eps.shape)} for a distribution of {tuple(self.loc.shape)}")
        return self.loc + eps * self.scale

    torch.distributions.Normal.rsample = rsample
    try:
        yield queue
    finally:
        torch.distributions.Normal.rsample = original


def synthetic_data(steps: int, gamma: float, seed: int = 0) -> dict:
    """``steps`` minibatches in saferl's replay fields (u pre-squash, discount γ(1 − done)) and
    the reference's (a = tanh u, done), and 2·steps noise draws [BATCH, ACT_DIM]."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 5.0, OBS_DIM)  # observation entries of different sizes, as a robot's
    obs = torch.randn(steps, BATCH, OBS_DIM, generator=g) * scale
    next_obs = torch.randn(steps, BATCH, OBS_DIM, generator=g) * scale
    u = torch.randn(steps, BATCH, ACT_DIM, generator=g) * 1.5
    reward = torch.rand(steps, BATCH, generator=g) * 3.0
    cost = (torch.rand(steps, BATCH, generator=g) < 0.1).float()
    done = (torch.rand(steps, BATCH, generator=g) < 0.05).float()
    return {"obs": obs, "u": u, "reward": reward, "cost": cost, "done": done, "next_obs": next_obs,
            "discount": gamma * (1.0 - done), "noise": list(torch.randn(2 * steps, BATCH, ACT_DIM, generator=g))}


def parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def perturb(learner, names: dict, size: float, seed: int = 1) -> None:
    """Every initial weight w ← w · (1 + size · ε), ε ~ N(0, 1): a rounding-sized change (the
    targets copied from their networks again, as at construction)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ours in names:
            if not ours.endswith("_target"):
                for p in getattr(learner, ours).parameters():
                    p.mul_(1 + size * torch.randn(p.shape, generator=g))
        for ours in names:
            if ours.endswith("_target"):
                getattr(learner, ours).load_state_dict(getattr(learner, ours.removesuffix("_target")).state_dict())


def box_learner(algo: str, overrides: list[str], task: str, obs_dim: int, act_dim: int):
    """saferl's learner for ``algo`` from the shipped config for ``task`` (with ``overrides``), on
    the CPU, for ``obs_dim`` observations and the action box [−1, 1]^act_dim: the networks the
    checks set against the reference's."""
    from saferl import registry
    from saferl.config import load_config
    from saferl.learners.base import EnvSpec
    from saferl.tools.studies.runner import shipped_config

    cfg = load_config(shipped_config(algo, task)[0], overrides)
    spec = EnvSpec(obs_dim=obs_dim, act_dim=act_dim, act_low=[-1.0] * act_dim, act_high=[1.0] * act_dim,
                   max_episode_steps=1000)
    return registry.get_algo(algo).load()(cfg.learner_params(), spec, cfg.limit, torch.device("cpu"), cfg.seed)


def saferl_side(algo: str, overrides: list[str], task: str, steps: int, perturbation: float = 0.0) -> tuple[dict, dict]:
    """(the data and initial weights for the reference, saferl's parameters at each checkpoint);
    ``perturbation``: the initial weights changed by that relative size first (``perturb``)."""
    learner = box_learner(algo, overrides, task, OBS_DIM, ACT_DIM)
    data = synthetic_data(steps, learner.p.gamma)
    names = MODULES[algo]
    if perturbation:
        perturb(learner, names, perturbation)
    init = {ref: parameters(getattr(learner, ours)) for ours, ref in names.items()}
    fields = {"obs": "obs", "act": "u", "reward": "reward", "cost": "cost", "discount": "discount",
              "next_obs": "next_obs"}
    snapshots, done = {}, 0
    with queued_normal_noise(list(data["noise"])) as queue:
        for k in checkpoints(steps):
            block = {f: data[src][done:k].numpy() for f, src in fields.items()}
            learner.update([block])
            done = k
            snapshots[k] = {ref: parameters(getattr(learner, ours)) for ours, ref in names.items()}
        used = len(data["noise"]) - len(queue)
    reference_input = {"init": init, "checkpoints": checkpoints(steps), "noise": data["noise"],
                       **{k: data[k] for k in ("obs", "u", "reward", "cost", "done", "next_obs")}}
    return reference_input, {"snapshots": snapshots, "noise_used": used}


def relative_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """max |ours − theirs| over a network's parameters, over max |ours|."""
    if [t.shape for t in ours] != [t.shape for t in theirs]:
        raise ValueError("the two networks' parameters differ in shape")
    top = max(float(t.abs().max()) for t in ours)
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) / max(top, 1e-12)


def differences(a: dict, b: dict) -> dict:
    """{step: {network: relative difference}} between two sides' snapshots."""
    return {k: {name: relative_difference(a["snapshots"][k][name], b["snapshots"][k][name])
                for name in a["snapshots"][k]} for k in a["snapshots"]}


def compare(ours: dict, theirs: dict, control: dict) -> dict:
    """saferl against the reference, saferl against itself from rounding-perturbed weights
    (``control``), and the verdict: the same update when, up to ``VERDICT_STEPS`` steps (before
    rounding differences have grown), no network differs by more than ``TOLERANCE`` and both
    sides used the same number of Gaussian draws."""
    table = differences(ours, theirs)
    early = max(v for k, row in table.items() if k <= VERDICT_STEPS for v in row.values())
    return {"differences": table,
            "control": {k: max(row.values()) for k, row in differences(ours, control).items()},
            "worst_early": early, "noise_used": [ours["noise_used"], theirs["noise_used"]],
            "same_update": bool(early <= TOLERANCE and ours["noise_used"] == theirs["noise_used"])}


def report(s: dict, result: dict) -> str:
    names = list(next(iter(result["differences"].values())))
    lines = [f"# {s['algo']}'s update against OmniSafe 0.5's {s['reference_algo']} (`--check-update`)", "",
             f"saferl: `{s['config']}`{' with ' + ', '.join(s['set']) if s['set'] else ''}; OmniSafe: its own "
             f"config for {s['task']}. Both sides start from the same weights and take the same gradient steps "
             f"on the same synthetic minibatches ({BATCH} × {OBS_DIM} observations, {ACT_DIM} actions), with the "
             "same Gaussian draws. Each cell: the network's largest parameter difference over its largest "
             f"parameter. Last column: saferl against itself with every initial weight changed by "
             f"{PERTURBATION:.0e} of itself (a rounding-sized change), the largest over the networks: how far "
             "rounding alone drifts apart after that many steps.", "",
             "| gradient steps | " + " | ".join(names) + " | saferl vs saferl, perturbed |",
             "|---|" + "---|" * (len(names) + 1)]
    for k, row in result["differences"].items():
        lines.append(f"| {k} | " + " | ".join(f"{row[n]:.1e}" for n in names) + f" | {result['control'][k]:.1e} |")
    used = result["noise_used"]
    verdict = ("**same update**: no difference exceeds" if result["same_update"]
               else "**the updates differ**: a difference exceeds")
    lines += ["", f"Gaussian draws used: saferl {used[0]}, OmniSafe {used[1]}.", "",
              f"{verdict} {TOLERANCE:.0e} in the first {VERDICT_STEPS} steps (the two codes round differently: "
              "they sum in different orders; over hundreds of Adam steps such differences grow, as the last "
              "column shows for saferl alone)."]
    return "\n".join(lines) + "\n"


def run(args, console, out: Path, find_python) -> Path:
    """The check; ``find_python()`` gives the reference interpreter (asked after the arguments
    are checked, so a bad argument is reported as such, not as a missing interpreter)."""
    from saferl.config import ConfigError
    from saferl.tools.studies.reference import REFERENCE_ALGOS, reference_sets, run_script
    from saferl.tools.studies.runner import shipped_config

    if args.algo not in MODULES:
        raise ConfigError(f"usage error: --check-update compares {', '.join(MODULES)} (not {args.algo})")
    if args.update_steps <= 0:
        raise ConfigError(f"usage error: --update-steps must be > 0 (got {args.update_steps})")
    python = find_python()
    out.mkdir(parents=True, exist_ok=True)
    reference_input, ours = saferl_side(args.algo, list(args.set), args.task, args.update_steps)
    _, control = saferl_side(args.algo, list(args.set), args.task, args.update_steps, PERTURBATION)
    torch.save(reference_input, out / "update_input.pt")
    from saferl.config import CONFIG_DIR, load_config

    source, path = shipped_config(args.algo, args.task)
    s = {"algo": args.algo, "reference_algo": REFERENCE_ALGOS[args.algo], "task": args.task,
         "config": str(path.relative_to(CONFIG_DIR.parent)), "set": list(args.set), "steps": args.update_steps}
    limit = load_config(source).limit
    argv = [python, str(DRIVER), "--algo", s["reference_algo"], "--env", args.task,
            "--input", str(out / "update_input.pt"), "--out", str(out / "update_reference.pt")]
    for item in reference_sets({"algo": args.algo, "cost_limit": limit, "reference_set": args.reference_set}):
        argv += ["--set", item]
    console.print("reference: " + " ".join(argv[1:]))
    run_script(argv, out, "reference")
    theirs = torch.load(out / "update_reference.pt")
    result = compare(ours, theirs, control)
    (out / "update_check.json").write_text(json.dumps({**s, **result}, indent=1,
                                                       default=lambda x: float(np.asarray(x))))
    (out / "update_check.md").write_text(report(s, result))
    console.print((out / "update_check.md").read_text(), markup=False)
    return out
