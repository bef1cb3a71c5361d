"""FAC-SIS paper (seed 004), Appendix E.2-E.3: the exhaustive feasibility check of safety indexes
on the custom point/hazard task (Table 3) and the learned (σ, k, n) trajectory (Fig. 8).

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
nor meets an infeasible state (Table 3's definition). Outputs in ``--out``:

    sis_feasibility.md / .csv   per index: σ, k, n, success rate, φ0 violation rate, infeasible
                                rate, average tracking error (mean per-step −reward)
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

from saferl.cluster.studies.runner import save_figure, study_console_and_out, write_csv

HELP = "FAC-SIS App. E.2-E.3: exhaustive feasibility of safety indexes (Table 3) and the learned index (Fig. 8)"
COLUMNS = ["index", "sigma", "k", "n", "eta_d", "trajectories", "success_rate", "phi0_violation_rate",
           "infeasible_rate", "tracking_error"]
PRESET_LABELS = {"zero": "φ0", "handcrafted": "φ_h", "feasible": "φ_F"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="a fac_sis run: adds its initial (φ_i) and learned (φ_SIS) index and plots Fig. 8")
    p.add_argument("--distribution", type=int, default=1, choices=(1, 2, 3), help="Table 1's initial distribution")
    p.add_argument("--trajectories", type=int, default=100, help="episodes per index (paper: 100)")
    p.add_argument("--grid", type=int, default=21, help="actions per dimension of the exhaustive check (default 21)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/studies/sis-feasibility-<time>)")


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


def check(index, distribution: int, trajectories: int, grid_n: int, seed: int) -> dict:
    """Roll ``trajectories`` safety-filtered episodes; their outcomes and paths (module docstring)."""
    import torch

    from saferl.envs.point_hazard import HAZARD_RADIUS, PointHazardEnv

    env = PointHazardEnv(distribution)
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


def table(rows: list[dict], args) -> str:
    head = ("| index | σ | k | n | success rate | φ0 violation rate | infeasible rate | tracking error |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['index']} | {r['sigma']:.4g} | {r['k']:.4g} | {r['n']:.4g} | {r['success_rate']:.0%} | "
                   f"{r['phi0_violation_rate']:.0%} | {r['infeasible_rate']:.0%} | {r['tracking_error']:.3f} |\n"
                   for r in rows)
    return (f"# Safety-index feasibility (FAC-SIS App. E.3, Table 3)\n\nPointHazard distribution "
            f"{args.distribution}, {args.trajectories} trajectories per index, {args.grid}×{args.grid} "
            f"actions checked at every step.\n\n" + head + body)


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
    from saferl.learners.safety_index import IndexParams, SafetyIndex

    if args.trajectories <= 0 or args.grid < 2:
        raise ConfigError("usage error: --trajectories must be > 0 and --grid ≥ 2")
    console, out = study_console_and_out("sis-feasibility", args)
    chosen, trajectory = indexes(args)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, results = [], []
    for label, values in chosen:
        index = SafetyIndex(IndexParams(preset=None, **values), n_hazards=1)
        res = check(index, args.distribution, args.trajectories, args.grid, args.seed)
        rows.append({"index": label, **values, **{k: res[k] for k in COLUMNS if k in res}})
        results.append((label, res))
        console.print(f"{label}: success {res['success_rate']:.0%}, φ0 violations {res['phi0_violation_rate']:.0%}, "
                      f"infeasible {res['infeasible_rate']:.0%}")
    write_csv(out / "sis_feasibility.csv", COLUMNS, rows)
    (out / "sis_feasibility.md").write_text(table(rows, args))
    _plot_paths(out / "trajectories.png", results)
    if trajectory:
        _plot_index(out / "index_trajectory.png", trajectory)
    (out / "study.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "fn"}, indent=2,
                                               default=str))
    console.print(table(rows, args))
    return out
