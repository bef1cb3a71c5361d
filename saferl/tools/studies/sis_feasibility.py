"""FAC-SIS paper ("Joint Synthesis of Safety Certificate and Safe Control Policy"), Appendix
E.2-E.3: the exhaustive feasibility check of safety indexes on the custom point/hazard task
(Table 3), its sensitivity to the actuator constants the paper does not give, and the learned
(σ, k, n) trajectory (Fig. 8).

    saferl study sis-feasibility                          φ0, φ_h, φ_F on distribution 1
    saferl study sis-feasibility --run RUNS/fac_sis-…     + the run's initial φ_i and learned φ_SIS

"We discretize the state and action space with small intervals, and we exhaust all the actions to
see if the energy can dissipate for each state. If not, we remark the specific state as
infeasible." Here, for each index, ``--trajectories`` episodes (paper: 100) start from the task's
initial distribution (``--distribution`` 1-3, Table 1). At every step every action of a
``--grid`` × ``--grid`` discretisation of the action box is simulated one step, and the safe
actions are those with φ(s') ≤ max(φ(s) − η_D, 0) (eq 1); the robot takes the safe action
nearest to a goal-tracking controller's (heading and speed P-control). A state with no safe
action is infeasible. A trajectory succeeds when it neither enters the hazard (a φ0 violation)
nor meets an infeasible state (Table 3's definition).

**Sensitivity.** The paper gives neither the acceleration nor the speed bound of its robot, and
they decide the table (how hard the robot can brake decides which states can still dissipate φ).
The main table uses the task's constants (``--acc-max``/``--v-max``/``--omega-max``, default:
``envs/point_hazard.py``'s ``DEFAULT_CONSTANTS``); the sensitivity table repeats φ0, φ_h and φ_F
over the grid ``--sens-acc-max`` × ``--sens-v-max`` (``--sens-acc-max ""`` skips it). Outputs in
``--out``:

    sis_feasibility.md / .csv   per index: σ, k, n, success rate, φ0 violation rate, infeasible
                                rate, average tracking error (mean per-step −reward); the
                                sensitivity table and why the defaults are what they are
    sensitivity.csv             per (acc_max, v_max, index): the same rates
    trajectories.png            the paths per index, hazard drawn, infeasible states marked
    index_trajectory.png        with --run: σ, k, n against env steps (Fig. 8)
    study.json                  the settings
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from saferl.tools.studies.runner import add_out_argument, save_figure, study_console_and_out, write_csv

HELP = "FAC-SIS App. E.2-E.3: exhaustive feasibility of safety indexes (Table 3) and the learned index (Fig. 8)"
COLUMNS = ["index", "sigma", "k", "n", "eta_d", "trajectories", "success_rate", "phi0_violation_rate",
           "infeasible_rate", "tracking_error"]
SENS_COLUMNS = ["acc_max", "v_max", "omega_max", "index", "success_rate", "phi0_violation_rate", "infeasible_rate"]
PAPER_TABLE3 = {"φ0": 0.0, "φ_h": 0.70, "φ_F": 1.0}  # success rates in the paper's Table 3
DEFAULTS_NOTE = (
    "The paper gives neither the acceleration bound nor the speed bound of its point robot. Its "
    "stated setting is that φ_F is a valid index (from Zhao et al. 2021's synthesis rules: 100% "
    "feasible) while the handcrafted φ_h is not (Table 3: 70% success, 30% infeasible; Fig. 6: "
    "φ_h's zero-sublevel set holds inevitably unsafe states). The defaults are the setting of the grid "
    "that keeps φ_F at 100% with φ_h's success nearest 70%, at the reference implementation's speed bound "
    "2 (a lower speed bound cannot track the reward's target speed, distance / 5 s, from the start).")
PRESET_LABELS = {"zero": "φ0", "handcrafted": "φ_h", "feasible": "φ_F"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="a fac_sis run: adds its initial (φ_i) and learned (φ_SIS) index and plots Fig. 8")
    p.add_argument("--distribution", type=int, default=1, choices=(1, 2, 3), help="Table 1's initial distribution")
    p.add_argument("--trajectories", type=int, default=100, help="episodes per index (paper: 100)")
    p.add_argument("--grid", type=int, default=21, help="actions per dimension of the exhaustive check (default 21)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--acc-max", type=float, default=None, help="acceleration bound (default: the task's)")
    p.add_argument("--v-max", type=float, default=None, help="speed bound (default: the task's)")
    p.add_argument("--omega-max", type=float, default=None, help="turn-rate bound (default: the task's)")
    p.add_argument("--sens-acc-max", default="2,2.25,2.5,4", help="sensitivity grid: acceleration bounds "
                   "(comma-separated; empty: no sensitivity table)")
    p.add_argument("--sens-v-max", default="1,2", help="sensitivity grid: speed bounds (comma-separated)")
    add_out_argument(p, "sis-feasibility", note=None)


def nominal_action(obs, env):
    """Heading and speed P-control towards the goal (the task's tracking reward's targets)."""
    import torch

    heading = torch.atan2(obs[:, 3], obs[:, 2])
    err = torch.remainder(heading - torch.atan2(obs[:, 8], obs[:, 7]) + math.pi, 2 * math.pi) - math.pi
    v_target = torch.hypot(obs[:, 7], obs[:, 8]) / env.reach_time
    return torch.stack([(-5 * err).clamp(-1, 1), (5 * (v_target - obs[:, 4])).clamp(-1, 1)], -1)


def safe_action_mask(env, index, state, grid):
    """[N, G] mask of the grid actions whose next state satisfies φ(s') ≤ max(φ(s) − η_D, 0)."""
    n, g = state.shape[0], grid.shape[0]
    rep = state.repeat_interleave(g, 0)
    nxt, _, _ = env.step(rep, grid.repeat(n, 1))
    delta = index.delta(env.observe(rep), env.observe(nxt))
    return (delta <= 0).reshape(n, g)


def check(index, distribution: int, trajectories: int, grid_n: int, seed: int, constants: dict | None = None) -> dict:
    """Roll ``trajectories`` safety-filtered episodes; their outcomes and paths (module docstring).
    ``constants``: the env's acc_max / v_max / omega_max (default: the task's)."""
    import torch

    from saferl.envs.point_hazard import HAZARD_RADIUS, PointHazardEnv

    env = PointHazardEnv(distribution, **(constants or {}))
    axis = torch.linspace(-1, 1, grid_n)
    grid = torch.cartesian_prod(axis, axis)
    state = env.initial_state(trajectories, torch.Generator().manual_seed(seed))
    violated = torch.zeros(trajectories, dtype=torch.bool)
    infeasible = torch.zeros(trajectories, dtype=torch.bool)
    error = torch.zeros(trajectories)
    paths, infeasible_at = [state[:, :2].clone()], []  # the full states with no safe action
    with torch.no_grad():
        for _ in range(env.max_episode_steps):
            obs = env.observe(state)
            mask = safe_action_mask(env, index, state, grid)
            none = ~mask.any(1)
            infeasible |= none
            infeasible_at += [state[i].clone() for i in none.nonzero().flatten().tolist()]
            nominal = nominal_action(obs, env)
            dist = torch.cdist(nominal, grid)  # the nearest safe action (the nominal one when none is safe)
            choice = torch.where(mask, dist, torch.full_like(dist, math.inf)).argmin(1)
            action = torch.where(none.unsqueeze(1), nominal, grid[choice])
            state, reward, _ = env.step(state, action)
            error -= reward
            violated |= torch.hypot(state[:, 4] - state[:, 0], state[:, 5] - state[:, 1]) < HAZARD_RADIUS
            paths.append(state[:, :2].clone())
    ok = ~(violated | infeasible)
    return {"trajectories": trajectories, "success_rate": ok.float().mean().item(),
            "phi0_violation_rate": violated.float().mean().item(), "infeasible_rate": infeasible.float().mean().item(),
            "tracking_error": (error / env.max_episode_steps).mean().item(),
            "paths": torch.stack(paths, 1), "hazards": state[:, 4:6], "infeasible_at": infeasible_at,
            "success": ok}


def _run_indexes(run_dir: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(φ_i, φ_SIS) of a fac_sis run, and its logged (env steps, σ, k, n)."""
    import torch

    from saferl.cluster import rundir
    from saferl.config import ConfigError

    cfg = rundir.load_run_config(Path(run_dir))
    if cfg.algo != "fac_sis":
        raise ConfigError(f"usage error: --run {run_dir} is a {cfg.algo} run; it needs a fac_sis run")
    ckpt = rundir.load_checkpoint(Path(run_dir), cfg)
    if ckpt is None:
        raise ConfigError(f"usage error: --run {run_dir} has no checkpoint")
    p = cfg.learner_params().safety_index
    learned = {k: float(torch.as_tensor(ckpt["learner"]["index"][k])) for k in ("sigma", "k", "n")}
    sigma, k, n = p.values()
    trajectory = []
    with open(Path(run_dir) / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("fac/sigma"):
                trajectory.append({"env_steps": float(row["env_steps"]), "sigma": float(row["fac/sigma"]),
                                   "k": float(row["fac/k"]), "n": float(row["fac/n"])})
    return [("φ_i", {"sigma": sigma, "k": k, "n": n, "eta_d": p.eta_d}),
            ("φ_SIS", {**learned, "eta_d": p.eta_d})], trajectory


def indexes(args) -> tuple[list[tuple[str, dict]], list[dict]]:
    from saferl.learners.safety_index import PRESETS

    out = [(label, dict(zip(("sigma", "k", "n"), PRESETS[name]), eta_d=0.0)) for name, label in PRESET_LABELS.items()]
    trajectory: list[dict] = []
    if args.run:
        extra, trajectory = _run_indexes(args.run)
        out += extra
    return out, trajectory


def table(rows: list[dict], args, constants: dict) -> str:
    head = ("| index | σ | k | n | success rate | φ0 violation rate | infeasible rate | tracking error |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['index']} | {r['sigma']:.4g} | {r['k']:.4g} | {r['n']:.4g} | {r['success_rate']:.0%} | "
                   f"{r['phi0_violation_rate']:.0%} | {r['infeasible_rate']:.0%} | {r['tracking_error']:.3f} |\n"
                   for r in rows)
    from saferl.envs.point_hazard import DEFAULT_CONSTANTS

    consts = ", ".join(f"{k} {v:g}" for k, v in constants.items())
    why = (f"These are the task's defaults. {DEFAULTS_NOTE}" if constants == DEFAULT_CONSTANTS else
           "These constants were set on the command line; the task's defaults are "
           + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_CONSTANTS.items()) + ".")
    return (f"# Safety-index feasibility (FAC-SIS App. E.3, Table 3)\n\nPointHazard distribution "
            f"{args.distribution} ({consts}), {args.trajectories} trajectories per index, {args.grid}×{args.grid} "
            f"actions checked at every step.\n\n{why}\n\n" + head + body)


def sensitivity_table(rows: list[dict], defaults: dict) -> str:
    """Success (infeasible) rates of φ0, φ_h, φ_F per (acc_max, v_max), the paper's row and the defaults."""
    labels = list(PRESET_LABELS.values())
    head = ("| acc_max | v_max | " + " | ".join(f"{lab} success (infeasible)" for lab in labels) + " |\n"
            "|---|---|" + "---|" * len(labels) + "\n")
    settings = sorted({(r["acc_max"], r["v_max"]) for r in rows})
    body = ""
    for acc, v in settings:
        cells = {r["index"]: r for r in rows if (r["acc_max"], r["v_max"]) == (acc, v)}
        mark = " (default)" if (acc, v) == (defaults["acc_max"], defaults["v_max"]) else ""
        body += (f"| {acc:g}{mark} | {v:g} | " + " | ".join(
            f"{cells[lab]['success_rate']:.0%} ({cells[lab]['infeasible_rate']:.0%})" for lab in labels) + " |\n")
    paper = "| paper | – | " + " | ".join(
        f"{PAPER_TABLE3[lab]:.0%} ({1 - PAPER_TABLE3[lab]:.0%})" for lab in labels) + " |\n"
    omega = sorted({r["omega_max"] for r in rows})
    return (f"\n## Sensitivity to the actuator constants\n\nSuccess rate (infeasible rate) per index; turn-rate "
            f"bound {', '.join(f'{o:g}' for o in omega)}; same trajectories and action grid. The last row is the "
            f"paper's Table 3.\n\n" + head + body + paper)


def _floats(text: str, flag: str) -> list[float]:
    from saferl.config import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"usage error: {flag}: expected comma-separated numbers (got {text!r})") from None
    if any(not x > 0 for x in values):
        raise ConfigError(f"usage error: {flag}: every value must be > 0 (got {text!r})")
    return values


def sensitivity(args, constants: dict, console) -> list[dict]:
    """φ0, φ_h, φ_F checked over the ``--sens-acc-max`` × ``--sens-v-max`` grid."""
    from saferl.learners.safety_index import IndexParams, SafetyIndex

    rows = []
    accs, vs = _floats(args.sens_acc_max, "--sens-acc-max"), _floats(args.sens_v_max, "--sens-v-max")
    if not accs:
        return rows
    for acc in accs:
        for v in vs:
            consts = {**constants, "acc_max": acc, "v_max": v}
            for name, label in PRESET_LABELS.items():
                res = check(SafetyIndex(IndexParams(preset=name), n_hazards=1), args.distribution, args.trajectories,
                            args.grid, args.seed, consts)
                rows.append({**{k: consts[k] for k in ("acc_max", "v_max", "omega_max")}, "index": label,
                             **{k: res[k] for k in ("success_rate", "phi0_violation_rate", "infeasible_rate")}})
            console.print(f"acc_max {acc:g}, v_max {v:g}: " + ", ".join(
                f"{r['index']} {r['success_rate']:.0%}" for r in rows[-3:]))
    return rows


def _plot_paths(path: Path, results: list[tuple[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from saferl.envs.point_hazard import GOAL, HAZARD_RADIUS

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 4.2), squeeze=False)
    for ax, (label, res) in zip(axes[0], results):
        for i in range(min(30, res["paths"].shape[0])):
            xy = res["paths"][i].numpy()
            ax.plot(xy[:, 0], xy[:, 1], color="tab:green" if res["success"][i] else "tab:red", lw=0.7, alpha=0.7)
            hx, hy = res["hazards"][i].tolist()
            ax.add_patch(plt.Circle((hx, hy), HAZARD_RADIUS, color="tab:orange", alpha=0.08))
        if res["infeasible_at"]:
            pts = torch.stack(res["infeasible_at"])[:, :2].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color="black", label="infeasible", zorder=3)
            ax.legend(fontsize=7, loc="lower right")
        ax.plot(*GOAL, "r*", ms=10)
        ax.set(title=f"{label}: {res['success_rate']:.0%} success", xlim=(-3, 3), ylim=(-2, 5.5), aspect="equal")
    save_figure(fig, path, "safety-filtered trajectories (green: success, red: violation or infeasible)")


def _plot_index(path: Path, trajectory: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    steps = [t["env_steps"] for t in trajectory]
    for ax, key, label in zip(axes, ("sigma", "k", "n"), ("σ", "k", "n")):
        ax.plot(steps, [t[key] for t in trajectory])
        ax.set(xlabel="env steps", title=label)
    save_figure(fig, path, "learned safety-index parameters (FAC-SIS Fig. 8)")


def run(args) -> Path:
    import torch

    from saferl.config import ConfigError
    from saferl.envs.point_hazard import DEFAULT_CONSTANTS
    from saferl.learners.safety_index import IndexParams, SafetyIndex

    if args.trajectories <= 0 or args.grid < 2:
        raise ConfigError("usage error: --trajectories must be > 0 and --grid ≥ 2")
    given = {"acc_max": args.acc_max, "v_max": args.v_max, "omega_max": args.omega_max}
    for key, value in given.items():
        if value is not None and not value > 0:
            raise ConfigError(f"usage error: --{key.replace('_', '-')} must be > 0 (got {value})")
    constants = {k: (DEFAULT_CONSTANTS[k] if v is None else v) for k, v in given.items()}
    _floats(args.sens_acc_max, "--sens-acc-max"), _floats(args.sens_v_max, "--sens-v-max")  # fail before the work
    console, out = study_console_and_out("sis-feasibility", args)
    chosen, trajectory = indexes(args)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, results = [], []
    for label, values in chosen:
        index = SafetyIndex(IndexParams(preset=None, **values), n_hazards=1)
        res = check(index, args.distribution, args.trajectories, args.grid, args.seed, constants)
        rows.append({"index": label, **values, **{k: res[k] for k in COLUMNS if k in res}})
        results.append((label, res))
        console.print(f"{label}: success {res['success_rate']:.0%}, φ0 violations {res['phi0_violation_rate']:.0%}, "
                      f"infeasible {res['infeasible_rate']:.0%}")
    write_csv(out / "sis_feasibility.csv", COLUMNS, rows)
    sens = sensitivity(args, constants, console)
    text = table(rows, args, constants)
    if sens:
        write_csv(out / "sensitivity.csv", SENS_COLUMNS, sens)
        text += sensitivity_table(sens, DEFAULT_CONSTANTS)
    (out / "sis_feasibility.md").write_text(text)
    _plot_paths(out / "trajectories.png", results)
    if trajectory:
        _plot_index(out / "index_trajectory.png", trajectory)
    (out / "study.json").write_text(json.dumps({**{k: v for k, v in vars(args).items() if k != "fn"},
                                                "constants": constants}, indent=2, default=str))
    console.print(text)
    return out
