"""What the coordinator expects of a learner (the learner actor hosts one of these).

A learner owns its networks, optimisers and multipliers, runs on ``device`` (``cuda`` when the
actor was granted a GPU). ``Learner`` declares the contract every algorithm implements:

    policy_state()          weights the hosts act with (numpy dict for env hosts,
                            torch state dicts for gradient workers)
    update(batches, ...)    one policy/critic update from host batches, replay minibatches or
                            worker results; keyword extras by kind: ``clock`` (off-policy: the
                            global gradient step and the step phases' intervals), ``evaluations``
                            (CGPO: the workers' re-rolls of ``propose``'s step)
    phase(name, signals)    a scheduled phase (e.g. ``dual``), run when the coordinator says
    state_dict() / load_state_dict()   everything needed to resume bit-for-bit: the networks and
                            optimisers named in ``MODULES`` and the RNG states here; a subclass or
                            mixin with more to keep extends both through ``super()``

and, per kind, what the coordinator asks before the first iteration: ``offpolicy_setup()``
(off-policy learners: buffer and update-to-data schedule) or ``gradient_setup()`` (gradient
learners: network shapes and window length for the workers). Two optional parts, used when
present: ``propose(results)`` (a step the workers re-roll before ``update`` commits it: CGPO's
ratio test) and ``observe_rollouts(batches)`` (an off-policy learner sees each iteration's rollouts
before its update: FAC-SIS keeps them for its index loss and returns per-episode metrics only it can
compute, the safe-action violations).
"""
from __future__ import annotations

import abc
import math
import random
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from saferl.batch import NumpyPolicy


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvSpec(BaseModel):
    obs_dim: int
    act_dim: int
    act_low: list[float]
    act_high: list[float]
    max_episode_steps: int
    n_hazards: int = 0  # > 0: the observation ends with the geometry tail (envs/point_hazard.py)

    @classmethod
    def of(cls, spec: dict) -> EnvSpec:
        """From an env host's ``spec()`` (numpy bounds, extra keys) or a plain dict."""
        fields = {k: spec[k] for k in cls.model_fields if k in spec}
        bounds = {k: np.broadcast_to(np.asarray(fields[k], np.float64), (fields["act_dim"],)).tolist()
                  for k in ("act_low", "act_high")}
        return cls(**{**fields, **bounds})

    @classmethod
    def of_env(cls, env) -> EnvSpec:
        """From an env object's attributes (a vector or differentiable env)."""
        return cls.of({k: getattr(env, k) for k in cls.model_fields if hasattr(env, k)})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def guarded_step(opt: torch.optim.Optimizer, params, max_grad_norm: float | None = None) -> bool:
    """Clip (``max_grad_norm``) and take ``opt``'s step on the gradients already in ``.grad``,
    unless one of them is NaN/Inf: then the grads are cleared, nothing moves, and it returns
    False. The check ``Learner.descend`` and ``Learner.step_grads`` share (also used by the
    world model's fit, which is no Learner)."""
    params = [p for p in params if p.grad is not None]
    if max_grad_norm is not None:
        ok = clip_grad_norm(params, max_grad_norm)
    else:
        ok = all(bool(torch.isfinite(p.grad).all()) for p in params)
    if not ok:
        opt.zero_grad()
        return False
    opt.step()
    return True


def guarded_descend(opt: torch.optim.Optimizer, loss: torch.Tensor, params, max_grad_norm: float | None = None,
                    backward=None) -> bool:
    """Zero grads, backward, clip (``max_grad_norm``), step, unless the loss or a gradient is
    NaN/Inf (then nothing moves and it returns False). ``backward`` replaces ``loss.backward()``
    where part of the gradient is written by hand. ``Learner.descend`` counts the refusals; this
    counts nothing, so a second thread may call it (``onpolicy_base.CriticLane``)."""
    opt.zero_grad()
    if not math.isfinite(loss.item()):  # a scalar, as backward() needs
        return False
    (backward or loss.backward)()
    return guarded_step(opt, params, max_grad_norm)


def clip_grad_norm(params: list, max_norm: float) -> bool:
    """``torch.nn.utils.clip_grad_norm_`` (the same total norm and factor max_norm / (norm + 1e-6)),
    except that the gradients are multiplied only when the factor is below 1 (torch multiplies by
    min(factor, 1) to spare a host sync; a product with 1 changes nothing). Returns whether the
    total norm is finite, read from the factor in one sync: NaN for a NaN norm, 0 for an infinite
    one, > 0 otherwise; nothing is scaled when it is not."""
    grads = [p.grad for p in params]
    if not grads:
        return True
    factor = clip_factor(total_norm(grads), max_norm)
    f = factor.item()
    if not f > 0:
        return False
    if f < 1:
        torch._foreach_mul_(grads, factor)
    return True


def total_norm(grads: list) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, as ``clip_grad_norm_`` takes it (0-d, on their device)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@torch.no_grad()
def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s factor max_norm / (norm + 1e-6), at most 1 (a product with 1 changes
    nothing); NaN for a NaN norm, 0 for an infinite one."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


class Learner(abc.ABC):
    Params = Params
    policy: Any  # every learner's acting network (``export_numpy`` for env hosts)
    skipped_updates = 0  # optimiser steps refused for a NaN/Inf loss or gradient (``descend``)
    solver_failures = 0  # inner solves (e.g. CVPO's E-step dual) that failed and fell back

    def descend(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params, max_grad_norm: float | None = None,
                backward=None) -> bool:
        """The guarded optimiser step (``guarded_descend``): a NaN/Inf loss or gradient skips the
        step (parameters and optimiser state untouched, grads cleared), counts it in
        ``skipped_updates`` (``health/skipped_updates``) and returns False. ``backward`` replaces
        ``loss.backward()`` where part of the loss's gradient is written by hand (the loss's value
        is still what the guard checks)."""
        if guarded_descend(opt, loss, params, max_grad_norm, backward):
            return True
        self.skipped_updates += 1
        return False

    def step_grads(self, opt: torch.optim.Optimizer, params, max_grad_norm: float | None = None) -> bool:
        """``descend`` for gradients set by hand (the analytic-gradient learners write −(g − λq)
        into ``.grad``): the same clip, NaN/Inf check, skip and count."""
        if guarded_step(opt, params, max_grad_norm):
            return True
        self.skipped_updates += 1
        return False

    def __init__(self, params, env: EnvSpec, cost_limit: float, device: torch.device, seed: int):
        self.p, self.env, self.cost_limit, self.device = params, env, cost_limit, device
        seed_everything(seed)

    @abc.abstractmethod
    def policy_state(self):
        """The weights the hosts or gradient workers act with."""

    @abc.abstractmethod
    def update(self, batches: list, **extras) -> dict:
        """One update; returns its statistics (the iteration's metrics row)."""

    # -- checkpoints: the one idiom. The state of ``MODULES`` (networks and optimisers, by
    # attribute name; None ones skipped) and the RNG states; a subclass (or mixin) with more to
    # keep extends both methods through ``super()``.
    MODULES: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit-for-bit (RNG states included)."""
        return {**{k: m.state_dict() for k in self.MODULES if (m := getattr(self, k)) is not None},
                "rng": self.rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        for k in self.MODULES:
            if (m := getattr(self, k)) is not None:
                m.load_state_dict(sd[k])
        self.set_rng_state(sd["rng"])

    def phase(self, name: str, signals: dict) -> dict:
        """Phase ``name`` (its method ``phase_<name>``) on the coordinator's signals."""
        return getattr(self, f"phase_{name}")(signals)

    def rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}

    def set_rng_state(self, sd: dict) -> None:
        torch.set_rng_state(sd["torch"])
        np.random.set_state(sd["numpy"])
        random.setstate(sd["python"])

    def numpy_policy(self) -> NumpyPolicy:
        """Weights for numpy inference in env hosts (rollouts and evaluation)."""
        return self.policy.export_numpy()
