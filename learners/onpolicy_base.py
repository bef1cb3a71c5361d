"""The on-policy family's base (PPO-Lag, TRPO-Lag, CPO, FOCOPS, CUP, sTRPO, ...): the actor-critic
learner and the parts of its update as functions: host batches assembled into tensors, reward and
cost advantages from separate critics (GAE, ``learners/gae.py``), the Lagrangian advantage with
OmniSafe's scaling, the clipped surrogate, the critics' step, minibatches and Adam."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field

from saferl.batch import next_observations
from saferl.learners import base
from saferl.learners.critic_process import CriticProcess, ProcessLane
from saferl.learners.gae import gae
from saferl.learners.networks import GaussianPolicy, mlp


def assemble(batches: list[dict], device: torch.device) -> dict:
    """Concatenate host batches along the env axis; build next_obs [T, N, d] with the final
    observation of ended episodes substituted (the stored next obs is already a reset).
    ``valid`` [T, N] is False on the steps of episodes the hosts skipped for NaN/Inf data (zeroed,
    terminated): GAE runs on the whole grid, then ``flat`` drops them from everything trained on."""
    out = {}
    for key in ("obs", "act", "logp", "reward", "cost", "terminated", "truncated", "valid"):
        arrays = [b[key] if key != "valid" or key in b else np.ones(b["reward"].shape, bool) for b in batches]
        out[key] = torch.as_tensor(np.concatenate(arrays, axis=1), device=device)
    nxt = np.concatenate([next_observations(b) for b in batches], axis=1)
    out["next_obs"] = torch.as_tensor(nxt, device=device)
    out["end"] = out["terminated"] | out["truncated"]
    return out


def flat(batch: dict, x: torch.Tensor) -> torch.Tensor:
    """[T, N, ...] -> [M, ...]: the valid steps, in row-major order (all of them in a batch
    without a ``valid`` mask)."""
    return x[batch["valid"]] if "valid" in batch else x.reshape(-1, *x.shape[2:])


@torch.no_grad()
def advantages(critic: torch.nn.Module, norm, batch: dict, signal: str, gamma: float, lam: float):
    """GAE advantages and value targets of ``signal``, flat over the valid steps ([M] each)."""
    v = critic(norm(batch["obs"])).squeeze(-1)
    v_next = critic(norm(batch["next_obs"])).squeeze(-1) * (~batch["terminated"])
    adv, ret = gae(batch[signal], v, v_next, batch["end"], gamma, lam)
    return flat(batch, adv), flat(batch, ret)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """The per-batch z-score (x − mean) / (std + 1e-8)."""
    return (x - x.mean()) / (x.std() + 1e-8)


def lagrangian_advantage(adv_r: torch.Tensor, adv_c: torch.Tensor, lam: float) -> torch.Tensor:
    """Â = (z(Â_R) − λ (Â_C − mean Â_C)) / (1 + λ), z the per-batch z-score (OmniSafe's scaling)."""
    return (standardise(adv_r) - lam * (adv_c - adv_c.mean())) / (1 + lam)


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float):
    ratio = torch.exp(logp - logp_old)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    return loss, ratio


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with ``foreach``: torch's CPU default steps each parameter in a Python loop of a dozen
    ops on tiny tensors; the foreach kernels do the same arithmetic per element, so the same floats.
    On a GPU also ``capturable`` (step counts on the device), so a CUDA graph can hold its step."""
    params = list(params)
    return torch.optim.Adam(params, lr=lr, foreach=True, capturable=bool(params) and params[0].is_cuda)


@torch.no_grad()
def add_l2_gradient(params: list, coef: float) -> None:
    """grad += c · 2θ: the gradient of c Σ‖θ‖² as autograd forms it through Σ (θ²).sum() (the same
    floats, as the sum with the loss's own gradient commutes), without 3 graph nodes per parameter."""
    torch._foreach_add_([w.grad for w in params], torch._foreach_mul(torch._foreach_mul(params, 2.0), coef))


def shuffled_minibatches(data: dict, size: int, device) -> list[dict]:
    """One pass over ``data`` (tensors with the same first dimension) in the order of a
    ``torch.randperm``, as minibatches of ``size`` rows: the rows are gathered once per pass and
    the minibatches are views, not an index operation per tensor and minibatch."""
    perm = torch.randperm(next(iter(data.values())).shape[0], device=device)
    chunks = {k: v[perm].split(size) for k, v in data.items()}
    return [dict(zip(chunks, rows)) for rows in zip(*chunks.values())]


def to_floats(values: list) -> list:
    """Per-minibatch statistics kept as 0-d tensors -> Python floats, in one transfer (no host
    sync per minibatch); plain floats pass through."""
    return torch.stack(values).tolist() if values and torch.is_tensor(values[0]) else values


def critic_norm_coef_field():
    """The ``critic_norm_coef`` entry of a learner's params (``ActorCritic.critic_objective``)."""
    return Field(0.0, ge=0, description="L2 penalty on the critics' parameters (OmniSafe: 0.001)")


def clip_critic_grad_field():
    """The ``clip_critic_grad`` entry of a learner's params (``ActorCritic.critic_objective``)."""
    return Field(False, description="clip the critics' gradient norm at max_grad_norm (OmniSafe)")


def parallel_critics_field(default: str):
    """The ``parallel_critics`` entry of a learner's params: where a CPU update runs the critics'
    minibatch steps. ``thread`` (``CriticLane``), the TRPO family's default: its critic fit overlaps
    a policy step of large kernels (the conjugate gradient and line search over the whole batch).
    ``process`` (``learners/critic_process.py``): a second interpreter, for the PPO family's small
    minibatch steps, whose dispatch holds the GIL and so gains nothing on a second thread. ``off``:
    in the loop. ``true`` / ``false`` read as ``thread`` / ``off``."""
    return Field(default, description="on a CPU, run the critics' minibatch steps beside the policy's: "
                 "off | thread | process (the same floats; the update uses a second core, which the env hosts "
                 "leave idle while an on-policy learner updates)")


def _parallel_critics_of_bool(value):
    return ("thread" if value else "off") if isinstance(value, bool) else value


ParallelCritics = Annotated[Literal["off", "thread", "process"], BeforeValidator(_parallel_critics_of_bool)]


class CriticLane:
    """The critics' minibatch steps, in order, on a second thread while the policy takes its own.

    The two sets of parameters, optimisers and autograd graphs are disjoint, neither step draws
    random numbers, and each thread runs its ops in the serial loop's order, so every float is the
    serial loop's; torch releases the GIL inside its kernels and backward passes, which is what
    overlaps. Unthreaded (``threaded`` false: on a GPU, or ``parallel_critics: off``) each step
    runs at ``submit``. ``step(*args) -> (loss, ok)`` must not touch state the policy's step uses.
    ``critic_process.ProcessLane`` has the same interface over a second process."""

    def __init__(self, step, threaded: bool):
        self.step = step
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="saferl-critics") if threaded else None
        self.pending: list = []

    def submit(self, *args) -> None:
        self.pending.append(self.pool.submit(self.step, *args) if self.pool else self.step(*args))

    def drain(self) -> tuple[list, int]:
        """Wait for the submitted steps: (their losses, in order; how many were refused for NaN/Inf)."""
        done = [r.result() if isinstance(r, Future) else r for r in self.pending]
        self.pending = []
        return [loss for loss, _ in done], sum(not ok for _, ok in done)

    def __enter__(self) -> CriticLane:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


class ActorCritic(base.Learner):
    """What the on-policy learners share: the Gaussian policy with running observation
    statistics (``hidden``, ``init_log_std``, ``normalise_obs``, ``obs_clip``, ``init``), reward and cost critics on the
    normalised observation, and one Adam over both critics (``critic_lr``)."""

    def __init__(self, params, env: base.EnvSpec, cost_limit, device, seed):
        super().__init__(params, env, cost_limit, device, seed)
        p = params
        self.policy = GaussianPolicy(env.obs_dim, env.act_dim, p.hidden, p.init_log_std,
                                     normalise_obs=p.normalise_obs, init=p.init, obs_clip=p.obs_clip,
                                     norm_per_step=p.obs_norm_per_step).to(device)
        self.v_r = mlp([env.obs_dim, *p.hidden, 1], init=p.init).to(device)
        self.v_c = mlp([env.obs_dim, *p.hidden, 1], init=p.init).to(device)
        self.v_opt = adam([*self.v_r.parameters(), *self.v_c.parameters()], lr=p.critic_lr)
        self.critic_process: CriticProcess | None = None  # parallel_critics: process, started on first use

    def policy_state(self) -> dict:
        return self.policy.export_numpy()

    def update(self, batches: list[dict]) -> dict:
        """``train_on(batches)``. Batches from hosts that normalised the observations as they
        collected them (``obs_norm_per_step``: they carry ``raw_obs``) are taken as they are, and the
        statistics absorb the valid steps' raw observations afterwards."""
        if not (batches and "raw_obs" in batches[0]):
            return self.train_on(batches)
        raw = torch.as_tensor(np.concatenate([b["raw_obs"][b["valid"]] for b in batches]))
        with self.policy.given_normalised(raw):
            return self.train_on(batches)

    def train_on(self, batches: list[dict]) -> dict:
        """One update on host batches (the family's algorithms implement it)."""
        raise NotImplementedError

    def critic_objective(self, z: torch.Tensor, ret_r: torch.Tensor,
                         ret_c: torch.Tensor) -> tuple[torch.Tensor, list, float | None, object]:
        """L_V = E[(V_R(z) − R̂)²] + E[(V_C(z) − Ĉ)²] + ``critic_norm_coef`` Σ‖θ_V‖² for one step:
        (L_V, the critics' parameters, the clip (``max_grad_norm`` with ``clip_critic_grad``, else
        None), the backward to use (None: ``L_V.backward()``))."""
        params = [*self.v_r.parameters(), *self.v_c.parameters()]
        mse = ((self.v_r(z).squeeze(-1) - ret_r) ** 2).mean() + ((self.v_c(z).squeeze(-1) - ret_c) ** 2).mean()
        clip = self.p.max_grad_norm if self.p.clip_critic_grad else None
        coef = self.p.critic_norm_coef
        if not coef:
            return mse, params, clip, None
        with torch.no_grad():  # the penalty's value (w·w is w ** 2); its gradient is added by hand
            loss = mse + coef * sum(s.sum() for s in torch._foreach_mul(params, params))

        def backward():
            mse.backward()
            add_l2_gradient(params, coef)
        return loss, params, clip, backward  # the guard checks the whole L_V

    def critic_update(self, z: torch.Tensor, ret_r: torch.Tensor, ret_c: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One guarded Adam step on ``critic_objective``: (L_V as a detached 0-d tensor, whether the
        step was taken). Touches only the critics and their optimiser (``CriticLane``)."""
        loss, params, clip, backward = self.critic_objective(z, ret_r, ret_c)
        return loss.detach(), base.guarded_descend(self.v_opt, loss, params, clip, backward)

    def critic_lane(self) -> CriticLane | ProcessLane:
        """Where this update's critic steps run (``parallel_critics``; on a GPU always in the loop)."""
        mode = self.p.parallel_critics if self.device.type == "cpu" else "off"
        if mode != "process":
            return CriticLane(self.critic_update, mode == "thread")
        if self.critic_process is None or not self.critic_process.alive():  # the child builds its own learner
            self.critic_process = CriticProcess(partial(type(self), self.p, self.env, self.cost_limit,
                                                        torch.device("cpu"), 0))
        return self.critic_process.lane(self)
