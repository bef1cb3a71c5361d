"""Lagrange multipliers for  max J_R  s.t.  J_C ≤ b, the one place they are implemented.

Three update rules (``LagrangeParams.kind``), each stepped on an estimate of J_C by the
coordinator's ``dual`` schedule phase, never by a learner's inner loop:

``adam`` (``AdamLagrange``): OmniSafe's ``omnisafe.common.lagrange.Lagrange`` (the rule of the
  Safety Gym reference code, Ray, Achiam & Amodei 2019, which also steps λ with Adam): λ is a
  parameter, the loss −λ (J_C − b) takes one Adam step at rate ``lr`` (default β = (0.9, 0.999),
  ε = 1e-8), then λ is clamped to [0, ``upper``]. Adam normalises the gradient J_C − b, so λ moves
  about ``lr`` per step whatever the scale of the cost. OmniSafe has no upper bound by default;
  here ``upper`` (1e3) is a cap that a run should never reach.
``lagrange`` (``Lagrange``): projected gradient ascent on the dual, λ ← clip(λ + η (J_C − b), 0, upper).
``pid`` (``PIDLagrange``): Stooke, Achiam & Abbeel 2020 (Responsive Safety in RL by PID Lagrangian
  Methods), Algorithm 2: λ = max(0, K_P e + K_I Σe + K_D max(0, Ĵ_C − Ĵ_C,prev)) with e = J_C − b,
  the integral projected to ≥ 0 and the cost smoothed by EMAs.

The cost estimate J_C (``update_from``): with ``window`` 0, the mean cost of the episodes that
ended since the last dual phase (no step when none ended); with ``window`` n > 0, the mean of
the last n episodes that ended, kept across phases (OmniSafe's ``Metrics/EpCost``, a 50-episode
window), so λ steps every phase once any episode has ended. ``warmup`` dual phases leave λ
unchanged first (OmniSafe's off-policy ``warmup_epochs``), and ``per_gradient_step`` takes one
optimiser step per learner gradient step since the last phase (OmniSafe's off-policy learners
step λ after every update).

``OmniSafeLagrangeParams`` / ``OmniSafeOffPolicyLagrangeParams`` carry OmniSafe's on-/off-policy
defaults (the ``*_lag`` baselines' field types, so a config that gives only some fields keeps the
rest of OmniSafe's rule); with ``kind: lagrange | pid`` the fields left out take the plain defaults.
"""
from __future__ import annotations

from collections import deque

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from saferl.learners.base import Learner
from saferl.metric_keys import LAGRANGE_MULTIPLIER


class LagrangeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field("lagrange", pattern="^(adam|lagrange|pid)$",
                      description="adam (OmniSafe), lagrange (plain projected ascent) or pid (Stooke et al.)")
    init: float = Field(0.0, ge=0)
    lr: float = Field(0.035, gt=0, description="dual step size (adam, lagrange)")
    kp: float = Field(0.1, ge=0)
    ki: float = Field(0.01, ge=0)
    kd: float = Field(0.01, ge=0)
    d_delay_ema: float = Field(0.9, ge=0, lt=1, description="EMA of J_C for the derivative term")
    upper: float = Field(1e3, gt=0, description="cap on λ")
    window: int = Field(0, ge=0, description="J_C over the last `window` ended episodes (OmniSafe: 50); "
                        "0: the episodes ended since the last dual phase")
    warmup: int = Field(0, ge=0, description="dual phases that leave λ unchanged first")
    per_gradient_step: bool = Field(False, description="one step per learner gradient step since the "
                                    "last dual phase (OmniSafe's off-policy learners)")


class OmniSafeLagrangeParams(LagrangeParams):
    """OmniSafe's on-policy ``lagrange_cfgs`` (PPOLag.yaml, TRPOLag.yaml, CUP.yaml): Adam at 0.035
    from λ₀ = 0.001, J_C over the last 50 episodes."""
    kind: str = Field("adam", pattern="^(adam|lagrange|pid)$",
                      description="adam (OmniSafe), lagrange (plain projected ascent) or pid (Stooke et al.)")
    init: float = Field(0.001, ge=0)
    lr: float = Field(0.035, gt=0, description="dual step size (adam, lagrange)")
    window: int = Field(50, ge=0, description="J_C over the last `window` ended episodes (OmniSafe: 50); "
                        "0: the episodes ended since the last dual phase")

    @model_validator(mode="after")
    def _plain_defaults_for_other_kinds(self):
        """OmniSafe's defaults belong to its Adam rule: with ``kind`` lagrange or pid, the fields a
        config leaves out take ``LagrangeParams``' plain defaults (λ₀ 0, step 0.035, no window,
        no warm-up, one step per phase)."""
        if self.kind != "adam":
            plain = LagrangeParams()
            for name in ("init", "lr", "window", "warmup", "per_gradient_step"):
                if name not in self.model_fields_set:
                    object.__setattr__(self, name, getattr(plain, name))
        return self


class OmniSafeOffPolicyLagrangeParams(OmniSafeLagrangeParams):
    """OmniSafe's off-policy ``lagrange_cfgs`` defaults (SACLag.yaml, TD3Lag.yaml, DDPGLag.yaml):
    Adam at 1e-5 from 0.001, one step per gradient step, after 100 warm-up epochs (the dual phases
    of the first 101 iterations: OmniSafe steps λ once ``epoch > warmup_epochs``)."""
    lr: float = Field(1e-5, gt=0, description="dual step size (adam, lagrange)")
    warmup: int = Field(101, ge=0, description="dual phases that leave λ unchanged first")
    per_gradient_step: bool = Field(True, description="one step per learner gradient step since the "
                                    "last dual phase (OmniSafe's off-policy learners)")


class Lagrange:
    """Plain projected gradient ascent; the base of the other rules (cost window, warm-up)."""

    def __init__(self, p: LagrangeParams):
        self.p, self.value = p, p.init
        self.costs: deque = deque(maxlen=p.window or None)
        self.phases = 0

    def update(self, cost: float, limit: float) -> float:
        """One step on J_C = ``cost``."""
        self.value = min(max(0.0, self.value + self.p.lr * (cost - limit)), self.p.upper)
        return self.value

    def update_from(self, episode_costs: list[float] | None, limit: float, steps: int = 1) -> float | None:
        """The dual phase: J_C from ``episode_costs`` (the costs of the episodes ended since the last
        phase) and the window, then, after the warm-up, ``steps`` updates with ``per_gradient_step``
        (none when no gradient step was taken), else one. Returns λ, or None when there is no J_C
        yet (λ unchanged)."""
        self.phases += 1
        episode_costs = list(episode_costs or [])
        if self.p.window:
            self.costs.extend(episode_costs)
            episode_costs = list(self.costs)
        if not episode_costs:
            return None
        if self.phases <= self.p.warmup:
            return self.value
        cost = sum(episode_costs) / len(episode_costs)
        for _ in range(max(0, steps) if self.p.per_gradient_step else 1):
            self.update(cost, limit)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "costs": list(self.costs), "phases": self.phases}

    def load_state_dict(self, sd: dict) -> None:
        self.value = sd["value"]
        self.costs = deque(sd.get("costs", []), maxlen=self.p.window or None)
        self.phases = sd.get("phases", 0)


class AdamLagrange(Lagrange):
    """OmniSafe's rule: λ an ``nn.Parameter``, loss −λ (J_C − b), ``torch.optim.Adam(lr)``, clamp to
    [0, upper]. ``value`` reads and writes the parameter; the Adam moments are checkpointed."""

    def __init__(self, p: LagrangeParams):
        self.param = torch.nn.Parameter(torch.tensor(max(p.init, 0.0), dtype=torch.float32))
        self.opt = torch.optim.Adam([self.param], lr=p.lr)
        super().__init__(p)

    @property
    def value(self) -> float:
        return float(self.param.item())

    @value.setter
    def value(self, v: float) -> None:
        with torch.no_grad():
            self.param.fill_(float(v))

    def update(self, cost: float, limit: float) -> float:
        self.opt.zero_grad()
        loss = -self.param * (cost - limit)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.param.clamp_(0.0, self.p.upper)
        return self.value

    def state_dict(self) -> dict:
        return {**super().state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.opt.load_state_dict(sd["opt"])


class PIDLagrange(Lagrange):
    def __init__(self, p: LagrangeParams):
        super().__init__(p)
        self.integral = p.init / p.ki if p.ki > 0 else 0.0
        self.prev_cost: float | None = None

    def update(self, cost: float, limit: float) -> float:
        p = self.p
        error = cost - limit
        self.integral = max(0.0, self.integral + error)
        prev = cost if self.prev_cost is None else self.prev_cost
        derivative = max(0.0, cost - prev)
        self.prev_cost = p.d_delay_ema * prev + (1 - p.d_delay_ema) * cost
        self.value = min(max(0.0, p.kp * error + p.ki * self.integral + p.kd * derivative), p.upper)
        return self.value

    def state_dict(self) -> dict:
        return {**super().state_dict(), "integral": self.integral, "prev_cost": self.prev_cost}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.integral, self.prev_cost = sd["integral"], sd["prev_cost"]


def make_multiplier(p: LagrangeParams) -> Lagrange:
    return {"pid": PIDLagrange, "adam": AdamLagrange}.get(p.kind, Lagrange)(p)


class LagrangianLearner(Learner):
    """Mixin of the learners with one Lagrange multiplier λ (the ``*_lag`` baselines and the
    algorithms built on them, SHAC-Lag, BPTT-Lag), the one place that owns it: ``init_multiplier``
    builds λ from ``params.lagrange``, ``phase_dual`` is the coordinator's ``dual`` phase, and
    ``state_dict`` / ``load_state_dict`` add its state to the learner's. Learners that count
    their gradient steps (``COUNTS_GRADIENT_STEPS``: the off-policy family) add them to
    ``dual_steps_due``, which ``per_gradient_step`` turns into as many steps of λ."""

    cost_limit: float
    multiplier: Lagrange
    dual_steps_due: int = 0

    def init_multiplier(self, p: LagrangeParams) -> None:
        if p.per_gradient_step and not getattr(self, "COUNTS_GRADIENT_STEPS", False):
            raise ValueError(f"lagrange.per_gradient_step: {type(self).__name__} takes no gradient steps "
                             "between dual phases to count (an off-policy learner's option)")
        self.multiplier, self.dual_steps_due = make_multiplier(p), 0

    def phase_dual(self, signals: dict) -> dict:
        """λ's step on the episodes ended since the last dual phase (``dual_phase``); with
        ``per_gradient_step``, one per gradient step since then."""
        steps, self.dual_steps_due = self.dual_steps_due, 0
        return dual_phase(self.multiplier, signals, self.cost_limit, steps)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "multiplier": self.multiplier.state_dict(),
                "dual_steps_due": self.dual_steps_due}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.multiplier.load_state_dict(sd["multiplier"])
        self.dual_steps_due = int(sd.get("dual_steps_due", 0))


def dual_phase(multiplier: Lagrange, signals: dict, limit: float, steps: int = 1) -> dict:
    """A learner's ``phase_dual``: the multiplier's step on the phase's signals
    (``episode_costs``: the costs of the episodes ended since the last phase; ``episode_cost``,
    their mean, when the list is absent). Returns {"lagrange_multiplier": λ}, or {} without J_C."""
    costs = signals.get("episode_costs")
    if costs is None:
        costs = [] if signals.get("episode_cost") is None else [signals["episode_cost"]]
    lam = multiplier.update_from(costs, limit, steps)
    return {} if lam is None else {LAGRANGE_MULTIPLIER: lam}
