"""FAC-SIS: feasible actor-critic with safety-index synthesis ("Joint Synthesis of Safety
Certificate and Safe Control Policy"), and FAC with a fixed safety index (its baselines φ0, φ_h, φ_F).

SAC (``learners/sac_lag.py``: twin reward critics, auto-α, polyak targets) under the state-wise
constraint Δφ(s, s') = φ(s') − max(φ(s) − η_D, 0) ≤ 0 for every visited s (eq 2), with the
safety index φ of ``learners/safety_index.py`` (eq 11). Per minibatch (1-step transitions):

    Q_φ(s, a) ← Δφ_ζ(s, s')                                  (the cost critic learns the one-step quantity)
    policy     J_π = E[α log π(ã|s) − min_j Q_Rj(s, ã) + λ_ξ(s) Q_φ(s, ã)]          (eq 3, App. B.1)
    multiplier J_λ = E[λ_ξ(s) max(Q_φ(s, ã), f)],  ascended (eq 12; λ_ξ(s) = min(softplus(·), λ_max))
    index      J_ζ = E[λ_ξ(s) ReLU(Δφ_ζ(s, s'))],  descended (eq 4 weighted as eq 13; then σ, k ≥ 0, n ≥ 0.1),
               s' reached by the current policy π_θ (eq 4's s' under π*, eq 13's Δφ^{π_θ})

The policy (with α), multiplier and index steps run only at the gradient steps their intervals
divide (Algorithm 1; Table 4: 3, 12, 24). Those intervals are ``schedule.step_phases`` of the
config (``policy``, ``multiplier``, ``safety_index``): the coordinator owns the gradient-step
clock and tells each update which phases are due. Every gradient is clipped to norm 1 (eq 10's
β min(1, 1/‖G‖)) and every step size anneals linearly from its start to its end value over
``lr_anneal_steps`` gradient steps (Table 4).

**Which step each parameter takes.** Eq 10 is clipped SGD, ζ ← ζ − β min(1, 1/‖G‖) G, and that is
ζ's step (``index_optimizer: sgd``, the default): its size follows the violations, so the index
moves while the policy's transitions violate and stops when they no longer do. The networks' clipped
gradients take Adam steps instead, as in the authors' reference code (plain SGD at Table 4's rates
would barely move a network). ``index_optimizer: adam`` is the reference code's choice for ζ too:
Adam moves σ, k, n by about β per step whatever the gradient's size, and its momentum carries
them on after the violations stop; at the shipped step size that drives the index to the box's
corner before the policy is safe (docs/results/facsis.md). ``learn_index: false`` is FAC with the
fixed index (Table 2's φ0, φ_h, φ_F through ``safety_index.preset``).

**Index step size.** An index step moves each of σ, k, n by at most its step size β (clipped SGD:
β min(1, 1/‖G‖) ‖G‖ ≤ β; Adam: about β), so over a run of G gradient steps the index can travel at
most Σ_t β_ζ(t) over the G / m_φ index steps
(``index_travel_bound``). At Table 4's 8e-6 → 1e-6 that is 0.056 over 300k gradient steps and 0.375
over 2M, while Table 2's synthesised index lies 0.20 (σ), 0.22 (k) and 0.85 (n) from φ_h: with
Table 4's rate the index cannot reach the paper's regime within such budgets. The shipped configs
keep Table 4's 8:1 annealing ratio and intervals and scale β_ζ so that the bound is about 2 over
the config's budget (index_lr in each config); the comparison of step sizes across the timescales
is not what Assumption 1 orders (that is their decay, and λ's network has thousands of weights
moving together while ζ has three scalars).

**Logged violations.** ``episode/safe_action_violations`` is Fig. 4's quantity: per finished
training episode, the number of steps with Δφ(s, s') > 0 under the index in force (the reference
evaluator counts the same per episode); ``observe_rollouts`` computes it from the hosts' rollout
batches. ``fac/replay_violation_share`` is the violating share of a replayed minibatch and
``fac/replay_violation_share_pi`` the share with Q_φ(s, π(s)) > 0.

Choices the paper leaves open, taken from the reference code where it has them: λ_max = 50
(Lemma 6 needs a finite cap), Q_φ floored at f in the multiplier loss (otherwise the many states
far from every hazard, with Δφ ≪ 0, drive λ(s) to 0 everywhere before the network tells states
apart). The reference code floors at −0.3; the default is −0.003, a floor small against the Δφ of
a violating step on the point/hazard task (docs/results/facsis.md records why). λ(s) starts at 1.
ζ is projected onto the reference code's box after each step (``learners/safety_index.py``). The index reads the
observation's geometry tail, so the task must be registered with one (``EnvSpec.n_hazards`` > 0).

**Whose transitions the index loss uses.** Eq 4 takes s' under the optimal safe policy and eq 13 under
the current π_θ; the reference code (an on-policy learner) takes its latest epoch's rollouts. On
replayed transitions, most of them from earlier, worse policies, flattening φ lowers the loss
everywhere and the index runs to the box's corner (docs/results/facsis.md). So by default
(``index_data: rollouts``) each index step draws ``batch_size`` transitions uniformly from the latest
iteration's rollouts, which the policy exported before that iteration's update produced (the learner
sees them through ``observe_rollouts``). ``index_data: replay`` keeps the replayed minibatch. The
ReLU of eq 4 stays (eq 13 omits it, but with a learned λ(s) that is positive everywhere the
unrectified loss rewards making Δφ more negative where the constraint already holds); it is
weighted by λ(s) as eq 13 does.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from saferl.batch import next_observations
from saferl.learners import base
from saferl.learners.networks import ACTIVATIONS, TanhGaussianPolicy, mlp, polyak
from saferl.learners.offpolicy_base import OffPolicyLearner, OffPolicyParams
from saferl.learners.safety_index import IndexParams, SafetyIndex
from saferl.metric_keys import LAGRANGE_MULTIPLIER

STEP_PHASES = ("policy", "multiplier", "safety_index")


class FACParams(OffPolicyParams):
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    activation: str = Field("elu", pattern="^(relu|elu|tanh)$", description="Table 4: ELU")
    buffer_capacity: int = Field(500_000, gt=0)
    policy_lr: tuple[float, float] = Field((3e-5, 1e-6), description="actor step size, start → end (Table 4)")
    critic_lr: tuple[float, float] = Field((8e-5, 1e-6), description="critics (Table 4)")
    multiplier_lr: tuple[float, float] = Field((5e-6, 5e-6), description="multiplier net (Table 4)")
    alpha_lr: tuple[float, float] = Field((8e-5, 8e-6), description="α (Table 4)")
    index_lr: tuple[float, float] = Field((8e-6, 1e-6), description="ζ = (σ, k, n) (Table 4)")
    lr_anneal_steps: int = Field(1_000_000, gt=0, description="gradient steps of the linear annealing")
    init_alpha: float = Field(1.0, gt=0)
    tau: float = Field(0.005, gt=0, le=1)
    grad_clip: float = Field(1.0, gt=0, description="eq 10: every gradient clipped to this norm")
    max_grad_norm: float = Field(1.0, gt=0, description="critic gradient clip (eq 10)")
    lambda_max: float = Field(50.0, gt=0, description="cap of λ(s) (Lemma 6; the reference code's 50)")
    violation_floor: float = Field(-0.003, le=0, description="Q_φ clipped below at this in the multiplier "
                                   "loss, so far-from-hazard states do not drive λ to 0 everywhere (module docstring)")
    init_lambda: float = Field(1.0, gt=0, description="λ(s) at initialisation (the output bias; paper: open)")
    learn_index: bool = Field(True, description="FAC-SIS; false: FAC with the fixed index")
    index_optimizer: str = Field("sgd", pattern="^(adam|sgd)$",
                                 description="ζ's step: sgd (eq 10's clipped step ζ ← ζ − β min(1, 1/‖G‖) G) or "
                                             "adam (the reference code's; module docstring)")
    index_data: str = Field("rollouts", pattern="^(rollouts|replay)$",
                            description="the index loss's transitions: the latest rollouts (π_θ's own, eq 13) "
                                        "or the replayed minibatch (module docstring)")
    safety_index: IndexParams = Field(default_factory=IndexParams)


def index_travel_bound(index_lr: tuple[float, float], lr_anneal_steps: int, gradient_steps: int, every: int) -> float:
    """Σ β_ζ(g) over the index steps g = every, 2·every, … ≤ ``gradient_steps`` with the linear annealing of
    ``FACSIS._anneal`` (β at gradient step g is the value after g − 1 steps): the most Adam can move
    each of σ, k, n over a run (its per-step move is at most about its step size)."""
    lo, hi = index_lr
    g = np.arange(every, gradient_steps + 1, every, dtype=np.float64)
    return float(np.sum(lo + (hi - lo) * np.minimum(1.0, (g - 1) / lr_anneal_steps)))


def index_lr_for_travel(travel: float, lr_anneal_steps: int, gradient_steps: int, every: int,
                        ratio: float = 8.0) -> tuple[float, float]:
    """The (start, end = start / ``ratio``) index step size whose ``index_travel_bound`` over the run is
    ``travel``: the rule behind the shipped configs' ``index_lr`` (travel ≈ 2, Table 4's 8:1 ratio)."""
    unit = index_travel_bound((1.0, 1.0 / ratio), lr_anneal_steps, gradient_steps, every)
    if unit <= 0:
        raise ValueError(f"no index step in {gradient_steps} gradient steps at interval {every}")
    return travel / unit, travel / unit / ratio


class Multiplier(torch.nn.Module):
    """λ_ξ(s) = min(softplus(MLP(s)), λ_max) ≥ 0."""

    def __init__(self, obs_dim: int, hidden: list[int], activation: str, lambda_max: float, init: float):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, 1], activation=ACTIVATIONS[activation], out_gain=0.01)
        self.lambda_max = lambda_max
        with torch.no_grad():  # softplus⁻¹(init): λ starts at ``init`` everywhere (the last layer is ~0)
            self.net[-1].bias.fill_(float(np.log(np.expm1(init))))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(self.net(obs).squeeze(-1)).clamp(max=self.lambda_max)


class FACSIS(OffPolicyLearner):
    Params = FACParams
    MODULES = ("policy", "q_r", "q_c", "q_r_target", "q_c_target", "multiplier_net", "index",
               "pi_opt", "q_opt", "alpha_opt", "lam_opt", "index_opt")

    def __init__(self, params: FACParams, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        p, d, a = params, env.obs_dim, env.act_dim
        if env.n_hazards <= 0:
            from saferl.config import ConfigError
            raise ConfigError("config error: task: FAC-SIS needs a task whose observation ends with the hazard "
                              "geometry (e.g. PointHazard-D1-v0, SafetyPointGoal1-SIS-v0)")
        self.policy = TanhGaussianPolicy(d, a, p.hidden, p.activation, p.init).to(device)
        self.build_critics(2, p.activation, lr=p.critic_lr[0])  # q_c is Q_φ
        self.multiplier_net = Multiplier(d, p.hidden, p.activation, p.lambda_max, p.init_lambda).to(device)
        self.index = SafetyIndex(p.safety_index, env.n_hazards).to(device)
        self.log_alpha = torch.tensor(float(np.log(p.init_alpha)), device=device, requires_grad=True)
        self.pi_opt = torch.optim.Adam(self.policy.parameters(), lr=p.policy_lr[0])
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=p.alpha_lr[0])
        self.lam_opt = torch.optim.Adam(self.multiplier_net.parameters(), lr=p.multiplier_lr[0])
        index_opt = torch.optim.Adam if p.index_optimizer == "adam" else torch.optim.SGD
        self.index_opt = index_opt(self.index.parameters(), lr=p.index_lr[0])
        self.target_entropy = -float(a)
        self.steps = 0  # gradient steps taken (the annealing clock)
        self.counts = dict.fromkeys(STEP_PHASES, 0)  # sub-updates run so far
        self.last_lambda = 0.0
        self.ep_violations: list[np.ndarray] = []  # per host, per env: Δφ > 0 steps of the running episode
        # the latest iteration's valid transitions (s, s'), π_θ's own: the index loss's data. Not checkpointed:
        # every iteration replaces them before its update.
        self.rollout_pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def _anneal(self) -> None:
        p, frac = self.p, min(1.0, self.steps / self.p.lr_anneal_steps)
        for opt, (lo, hi) in ((self.pi_opt, p.policy_lr), (self.q_opt, p.critic_lr), (self.lam_opt, p.multiplier_lr),
                              (self.alpha_opt, p.alpha_lr), (self.index_opt, p.index_lr)):
            for group in opt.param_groups:
                group["lr"] = lo + (hi - lo) * frac

    def _clipped_step(self, opt, loss, params) -> bool:
        """eq 10's clipped step through ``descend``: a NaN/Inf loss or gradient is skipped and counted."""
        return self.descend(opt, loss, params, self.p.grad_clip)

    def index_pairs(self, b: dict, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, s', λ(s)) for the index loss: ``batch_size`` pairs drawn from the latest rollouts, or the
        replayed minibatch ``b`` (``index_data``; the replayed minibatch also before any rollout is seen)."""
        if self.p.index_data == "replay" or self.rollout_pairs is None:
            return b["obs"], b["next_obs"], lam
        obs, nxt = self.rollout_pairs
        idx = torch.randint(len(obs), (self.p.batch_size,)).to(obs.device)
        with torch.no_grad():
            lam = self.multiplier_net(obs[idx])
        return obs[idx], nxt[idx], lam

    def index_step(self, b: dict, lam: torch.Tensor) -> float:
        """One clipped step on J_ζ = E[λ(s) ReLU(Δφ_ζ(s, s'))] (eq 4 weighted as eq 13), then the projection."""
        obs, nxt, lam = self.index_pairs(b, lam)
        loss = (lam * torch.relu(self.index.delta(obs, nxt))).mean()
        if self._clipped_step(self.index_opt, loss, list(self.index.parameters())):
            self.index.project()
        return loss.item()

    def step(self, b: dict, due: set[str] = frozenset(STEP_PHASES)) -> dict:
        p, alpha = self.p, self.log_alpha.exp().detach()
        self._anneal()
        self.steps += 1
        with torch.no_grad():
            a2, logp2 = self.policy.sample(b["next_obs"])
            delta = self.index.delta(b["obs"], b["next_obs"])
        out = {"loss_q": self.critic_step(b, a2, -alpha * logp2, y_c=delta),
               "fac/replay_violation_share": (delta > 0).float().mean().item()}
        a_new, logp = self.policy.sample(b["obs"])
        q_phi = self.q_c(b["obs"], a_new)[0]
        lam = self.multiplier_net(b["obs"])
        out["fac/replay_violation_share_pi"] = (q_phi > 0).float().mean().item()
        if "policy" in due:
            q_r = self.q_r(b["obs"], a_new).min(0).values
            loss_pi = (alpha * logp - q_r + lam.detach() * q_phi).mean()
            self._clipped_step(self.pi_opt, loss_pi, list(self.policy.parameters()))
            loss_alpha = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()  # α with π (SAC eq 18)
            self._clipped_step(self.alpha_opt, loss_alpha, [self.log_alpha])
            out["loss_pi"] = loss_pi.item()
        if "multiplier" in due:
            loss_lam = -(lam * q_phi.detach().clamp(min=p.violation_floor)).mean()
            self._clipped_step(self.lam_opt, loss_lam, list(self.multiplier_net.parameters()))
        if "safety_index" in due and p.learn_index:
            out["loss_index"] = self.index_step(b, lam.detach())
        for name in due:
            self.counts[name] += 1
        polyak(self.q_r_target, self.q_r, p.tau)
        polyak(self.q_c_target, self.q_c, p.tau)
        if torch.isfinite(lam).all():  # a NaN batch leaves the logged λ as it was
            self.last_lambda = lam.mean().item()
        return {**out, "alpha": alpha.item(), "fac/q_phi": q_phi.mean().item()}

    def offpolicy_setup(self) -> dict:
        return {**super().offpolicy_setup(), "observe_rollouts": True}

    @torch.no_grad()
    def observe_rollouts(self, batches: list[dict]) -> list[dict]:
        """Keep this iteration's valid transitions for the index loss (when it reads them), and return Fig. 4's
        per-episode count of safe-action violations (Δφ(s, s') > 0 under the current index) for every
        episode that ends in the hosts' rollout ``batches`` ([T, N] arrays, as ``EnvHost.rollout``
        returns them, one per host in a fixed order). Episodes span fragments: each host's envs keep a
        running count. Episodes skipped for bad data (invalid steps) are dropped, as the hosts drop
        them from their summaries; one dict per counted episode."""
        out, pairs = [], []
        keep_pairs = self.p.learn_index and self.p.index_data == "rollouts"  # only the index loss reads them
        if len(self.ep_violations) != len(batches):
            self.ep_violations = [np.zeros(b["reward"].shape[1], np.int64) for b in batches]
        for h, batch in enumerate(batches):
            # a copy: arrays from Ray's object store are read-only
            obs = torch.as_tensor(np.array(batch["obs"], np.float32), device=self.device)
            nxt = torch.as_tensor(next_observations(batch), dtype=torch.float32, device=self.device)
            viol = (self.index.delta(obs, nxt) > 0).cpu().numpy()
            valid = np.asarray(batch["valid"]) if "valid" in batch else np.ones(viol.shape, bool)
            if keep_pairs:
                keep = torch.as_tensor(np.array(valid, bool), device=self.device)
                pairs.append((obs[keep], nxt[keep]))
            end = np.asarray(batch["terminated"]) | np.asarray(batch["truncated"])
            count = self.ep_violations[h]
            for t in range(viol.shape[0]):
                count += viol[t] & valid[t]
                for i in np.flatnonzero(end[t]):
                    if valid[t, i]:
                        out.append({"safe_action_violations": int(count[i])})
                    count[i] = 0
        if pairs and sum(len(o) for o, _ in pairs):
            self.rollout_pairs = (torch.cat([o for o, _ in pairs]), torch.cat([n for _, n in pairs]))
        return out

    def dual_metrics(self) -> dict:
        return {LAGRANGE_MULTIPLIER: self.last_lambda, **{f"fac/{k}": v for k, v in self.index.values().items()},
                **{f"updates/{k}": float(v) for k, v in self.counts.items()}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_alpha": self.log_alpha.detach().clone(), "steps": self.steps,
                "counts": dict(self.counts), "last_lambda": self.last_lambda,
                "ep_violations": [c.copy() for c in self.ep_violations]}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        with torch.no_grad():
            self.log_alpha.copy_(sd["log_alpha"])
        self.steps, self.counts, self.last_lambda = sd["steps"], dict(sd["counts"]), sd["last_lambda"]
        self.ep_violations = [np.array(c, np.int64) for c in sd.get("ep_violations", [])]


class FACParamsFixed(FACParams):
    learn_index: bool = Field(False, description="FAC: the index stays as configured")

    def model_post_init(self, _ctx) -> None:
        if self.learn_index:
            raise ValueError("learn_index: fac keeps its safety index fixed; use fac_sis to learn it")


class FAC(FACSIS):
    """FAC (Ma et al. 2021) with a fixed safety index: FAC-SIS without the index phase."""
    Params = FACParamsFixed
