"""Do saferl's env hosts and replay collect what the reference's adapter and buffer collect?

    saferl benchmark reference --algo sac_lag --task SafetyHopperVelocity-v1 --check-data --out runs/data-sac
    saferl benchmark reference --algo sac_lag --check-data --data-steps 50000
    saferl benchmark reference --algo sac_lag --check-data --policy-from runs/sac_lag-SafetyHopperVelocity-v1-...

``--check-update`` compares the update rules; this compares the data they learn from. No training:
each side collects ``--data-steps`` env steps per phase with the same fixed policies, through the
code a training run uses, and the two samples are tested for being one distribution.

* ``uniform``: the off-policy warm-up's uniform actions.
* ``policy``: the reference's actor at its own initialisation (seeded), or with ``--policy-from
  RUN_DIR`` the actor of a saferl run's newest checkpoint (the state region a trained policy
  visits), sampled; saferl's side gets the same weights through its learner's network and
  ``export_numpy``, so it acts through the env host's numpy inference, as in training.

The reference (OmniSafe 0.5, ``reference_data_omnisafe.py`` in its own interpreter) steps its
``OffPolicyAdapter.rollout`` into its ``VectorOffPolicyBuffer`` with its own config for the task;
saferl (``reference_data_host.py`` in the Safety-Gymnasium interpreter) steps ``EnvHost.rollout``
into ``ReplayBuffer.add`` with the shipped config's replay settings. Tests per phase (two-sample
Kolmogorov-Smirnov): episode return, length and cost; each observation entry at an episode's
start (the reset distribution) and averaged over an episode. Per-step quantities are shown, not
tested (successive steps are not independent). The verdict is "same distribution" when no
p-value, times the number of tests (Bonferroni), is below ``ALPHA``.

Outputs in ``--out``: ``data_check.md`` (the tables and the verdict), ``data_check.json``,
``reference/`` and ``saferl/`` (each side's ``<phase>.npz``; ``reference/actor.npz``).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from saferl.tools.studies.reference_update import MODULES, box_learner

PHASES = ("uniform", "policy")
# what each side writes per phase: the stored transitions (actions as the env got them, done = the
# bootstrap is cut), then the finished episodes' statistics
FIELDS = ("obs", "act", "reward", "cost", "done", "next_obs", "ep_return", "ep_cost", "ep_length")
ALPHA = 0.01
DRIVER = Path(__file__).resolve().with_name("reference_data_omnisafe.py")
HOST_MODULE = "saferl.tools.studies.reference_data_host"


def actor_attribute(algo: str) -> str:
    """The saferl learner's attribute that holds the network the reference calls its actor."""
    return next(ours for ours, ref in MODULES[algo].items() if ref == "actor")


def saferl_policy(algo: str, overrides: list[str], task: str, weights: list[np.ndarray]) -> dict:
    """The reference's actor weights through saferl's learner for ``algo`` (its shipped config
    with ``overrides``): the env host's policy and the replay's settings."""
    import torch

    from saferl.config import ConfigError

    act_dim = weights[-1].shape[0] // 2  # the actor's outputs: mean and log σ of each action
    learner = box_learner(algo, overrides, task, weights[0].shape[1], act_dim)
    net = getattr(learner, actor_attribute(algo))  # the network policy_state exports
    if [tuple(p.shape) for p in net.parameters()] != [w.shape for w in weights]:
        raise ConfigError(f"check error: the reference's actor has other shapes than {algo}'s config builds")
    with torch.no_grad():
        for p, w in zip(net.parameters(), weights):
            p.copy_(torch.as_tensor(w))
    o = learner.offpolicy_setup()
    return {"policy": learner.policy_state(), "act_dim": act_dim,
            **{k: o[k] for k in ("n_step", "gamma", "cost_normalize")}}


def checkpoint_actor(run: Path, algo: str, task: str) -> tuple[list[np.ndarray], str]:
    """The actor weights of a saferl run's newest checkpoint (a run of the check's algorithm and
    task), in the reference actor's parameter order, and what they are, for the report."""
    from saferl.cluster import rundir
    from saferl.config import ConfigError

    cfg = rundir.load_run_config(run)  # a one-line error where run is not a run directory
    if (cfg.algo, cfg.task) != (algo, task):
        raise ConfigError(f"usage error: --policy-from {run}: a {cfg.algo} run on {cfg.task}, not {algo} on {task}")
    ckpt = rundir.load_checkpoint(run, cfg)
    if ckpt is None:
        raise ConfigError(f"usage error: --policy-from {run}: no checkpoint")
    weights = [t.detach().cpu().numpy() for t in ckpt["learner"][actor_attribute(algo)].values()]
    return weights, f"the actor of `{run.name}`'s checkpoint at {ckpt['schedule']['env_steps']:,} env steps"


def episode_bounds(d: dict) -> list[tuple[int, int]]:
    """(start, end) of the stored episodes: one ends where the bootstrap is cut or where the
    stored next observation is not the following step's observation (a time limit)."""
    obs, nxt = d["obs"], d["next_obs"]
    ends = d["done"][:-1] > 0
    ends |= ~np.isclose(nxt[:-1], obs[1:]).all(axis=1)
    cut = np.flatnonzero(ends) + 1
    starts, stops = np.r_[0, cut], np.r_[cut, len(obs)]
    return list(zip(starts.tolist(), stops.tolist()))


def _ks(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(x, y).pvalue) if len(x) and len(y) else 0.0


def _per_entry(x: np.ndarray, y: np.ndarray) -> float:
    """The smallest KS p-value over the observation entries, times their number."""
    return min(1.0, x.shape[1] * min(_ks(x[:, i], y[:, i]) for i in range(x.shape[1])))


def _mean_se(x: np.ndarray) -> str:
    return f"{x.mean():.3f} ± {x.std(ddof=1) / np.sqrt(len(x)):.3f}" if len(x) > 1 else "–"


def terminal_gap(d: dict) -> float:
    """Median over the bootstrap-cut transitions of max |stored next observation − the following
    step's observation|: near 0 where the env stack resets before the transition is stored (the
    next episode's first observation stands in for the last one; the cut bootstrap never reads it)."""
    done = np.flatnonzero(d["done"][:-1] > 0)
    if not len(done):
        return float("nan")
    return float(np.median(np.abs(d["next_obs"][done] - d["obs"][done + 1]).max(axis=1)))


def compare_phase(ours: dict, theirs: dict) -> dict:
    """Rows (quantity, reference, saferl, p or None) and the tests' p-values for one phase."""
    rows, tests = [], {}
    for key, name in (("ep_return", "episode return"), ("ep_length", "episode length"), ("ep_cost", "episode cost")):
        tests[name] = _ks(theirs[key], ours[key])
        rows.append((name, _mean_se(theirs[key]), _mean_se(ours[key]), tests[name]))
    first, mean = {}, {}
    for side, d in (("reference", theirs), ("saferl", ours)):
        bounds = episode_bounds(d)
        first[side] = d["obs"][[s for s, _ in bounds]]
        mean[side] = np.stack([d["obs"][s:e].mean(0) for s, e in bounds])
    for name, x in (("observation at an episode's start", first), ("observation averaged over an episode", mean)):
        tests[name] = _per_entry(x["reference"], x["saferl"])
        rows.append((name + " (each entry; min p × entries)", f"{len(x['reference'])} episodes",
                     f"{len(x['saferl'])} episodes", tests[name]))
    for key, name in (("reward", "reward per step"), ("cost", "cost per step, as stored"),
                      ("done", "bootstrap cut (done) per step")):
        rows.append((name, f"{theirs[key].mean():.4f}", f"{ours[key].mean():.4f}", None))
    rows.append(("episodes finished", str(len(theirs["ep_return"])), str(len(ours["ep_return"])), None))
    rows.append(("done transitions: stored next observation against the next episode's first (median largest gap)",
                 f"{terminal_gap(theirs):.3g}", f"{terminal_gap(ours):.3g}", None))
    return {"rows": rows, "tests": tests}


def compare(ours: dict[str, dict], theirs: dict[str, dict]) -> dict:
    phases = {p: compare_phase(ours[p], theirs[p]) for p in PHASES}
    n = sum(len(v["tests"]) for v in phases.values())
    worst = min(p for v in phases.values() for p in v["tests"].values())
    return {"phases": phases, "tests": n, "worst_p": worst, "same_distribution": bool(worst * n >= ALPHA)}


def report(s: dict, result: dict) -> str:
    lines = [f"# What {s['algo']} learns from against OmniSafe 0.5's {s['reference_algo']} (`--check-data`)", "",
             f"{s['task']}, {s['steps']:,} env steps per phase and side, one env, seed {s['seed']}. "
             f"saferl: `EnvHost.rollout` into `ReplayBuffer.add` with `{s['config']}`'s replay settings; "
             "OmniSafe: `OffPolicyAdapter.rollout` into `VectorOffPolicyBuffer` with its own config for the task. "
             f"`uniform`: the warm-up's uniform actions; `policy`: {s['policy']}, sampled, the same weights on "
             "both sides. p: two-sample Kolmogorov-Smirnov.", ""]
    for phase, v in result["phases"].items():
        lines += [f"## {phase}", "", "| quantity | OmniSafe | saferl | p |", "|---|---|---|---|"]
        lines += [f"| {name} | {a} | {b} | {'' if p is None else f'{p:.3f}'} |" for name, a, b, p in v["rows"]]
        lines.append("")
    verdict = ("**same distribution**: no" if result["same_distribution"] else "**the data differ**: a")
    lines.append(f"{verdict} p-value times the number of tests ({result['tests']}) is below {ALPHA} "
                 f"(smallest p {result['worst_p']:.4f}).")
    return "\n".join(lines) + "\n"


def load_side(folder: Path) -> dict[str, dict]:
    from saferl.config import ConfigError

    out = {}
    for phase in PHASES:
        path = folder / f"{phase}.npz"
        with np.load(path) as z:
            missing = [f for f in FIELDS if f not in z.files]
            if missing:
                raise ConfigError(f"check error: {path} lacks {', '.join(missing)}")
            out[phase] = {f: z[f] for f in FIELDS}
    return out


def run(args, console, out: Path, find_python) -> Path:
    """The check; ``find_python()`` gives the reference interpreter (asked after the arguments
    are checked)."""
    from saferl.cluster.placement import sg_python
    from saferl.config import CONFIG_DIR, REPO_ROOT, ConfigError, load_config
    from saferl.tools.studies.reference import REFERENCE_ALGOS, reference_sets, run_script
    from saferl.tools.studies.runner import shipped_config

    if args.algo not in MODULES:
        raise ConfigError(f"usage error: --check-data compares {', '.join(MODULES)} (not {args.algo})")
    if args.data_steps <= 0:
        raise ConfigError(f"usage error: --data-steps must be > 0 (got {args.data_steps})")
    python = find_python()
    source, path = shipped_config(args.algo, args.task)
    cfg = load_config(source, list(args.set))
    s = {"algo": args.algo, "reference_algo": REFERENCE_ALGOS[args.algo], "task": args.task, "seed": args.seed,
         "steps": args.data_steps, "config": str(path.relative_to(CONFIG_DIR.parent)), "set": list(args.set),
         "policy": "OmniSafe's actor at its seeded initialisation"}
    ref_dir, our_dir = out / "reference", out / "saferl"
    for d in (ref_dir, our_dir):
        d.mkdir(parents=True, exist_ok=True)
    argv = [python, str(DRIVER), "--algo", s["reference_algo"], "--env", args.task, "--steps", str(args.data_steps),
            "--seed", str(args.seed), "--out", str(ref_dir)]
    if args.policy_from:
        weights, s["policy"] = checkpoint_actor(Path(args.policy_from), args.algo, args.task)
        np.savez(our_dir / "actor.npz", *weights)
        argv += ["--actor", str(our_dir / "actor.npz")]
    for item in reference_sets({"algo": args.algo, "cost_limit": cfg.limit, "reference_set": args.reference_set}):
        argv += ["--set", item]
    console.print("reference: " + " ".join(argv[1:]))
    run_script(argv, out, "reference")
    with np.load(ref_dir / "actor.npz") as z:
        weights = [z[f"arr_{i}"] for i in range(len(z.files))]
    given = saferl_policy(args.algo, list(args.set), args.task, weights)
    with open(our_dir / "policy.pkl", "wb") as fh:
        pickle.dump(given, fh)
    argv = [sg_python(cfg), "-m", HOST_MODULE, "--task", args.task, "--policy", str(our_dir / "policy.pkl"),
            "--steps", str(args.data_steps), "--seed", str(args.seed), "--out", str(our_dir)]
    console.print("saferl: " + " ".join(argv[1:]))
    run_script(argv, REPO_ROOT, "saferl")
    result = compare(load_side(our_dir), load_side(ref_dir))
    (out / "data_check.json").write_text(json.dumps({**s, **result}, indent=1))
    (out / "data_check.md").write_text(report(s, result))
    console.print((out / "data_check.md").read_text(), markup=False)
    return out
