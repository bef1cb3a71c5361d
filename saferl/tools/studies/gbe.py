"""``saferl study gbe``: how well do estimators predict the constraint after a policy update?
(CGPO paper: Fig. 1 and 5 / Appendix C; Tables 2-3 / Appendix B.)

Both experiments train a tanh-Gaussian policy on a differentiable task (default FunctionEnv,
Appendix C.1) with fixed-length updates δ and, at every update, compare an estimate Ĵ_C(θ+δ)
with the constraint J_C(θ+δ) actually reached, by the relative error of eq 74:

    Δ_relative = |J_C(θ+δ) − Ĵ_C(θ+δ)| / |J_C(θ+δ) − J_C(θ)|

Part 1, GBE vs ABE over training (Fig. 1, Fig. 5, Appendix C.2), horizon = the task's T, ‖δ‖ = 0.01:

    GBE (eq 7 = 73):  Ĵ_C(θ+δ) = J_C(θ) + δᵀ∇_θJ_C(θ)   (∇J_C by BPTT through the simulator)
    ABE (eq 72):      Ĵ_C(θ+δ) = J_C(θ) + 1/(1−γ) E_{s∼d^π, a∼π}[π_{θ+δ}(a|s)/π_θ(a|s) A^π(s, a)]

Part 2, FoBG vs ZoBG over trajectory length L × step size ‖δ‖ (Tables 2-3): the same first-order
prediction J_C(θ) + δᵀq with q from first-order gradients through the simulator (FoBG, the
reparameterised BPTT gradient) or from the zeroth-order batch gradient of eq 69 (ZoBG,
q = 1/N Σ_i Σ_t ∇_θ log π_θ(a_t^i | s_t^i) R_C(τ_i), REINFORCE with the trajectory's total cost;
``learners/analytic.zobg_gradient``, the estimator CGPO-ZoBG trains on).

Everything runs in-process on the project's Ray-free machinery: ``make_diff_env``,
``GaussianPolicy``, ``rollout_window`` / ``objective_gradients`` / ``episode_starts`` /
``window_noise`` (learners/analytic.py), the one GAE (learners/gae.py) and CGPO's sub-problem
solver (learners/cgpo_math.py). Outputs (in ``--out``): ``gbe_abe.csv`` and ``fobg_zobg.csv``
(one row per measured update), ``gbe_abe.md`` and ``fobg_zobg.md`` (tables), ``gbe_abe.png`` and
``fobg_zobg.png`` (plots), ``summary.json`` (flags, runtime, headline numbers).

Choices not fixed by the paper:

* The "true" J_C(θ+δ) is measured by re-rolling the updated policy from the same initial states
  with the same action noise ε (common random numbers); J_C(θ), ∇J_C, the ABE advantages and the
  ZoBG gradient all come from that same batch of N trajectories. Eq 74 then measures how well each
  estimator predicts the change of the batch objective (no Monte-Carlo noise in the denominator).
* The update δ of every epoch (Appendix C.2: "updated iteratively", ‖δ‖ = 0.01) is CGPO's step:
  the sub-problem of eq 10 solved by ``cgpo_math.solve_subproblem`` with the FoBG g = ∇J_R,
  q = ∇J_C of the batch and c = J_C(θ) − b, rescaled to exactly ‖δ‖ (equal step lengths, Fig. 5).
  The policy then moves by that δ, so the measured updates are the training updates. Training
  stages (Fig. 5 has four) are ``--stages`` equal blocks of ``--epochs`` epochs.
* Gradients are whole-trajectory BPTT (h = T, no critics: eq 79-80), not SHAC windows, so GBE
  uses the exact gradient of the batch objective. Observation normalisation is on and its
  statistics are updated after each measured update (never inside one).
* ABE is the practical CPO/OmniSafe form of eq 72 for a finite-horizon undiscounted task:
  γ = 0.99 (so 1/(1−γ) = 100), a time-independent cost critic V_C(s) (the infinite-horizon
  assumption) fitted every epoch to TD(λ = 0.95) targets from ``learners/gae.gae``, the episode
  ending at T (``--abe-time-limit truncation`` bootstraps V_C(s_T) instead: on BraxCartPole that
  self-bootstrap diverged to |A| ~ 1e5 as the cart drifts); s ∼ d^π is the uniform empirical distribution
  over all N·T visited states; a ∼ π are the batch's own actions (ratios on the pre-tanh sample u,
  where the tanh Jacobian cancels). The expectation is taken of (ρ − 1)·A rather than ρ·A, equal
  in expectation since E_π[A] = 0 but without the batch's non-zero mean advantage (the literal
  ρ·A is also recorded, column ``err_abe_literal``). The critic is fitted on the current batch
  before its advantages are taken (favourable to ABE; ``critic_ev`` records its fit); the PPO/CPO
  order, advantages from the critic as it was before this batch, is recorded as ``err_abe_stale``.
* FoBG vs ZoBG: a trajectory of length L has L actions a_0 … a_{L−1}; its constraint is the task's
  cost summed over L + 1 env steps, Σ_{t=0}^{L} c_t (FunctionEnv's cost c_t = f(x_t) is that of the
  state before the step, eq 70-71, so with L steps only L − 1 actions would count and L = 1 would
  be degenerate; c_0 cancels in eq 74). ZoBG is eq 69 literally: no baseline, whole-trajectory R.
  b scales with the length (b·(L+1)/T) for the direction's sub-problem.
* The paper's step-size rows all print as "δ̂ = 0.0001" (an extraction artefact); we read δ̂ as the
  update magnitude ‖δ‖ and use five sizes 1e-4 … 1e-2 (the largest is Appendix C's 0.01). One
  training run per (seed, L), moving by ‖δ‖ = ``--delta`` per epoch, serves all step sizes: every
  step size is measured along the same update direction from the same θ.
* Cells report mean ± std over seeds of each seed's mean over epochs (the relative error is
  heavy-tailed: its denominator can approach 0), and, separately, medians over all updates.
* Other differentiable tasks (``--task``, e.g. the Brax tasks) run the same code. ``--horizon``
  shortens part 1's trajectories (b scales by horizon/T). Batches whose J_C or gradients are not
  finite (a diverging simulator: BraxCartPole-v0 over its full T = 300 with an untrained policy)
  are skipped and counted (``skipped_batches`` in summary.json).
* Policy: tanh-squashed Gaussian, hidden ``--hidden`` (default [32, 32], configs/cgpo), log σ₀ = −1
  (SHAC-Lag default). CPU, torch limited to one thread; float64 where the task computes in it
  (``--dtype auto``: FunctionEnv), since in float32 J_C(θ+δ) − J_C(θ) at ‖δ‖ = 1e-4 is within a few
  hundred ulps of J_C and eq 74's denominator becomes round-off; Brax (JAX) tasks stay float32.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np

HELP = "GBE vs ABE and FoBG vs ZoBG relative errors of constraint-change estimates (CGPO paper: Fig. 1/5, Tables 2-3)"

DEFAULT_STEP_SIZES = [1e-4, 5e-4, 1e-3, 5e-3, 1e-2]
DEFAULT_LENGTHS = [1, 5, 10, 50, 100, 200]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="FunctionEnv-v0", help="a differentiable registered task")
    parser.add_argument("--seeds", type=int, default=3, help="random seeds (the paper uses 5)")
    parser.add_argument("--epochs", type=int, default=40,
                        help="measured updates per training run (paper: 100)")
    parser.add_argument("--stages", type=int, default=4, help="training stages the epochs are grouped into")
    parser.add_argument("--envs", type=int, default=64, help="trajectories per batch N")
    parser.add_argument("--horizon", type=int, default=None,
                        help="GBE/ABE trajectory length (default: the task's T; the limit b scales with it)")
    parser.add_argument("--delta", type=float, default=0.01, help="‖δ‖ of every training update (App. C.2)")
    parser.add_argument("--step-sizes", type=float, nargs="+", default=DEFAULT_STEP_SIZES,
                        help="‖δ‖ rows of Tables 2-3")
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS,
                        help="trajectory lengths, columns of Tables 2-3")
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="policy hidden sizes")
    parser.add_argument("--gamma", type=float, default=0.99, help="ABE's discount γ")
    parser.add_argument("--gae-lambda", type=float, default=0.95, help="ABE's GAE λ")
    parser.add_argument("--abe-time-limit", choices=["termination", "truncation"], default="termination",
                        help="ABE critic targets at T: the episode ends (default), or bootstrap V(s_T) (the "
                             "infinite-horizon view; diverges on BraxCartPole)")
    parser.add_argument("--critic-iters", type=int, default=60,
                        help="ABE critic Adam steps per epoch (10x on the first)")
    parser.add_argument("--dtype", choices=["auto", "float32", "float64"], default="auto",
                        help="auto: float64 when the task computes in it (FunctionEnv), else float32 (Brax/JAX)")
    parser.add_argument("--parts", choices=["all", "gbe-abe", "fobg-zobg"], default="all")
    parser.add_argument("--out", default=None, help="output folder (default runs/studies/gbe-<time>)")


# --------------------------------------------------------------------------------------------
# estimators


def relative_error(true_new: float, pred_new: float, old: float) -> float:
    """Eq 74."""
    den = abs(true_new - old)
    return abs(true_new - pred_new) / den if den > 0 else math.inf


def update_direction(g: np.ndarray, q: np.ndarray, c: float, norm: float) -> np.ndarray:
    """CGPO's sub-problem step (eq 10) at radius ‖δ‖ = norm, rescaled to exactly that norm."""
    from saferl.learners.cgpo_math import solve_subproblem

    delta, _ = solve_subproblem(np.asarray(g, np.float64), np.asarray(q, np.float64), float(c), norm ** 2)
    n = float(np.linalg.norm(delta))
    if not np.isfinite(n) or n == 0.0:  # degenerate sub-problem: plain descent/ascent on J_C
        delta, n = -math.copysign(1.0, c) * np.asarray(q, np.float64), float(np.linalg.norm(q))
        if n == 0.0:
            return np.zeros_like(delta)
    return delta * (norm / n)


def batch_gradients(env, policy, start, noise, steps: int):
    """Roll ``steps`` steps keeping the graph: J_R, J_C (batch means), FoBG g = ∇J_R, q = ∇J_C,
    per-trajectory costs and the detached trajectory."""
    from saferl.learners.analytic import objective_gradients, rollout_window

    sum_r, sum_c, _, _, _, traj = rollout_window(env, policy, start, 0, steps, steps, noise, None)
    j_r, j_c = sum_r.mean(), sum_c.mean()
    g, q = objective_gradients(j_r, j_c, list(policy.parameters()))
    return j_r.item(), j_c.item(), g.astype(np.float64), q.astype(np.float64), sum_c.detach(), traj


def shifted_cost(env, policy, start, noise, steps: int, delta: np.ndarray) -> float:
    """J_C(θ + δ) on the same initial states and noise; θ is restored afterwards."""
    import torch

    from saferl.learners.analytic import rollout_window
    from saferl.learners.networks import flat_params, set_flat_params

    theta = flat_params(policy)
    set_flat_params(policy, theta + torch.as_tensor(delta, dtype=theta.dtype))
    try:
        with torch.no_grad():
            _, sum_c, *_ = rollout_window(env, policy, start, 0, steps, steps, noise, None)
    finally:
        set_flat_params(policy, theta)
    return float(sum_c.mean())


class ABECritic:
    """Time-independent cost critic V_C(s) and the ABE estimate of eq 72 (see module docstring)."""

    def __init__(self, obs_dim: int, gamma: float, lam: float, iters: int, dtype, hidden=(64, 64),
                 time_limit: str = "termination"):
        import torch
        from torch import nn

        from saferl.learners.networks import mlp

        self.net = mlp([obs_dim, *hidden, 1], activation=nn.ELU).to(dtype)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=3e-3)
        self.gamma, self.lam, self.iters, self.fits = gamma, lam, iters, 0
        self.bootstrap_last = time_limit == "truncation"

    def _targets(self, z, costs):
        import torch

        from saferl.learners.gae import gae

        with torch.no_grad():
            v = self.net(z).squeeze(-1)  # [T+1, N]
        end = torch.zeros_like(costs, dtype=torch.bool)
        end[-1] = True
        v_next = v[1:].clone()
        if not self.bootstrap_last:  # the episode ends at T: no value after it
            v_next[-1] = 0.0
        adv, targets = gae(costs, v[:-1], v_next, end, self.gamma, self.lam)
        return adv, targets, v[:-1]

    def fit_and_advantages(self, z, costs):
        """z: normalised obs [T+1, N, d]; costs [T, N]. Returns (advantages after fitting the critic
        on this batch, advantages from the critic before that fit, explained variance)."""
        import torch

        stale, _, _ = self._targets(z, costs)
        iters = self.iters * (10 if self.fits == 0 else 1)
        self.fits += 1
        targets = None
        for i in range(iters):
            if i % 10 == 0:
                _, targets, _ = self._targets(z, costs)
            loss = ((self.net(z[:-1]).squeeze(-1) - targets) ** 2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        adv, targets, v = self._targets(z, costs)
        ev = 1.0 - float(torch.var(targets - v) / (torch.var(targets) + 1e-12))
        return adv, stale, ev

    def estimate(self, policy, obs, u, advs, j_c: float, delta: np.ndarray) -> list[tuple[float, float]]:
        """Per advantage tensor in ``advs``: (Ĵ_ABE with (ρ − 1)·A, literal Ĵ_ABE with ρ·A) for δ."""
        import torch

        from saferl.learners.networks import flat_params, set_flat_params

        theta = flat_params(policy)
        with torch.no_grad():
            logp_old = policy.log_prob(obs[:-1], u)
            set_flat_params(policy, theta + torch.as_tensor(delta, dtype=theta.dtype))
            try:
                logp_new = policy.log_prob(obs[:-1], u)
            finally:
                set_flat_params(policy, theta)
            ratio = torch.exp(logp_new - logp_old)
            scale = 1.0 / (1.0 - self.gamma)
            return [(j_c + scale * float(((ratio - 1.0) * adv).mean()), j_c + scale * float((ratio * adv).mean()))
                    for adv in advs]


# --------------------------------------------------------------------------------------------
# experiments


def _make_policy(env, hidden, seed: int, dtype):
    import torch

    from saferl.learners.networks import GaussianPolicy

    torch.manual_seed(seed)
    policy = GaussianPolicy(env.obs_dim, env.act_dim, hidden, init_log_std=-1.0, squash=True, normalise_obs=True)
    return policy.to(dtype) if dtype == torch.float64 else policy  # (the norm's buffers are float64 already)


def _batch(env, seed: int, epoch: int, n: int, steps: int, dtype):
    """Initial states and action noise of one epoch's batch (the project's seeded streams)."""
    from saferl.learners.analytic import episode_starts, window_noise

    return (episode_starts(seed, epoch, n, env).to(dtype),
            window_noise(seed, epoch, n, env.act_dim, steps).to(dtype))


def resolve_dtype(env, requested: str):
    """float64 when asked, or (auto) when one env step on float64 inputs returns float64."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    try:
        state = env.initial_state(2, torch.Generator().manual_seed(0)).to(torch.float64)
        nxt, _, cost = env.step(state, torch.zeros(2, env.act_dim, dtype=torch.float64))
        obs = env.observe(nxt)
        return torch.float64 if nxt.dtype == obs.dtype == cost.dtype == torch.float64 else torch.float32
    except (RuntimeError, TypeError):
        return torch.float32


def _step(policy, delta: np.ndarray, obs) -> None:
    import torch

    from saferl.learners.networks import flat_params, set_flat_params

    theta = flat_params(policy)
    set_flat_params(policy, theta + torch.as_tensor(delta, dtype=theta.dtype))
    policy.norm.update(obs[:-1])


def _finite(*values) -> bool:
    return all(bool(np.all(np.isfinite(v))) for v in values)


def run_gbe_abe(env, limit: float, args, log, dtype) -> tuple[list[dict], int]:
    """Part 1: one training run per seed; every update measured with GBE and ABE. Returns the rows
    and the number of batches skipped for non-finite values (a diverging simulator)."""
    from saferl.learners.analytic import pre_squash_actions

    T = args.horizon or env.max_episode_steps
    limit = limit * T / env.max_episode_steps
    N, rows, skipped = args.envs, [], 0
    for seed in range(args.seeds):
        policy = _make_policy(env, args.hidden, seed, dtype)
        critic = ABECritic(env.obs_dim, args.gamma, args.gae_lambda, args.critic_iters, dtype,
                           time_limit=args.abe_time_limit)
        for epoch in range(args.epochs):
            start, noise = _batch(env, seed, epoch, N, T, dtype)
            j_r, j_c, g, q, _, traj = batch_gradients(env, policy, start, noise, T)
            if not _finite(j_c, g, q):
                skipped += 1
                log(f"[gbe-abe] seed {seed} epoch {epoch + 1}: non-finite J_C or gradient, batch skipped")
                continue
            delta = update_direction(g, q, j_c - limit, args.delta)
            true_new = shifted_cost(env, policy, start, noise, T, delta)
            if not _finite(true_new):
                skipped += 1
                log(f"[gbe-abe] seed {seed} epoch {epoch + 1}: non-finite J_C(θ+δ), batch skipped")
                continue
            pred_gbe = j_c + float(delta @ q)
            obs = traj["obs"]
            u = pre_squash_actions(policy, obs, noise)
            adv, stale, ev = critic.fit_and_advantages(policy.normalised(obs).detach(), traj["cost"])
            (pred_abe, pred_lit), (pred_stale, _) = critic.estimate(policy, obs, u, (adv, stale), j_c, delta)
            rows.append({
                "seed": seed, "epoch": epoch, "stage": epoch * args.stages // args.epochs, "j_r": j_r,
                "j_c": j_c, "j_c_new": true_new, "change": true_new - j_c, "pred_gbe": pred_gbe,
                "pred_abe": pred_abe, "pred_abe_literal": pred_lit, "pred_abe_stale": pred_stale,
                "err_gbe": relative_error(true_new, pred_gbe, j_c),
                "err_abe": relative_error(true_new, pred_abe, j_c),
                "err_abe_literal": relative_error(true_new, pred_lit, j_c),
                "err_abe_stale": relative_error(true_new, pred_stale, j_c), "critic_ev": ev})
            _step(policy, delta, obs)
            if epoch % max(1, args.epochs // 4) == 0 or epoch == args.epochs - 1:
                r = rows[-1]
                log(f"[gbe-abe] seed {seed} epoch {epoch + 1}/{args.epochs}: J_C {j_c:.3f} "
                    f"ΔJ_C {r['change']:+.2e}  err GBE {r['err_gbe']:.3g}  ABE {r['err_abe']:.3g} (critic EV {ev:.2f})")
    return rows, skipped


def run_fobg_zobg(env, limit: float, args, log, dtype) -> tuple[list[dict], int]:
    """Part 2: one training run per (seed, length); every update measured at every step size with
    FoBG and ZoBG gradients. Returns the rows and the number of skipped (non-finite) batches."""
    from saferl.learners.analytic import pre_squash_actions, zobg_gradient

    T, N, rows, skipped = env.max_episode_steps, args.envs, [], 0
    for seed in range(args.seeds):
        for length in args.lengths:
            steps = length + 1  # L actions costed over L + 1 env steps (module docstring)
            policy = _make_policy(env, args.hidden, seed, dtype)
            t0 = time.perf_counter()
            for epoch in range(args.epochs):
                start, noise = _batch(env, seed, epoch, N, steps, dtype)
                _j_r, j_c, g, q_fo, costs, traj = batch_gradients(env, policy, start, noise, steps)
                obs = traj["obs"]
                u = pre_squash_actions(policy, obs, noise)
                q_zo = zobg_gradient(policy, obs, u, costs)
                if not _finite(j_c, g, q_fo, q_zo):
                    skipped += 1
                    log(f"[fobg-zobg] seed {seed} L={length} epoch {epoch + 1}: non-finite values, batch skipped")
                    continue
                direction = update_direction(g, q_fo, j_c - limit * steps / T, 1.0)
                for size in args.step_sizes:
                    delta = size * direction
                    true_new = shifted_cost(env, policy, start, noise, steps, delta)
                    if not _finite(true_new):
                        skipped += 1
                        continue
                    pred_fo, pred_zo = j_c + float(delta @ q_fo), j_c + float(delta @ q_zo)
                    rows.append({
                        "seed": seed, "length": length, "step_size": size, "epoch": epoch, "j_c": j_c,
                        "j_c_new": true_new, "change": true_new - j_c, "pred_fobg": pred_fo,
                        "pred_zobg": pred_zo, "err_fobg": relative_error(true_new, pred_fo, j_c),
                        "err_zobg": relative_error(true_new, pred_zo, j_c)})
                _step(policy, args.delta * direction, obs)
            last = [r for r in rows if r["seed"] == seed and r["length"] == length]
            if last:
                log(f"[fobg-zobg] seed {seed} L={length}: {args.epochs} epochs in {time.perf_counter() - t0:.1f}s, "
                    f"median err FoBG {np.median([r['err_fobg'] for r in last]):.3g} "
                    f"ZoBG {np.median([r['err_zobg'] for r in last]):.3g}")
    return rows, skipped


# --------------------------------------------------------------------------------------------
# reporting


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _seed_stats(rows, key, **where) -> tuple[float, float, float]:
    """(mean over seeds of per-seed means, std over seeds, median over all rows)."""
    sel = [r for r in rows if all(r[k] == v for k, v in where.items())]
    if not sel:
        return math.nan, math.nan, math.nan
    seeds = sorted({r["seed"] for r in sel})
    per_seed = [np.mean([r[key] for r in sel if r["seed"] == s]) for s in seeds]
    return float(np.mean(per_seed)), float(np.std(per_seed)), float(np.median([r[key] for r in sel]))


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.4g}"


def gbe_abe_table(rows, args) -> str:
    lines = [f"# GBE vs ABE: relative error of Ĵ_C(θ+δ), ‖δ‖ = {args.delta:g} (eq 74; CGPO paper Fig. 1, 5)", "",
             f"Task {args.task}, T = {args.horizon or 'task horizon'}, {args.seeds} seeds × {args.epochs} updates, "
             f"N = {args.envs}. "
             "mean ± std over seeds of per-seed means; median and share > 1 over all updates.", "",
             "| stage | epochs | J_C(θ) | GBE mean ± std | GBE median | ABE mean ± std | ABE median "
             "| ABE > 1 | GBE > 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage in range(args.stages):
        sel = [r for r in rows if r["stage"] == stage]
        if not sel:
            continue
        ep = sorted({r["epoch"] for r in sel})
        gm, gs, gmed = _seed_stats(rows, "err_gbe", stage=stage)
        am, as_, amed = _seed_stats(rows, "err_abe", stage=stage)
        jc = np.mean([r["j_c"] for r in sel])
        lines.append(f"| {stage + 1} | {ep[0]}–{ep[-1]} | {jc:.3f} | {_fmt(gm)} ± {_fmt(gs)} | {_fmt(gmed)} | "
                     f"{_fmt(am)} ± {_fmt(as_)} | {_fmt(amed)} | {np.mean([r['err_abe'] > 1 for r in sel]):.0%} | "
                     f"{np.mean([r['err_gbe'] > 1 for r in sel]):.0%} |")
    gm, gs, gmed = _seed_stats(rows, "err_gbe")
    am, as_, amed = _seed_stats(rows, "err_abe")
    lm, ls, lmed = _seed_stats(rows, "err_abe_literal")
    sm, ss, smed = _seed_stats(rows, "err_abe_stale")
    lines.append(f"| all | 0–{args.epochs - 1} | {np.mean([r['j_c'] for r in rows]):.3f} | {_fmt(gm)} ± {_fmt(gs)} | "
                 f"{_fmt(gmed)} | {_fmt(am)} ± {_fmt(as_)} | {_fmt(amed)} | "
                 f"{np.mean([r['err_abe'] > 1 for r in rows]):.0%} | {np.mean([r['err_gbe'] > 1 for r in rows]):.0%} |")
    lines += ["", "ABE variants (all updates): literal eq 72 with ρ·A instead of (ρ − 1)·A: "
              f"mean {_fmt(lm)} ± {_fmt(ls)}, median {_fmt(lmed)}; advantages from the critic before it is fitted "
              f"on the batch (the PPO/CPO order): mean {_fmt(sm)} ± {_fmt(ss)}, median {_fmt(smed)}, "
              f"{np.mean([r['err_abe_stale'] > 1 for r in rows]):.0%} > 1. "
              f"ABE critic explained variance: median {np.median([r['critic_ev'] for r in rows]):.3f}.", ""]
    return "\n".join(lines)


def fobg_zobg_tables(rows, args) -> str:
    lens = [f"{L}" for L in args.lengths]
    out = ["# FoBG vs ZoBG: relative error of Ĵ_C(θ+δ) = J_C(θ) + δᵀq (eq 74; CGPO paper Tables 2-3)", "",
           f"Task {args.task}, {args.seeds} seeds × {args.epochs} updates per (seed, L), N = {args.envs}. "
           "Rows: update magnitude ‖δ‖; columns: trajectory length L.", ""]
    for title, key, stat in [("Table 2 (ZoBG): mean ± std over seeds", "err_zobg", "mean"),
                             ("Table 3 (FoBG): mean ± std over seeds", "err_fobg", "mean"),
                             ("ZoBG: median over all updates", "err_zobg", "median"),
                             ("FoBG: median over all updates", "err_fobg", "median")]:
        out += [f"## {title}", "", "| ‖δ‖ \\ L | " + " | ".join(lens) + " |", "|---|" + "---|" * len(lens)]
        for size in args.step_sizes:
            cells = []
            for L in args.lengths:
                m, s, med = _seed_stats(rows, key, step_size=size, length=L)
                cells.append(f"{_fmt(m)} ± {_fmt(s)}" if stat == "mean" else _fmt(med))
            out.append(f"| {size:g} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_gbe_abe(rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(args.epochs)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for key, label, color in [("err_gbe", "GBE (eq 73)", "tab:blue"), ("err_abe", "ABE (eq 72)", "tab:red")]:
        m = np.full((args.seeds, args.epochs), np.nan)
        for r in rows:
            m[int(r["seed"]), int(r["epoch"])] = r[key] if np.isfinite(r[key]) else np.nan
        ax.plot(epochs, np.nanmedian(m, 0), color=color, label=label)
        ax.fill_between(epochs, np.nanmin(m, 0), np.nanmax(m, 0), color=color, alpha=0.2)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    for b in range(1, args.stages):
        ax.axvline(b * args.epochs / args.stages, color="grey", lw=0.5)
    ax.set(yscale="log", xlabel="training epoch (update)", ylabel="relative error (eq 74)",
           title=f"(a) {args.task}: ‖δ‖ = {args.delta:g}, median and range over seeds")
    ax.legend()
    ax = axes[1]
    data, pos, colors = [], [], []
    for stage in range(args.stages):
        for j, (key, color) in enumerate([("err_gbe", "tab:blue"), ("err_abe", "tab:red")]):
            v = np.array([r[key] for r in rows if r["stage"] == stage])
            data.append(v[np.isfinite(v)])
            pos.append(stage * 3 + j)
            colors.append(color)
    bp = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=False)
    for patch, c in zip(bp["boxes"], colors):
        patch.set_facecolor(c)
        patch.set_alpha(0.5)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks([s * 3 + 0.5 for s in range(args.stages)], [f"stage {s + 1}" for s in range(args.stages)])
    ax.set(yscale="log", ylabel="relative error", title="(b) per training stage (blue GBE, red ABE)")
    ax = axes[2]
    for s in range(args.seeds):
        sel = [r for r in rows if r["seed"] == s]
        ax.plot([r["epoch"] for r in sel], [r["j_c"] for r in sel], label=f"seed {s}")
    ax.set(xlabel="training epoch (update)", ylabel="J_C(θ)", title="(c) constraint during training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fobg_zobg(rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {}
    for key in ("err_zobg", "err_fobg"):
        grids[key] = np.array([[_seed_stats(rows, key, step_size=s, length=L)[2] for L in args.lengths]
                               for s in args.step_sizes])
    finite = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids.values()])
    vmin, vmax = (np.log10(finite.min()), np.log10(finite.max())) if finite.size else (-4, 2)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, (key, title) in zip(axes, [("err_zobg", "ZoBG (Table 2)"), ("err_fobg", "FoBG (Table 3)")]):
        lg = np.log10(np.clip(grids[key], 1e-12, None))
        im = ax.imshow(lg, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(lg.shape[0]):
            for j in range(lg.shape[1]):
                dark = lg[i, j] < (vmin + vmax) / 2
                ax.text(j, i, f"{grids[key][i, j]:.2g}", ha="center", va="center", fontsize=8,
                        color="w" if dark else "k")
        ax.set_xticks(range(len(args.lengths)), [str(L) for L in args.lengths])
        ax.set_yticks(range(len(args.step_sizes)), [f"{s:g}" for s in args.step_sizes])
        ax.set(xlabel="trajectory length L", ylabel="‖δ‖", title=f"{title}: median relative error")
        fig.colorbar(im, ax=ax, label="log10 relative error")
    ax = axes[2]
    cmap = plt.get_cmap("plasma")
    for i, s in enumerate(args.step_sizes):
        c = cmap(i / max(1, len(args.step_sizes) - 1) * 0.85)
        ax.plot(args.lengths, grids["err_fobg"][i], "-o", color=c, label=f"FoBG ‖δ‖={s:g}")
        ax.plot(args.lengths, grids["err_zobg"][i], "--s", color=c, label=f"ZoBG ‖δ‖={s:g}")
    ax.axhline(1.0, color="k", ls=":", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="trajectory length L", ylabel="median relative error",
           title="FoBG (solid) vs ZoBG (dashed)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def _check_args(args) -> None:
    from saferl import registry
    from saferl.config import ConfigError

    if args.task not in registry.TASKS:
        raise ConfigError(f"config error: {registry.task_error(args.task)}")
    if not registry.TASKS[args.task].differentiable:
        raise ConfigError(f"config error: task {args.task!r} is not differentiable (GBE needs ∇J_C)")
    for name in ("seeds", "epochs", "stages", "envs"):
        if getattr(args, name) < 1:
            raise ConfigError(f"config error: --{name} must be ≥ 1")
    if args.stages > args.epochs:
        raise ConfigError("config error: --stages must not exceed --epochs")
    if args.horizon is not None and args.horizon < 1:
        raise ConfigError("config error: --horizon must be ≥ 1")
    if min(args.lengths) < 1 or min(args.step_sizes) <= 0 or args.delta <= 0:
        raise ConfigError("config error: --lengths, --step-sizes and --delta must be positive")


def run(args) -> Path:
    import torch

    from saferl import registry
    from saferl.actors.gradient_worker import make_diff_env
    from saferl.config import ConfigError

    _check_args(args)
    out = Path(args.out) if args.out else Path("runs") / "studies" / f"gbe-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    limit = registry.get_task(args.task).cost_limit
    env = make_diff_env(args.task)
    dtype = resolve_dtype(env, args.dtype)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    summary: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("fn",)}, "dtype": str(dtype)}
    log(f"study gbe on {args.task} ({dtype}), output {out}")
    try:
        if args.parts in ("all", "gbe-abe"):
            t0 = time.perf_counter()
            rows, skipped = run_gbe_abe(env, limit, args, log, dtype)
            if not rows:
                raise ConfigError(f"study error: GBE/ABE: every batch of {args.task} was non-finite "
                                  "(try a shorter --horizon)")
            _write_csv(out / "gbe_abe.csv", rows)
            (out / "gbe_abe.md").write_text(gbe_abe_table(rows, args))
            plot_gbe_abe(rows, args, out / "gbe_abe.png")
            g, a = [r["err_gbe"] for r in rows], [r["err_abe"] for r in rows]
            summary["gbe_abe"] = {
                "seconds": time.perf_counter() - t0, "skipped_batches": skipped, "median_err_gbe": float(np.median(g)),
                "median_err_abe": float(np.median(a)), "share_abe_above_1": float(np.mean(np.array(a) > 1)),
                "share_gbe_above_1": float(np.mean(np.array(g) > 1)),
                "median_err_abe_literal": float(np.median([r["err_abe_literal"] for r in rows])),
                "median_err_abe_stale": float(np.median([r["err_abe_stale"] for r in rows])),
                "share_abe_stale_above_1": float(np.mean([r["err_abe_stale"] > 1 for r in rows]))}
            log(f"GBE/ABE done: median relative error GBE {np.median(g):.3g}, ABE {np.median(a):.3g}")
        if args.parts in ("all", "fobg-zobg"):
            t0 = time.perf_counter()
            rows, skipped = run_fobg_zobg(env, limit, args, log, dtype)
            if not rows:
                raise ConfigError(f"study error: FoBG/ZoBG: every batch of {args.task} was non-finite "
                                  "(try shorter --lengths)")
            _write_csv(out / "fobg_zobg.csv", rows)
            (out / "fobg_zobg.md").write_text(fobg_zobg_tables(rows, args))
            plot_fobg_zobg(rows, args, out / "fobg_zobg.png")
            summary["fobg_zobg"] = {
                "seconds": time.perf_counter() - t0, "skipped_batches": skipped,
                "median_err_fobg": {f"L={L}": float(np.median([r["err_fobg"] for r in rows if r["length"] == L]))
                                    for L in args.lengths},
                "median_err_zobg": {f"L={L}": float(np.median([r["err_zobg"] for r in rows if r["length"] == L]))
                                    for L in args.lengths}}
            log("FoBG/ZoBG done: median relative error by L: " + ", ".join(
                f"L={L} FoBG {summary['fobg_zobg']['median_err_fobg'][f'L={L}']:.3g} / "
                f"ZoBG {summary['fobg_zobg']['median_err_zobg'][f'L={L}']:.3g}" for L in args.lengths))
    finally:
        torch.set_num_threads(threads)
    summary["seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return out
