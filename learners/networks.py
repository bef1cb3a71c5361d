"""Networks shared by the learners: MLPs, the Gaussian policy, running observation statistics."""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field
from torch import nn

from saferl.batch import NumpyPolicy, merge_moments

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}  # names np_policy also knows


INITS = ("orthogonal", "kaiming_uniform")


def init_field(default: str = "orthogonal"):
    """The ``init`` entry of a learner's params: which of ``mlp``'s initialisations its networks use."""
    return Field(default, pattern=f"^({'|'.join(INITS)})$",
                 description="network initialisation (learners/networks.mlp); kaiming_uniform is OmniSafe's")


def obs_clip_field(default: float = 10.0):
    """The ``obs_clip`` entry of a learner's params: normalised observations are clipped to ±this
    (``RunningNorm``; OmniSafe's env wrapper ``ObsNormalize`` clips at 5, which the configs that
    follow OmniSafe set)."""
    return Field(default, gt=0, description="normalised observations clipped to ±obs_clip (OmniSafe: 5)")


def obs_norm_per_step_field():
    """The ``obs_norm_per_step`` entry of a learner's params (``GaussianPolicy.norm_per_step``)."""
    return Field(False, description="env hosts update the observation statistics at every step of a rollout and "
                 "the learner trains on the observations as they normalised them (OmniSafe's ObsNormalize); "
                 "false: the statistics are fixed within a rollout and updated after each update")


def mlp(sizes: Sequence[int], activation=nn.Tanh, out_gain: float = 1.0, init: str = "orthogonal") -> nn.Sequential:
    """``init`` orthogonal: weights orthogonal with gain √2, the last layer's ``out_gain``, zero
    biases (the CleanRL / PPO-paper convention: a policy starts near a zero mean).
    kaiming_uniform: PyTorch's own ``nn.Linear`` initialisation (weights kaiming-uniform with
    a = √5, biases uniform in ±1/√fan_in), which is OmniSafe's ``weight_initialization_mode:
    kaiming_uniform``; ``out_gain`` is not applied, so a policy starts with a state-dependent mean
    of order 0.1-1."""
    if init not in INITS:
        raise ValueError(f"init: {init!r} is not one of {INITS}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b)
        last = i == len(sizes) - 2
        if init == "orthogonal":
            nn.init.orthogonal_(lin.weight, gain=out_gain if last else np.sqrt(2))
            nn.init.zeros_(lin.bias)
        layers += [lin] if last else [lin, activation()]
    return nn.Sequential(*layers)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def numpy_policy(net: nn.Sequential, activation: str, n_actions: int, **head) -> NumpyPolicy:
    """``net``'s weights for numpy inference in env hosts (``saferl.batch.NumpyPolicy``): an
    identity observation normaliser, a squashed action and log σ = 0, then ``head``'s keys over them."""
    lin = [m for m in net if isinstance(m, nn.Linear)]
    dim = lin[0].in_features
    return {"layers": [(_f32(m.weight), _f32(m.bias)) for m in lin], "activation": activation,
            "log_std": np.zeros(n_actions, np.float32), "squash": True, "obs_mean": np.zeros(dim, np.float32),
            "obs_var": np.ones(dim, np.float32) - 1e-8, "obs_clip": np.inf, **head}


class RunningNorm(nn.Module):
    """Running mean/variance of observations (parallel Welford), stored as buffers so they are
    checkpointed with the policy and broadcast with its weights."""

    def __init__(self, dim: int, clip: float = 10.0):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.mean.shape[0]).to(torch.float64)
        self.update_moments(x.shape[0], x.mean(0), x.var(0, unbiased=False))

    @torch.no_grad()
    def update_moments(self, n: int, mean, var) -> None:
        # numpy moments (gradient workers') or tensors on any device (this learner's own batch)
        mean, var = (_float64(m, self.mean.device) for m in (mean, var))
        self.mean, self.var, self.count = merge_moments(self.mean, self.var, self.count, n, mean, var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean.to(x.dtype)) / torch.sqrt(self.var.to(x.dtype) + 1e-8)
        return z.clamp(-self.clip, self.clip)


def _float64(x, device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = np.array(x, dtype=np.float64)  # a copy: arrays from Ray's object store are read-only
    return torch.as_tensor(x, dtype=torch.float64).to(device)


class GaussianPolicy(nn.Module):
    """Diagonal Gaussian with state-independent log σ; ``squash`` = tanh on the sample (bounded
    actions for differentiable tasks), otherwise the env clips (the PPO/OmniSafe convention)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], init_log_std: float = -0.5,
                 squash: bool = False, normalise_obs: bool = True, activation: str = "tanh", init: str = "orthogonal",
                 obs_clip: float = 10.0, norm_per_step: bool = False):
        super().__init__()
        self.squash, self.activation = squash, activation
        self.norm = RunningNorm(obs_dim, obs_clip) if normalise_obs else None
        self.norm_per_step = norm_per_step and normalise_obs
        self.net = mlp([obs_dim, *hidden, act_dim], activation=ACTIVATIONS[activation], out_gain=0.01, init=init)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def normalised(self, obs: torch.Tensor) -> torch.Tensor:
        return self.norm(obs) if self.norm is not None else obs

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.net(self.normalised(obs)), self.log_std.exp())

    def mean_std(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) at already normalised observations ``z``, σ broadcast to μ's shape."""
        mu = self.net(z)
        return mu, self.log_std.exp().expand_as(mu)

    def log_prob(self, obs: torch.Tensor, u: torch.Tensor, normalised: bool = False) -> torch.Tensor:
        """log π(u|s) summed over action dimensions; ``normalised``: ``obs`` is already normalised."""
        return normal_log_prob(*self.mean_std(obs if normalised else self.normalised(obs)), u)

    def rsample(self, obs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Reparameterised action: mean + σ·noise (noise None = deterministic), squashed if set."""
        u = self.net(self.normalised(obs))
        if noise is not None:
            u = u + self.log_std.exp() * noise
        return torch.tanh(u) if self.squash else u

    def export_numpy(self) -> NumpyPolicy:
        """Weights for ``saferl.actors.np_policy`` (inference inside env hosts)."""
        state = numpy_policy(self.net, self.activation, self.log_std.numel(), log_std=_f32(self.log_std),
                             squash=self.squash)
        if self.norm is not None:
            state.update(obs_mean=_f32(self.norm.mean), obs_var=_f32(self.norm.var), obs_clip=float(self.norm.clip),
                         obs_count=float(self.norm.count), obs_norm_per_step=self.norm_per_step)
        return state

    @contextlib.contextmanager
    def given_normalised(self, raw_obs: torch.Tensor):
        """Within: observations are taken as already normalised (env hosts normalised them as they
        collected them, ``norm_per_step``), so every ``normalised`` is the identity and the
        statistics stay put; on leaving, they absorb ``raw_obs`` (the valid steps' raw
        observations), as ``RunningNorm.update`` after an update does."""
        norm, self.norm = self.norm, None
        try:
            yield
        finally:
            self.norm = norm
        if norm is not None:
            norm.update(raw_obs.to(norm.mean.device))


class TanhGaussianPolicy(nn.Module):
    """Tanh-squashed Gaussian with state-dependent σ (SAC; Haarnoja et al. 2018, Appendix C):
    u ~ N(μ(s), σ(s)²), a = tanh(u), log π(a|s) = log N(u) − Σ log(1 − tanh²u). Actions in
    [−1, 1]; env hosts rescale to the task's box."""

    LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str = "relu",
                 init: str = "orthogonal"):
        super().__init__()
        self.act_dim, self.activation = act_dim, activation
        self.net = mlp([obs_dim, *hidden, 2 * act_dim], activation=ACTIVATIONS[activation], out_gain=0.01, init=init)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mu, log_std = self.net(obs).split(self.act_dim, -1)
        return torch.distributions.Normal(mu, log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX).exp())

    def sample(self, obs: torch.Tensor, u: torch.Tensor | None = None):
        """(a, log π(a|s)); reparameterised, or at the given pre-squash ``u``."""
        return self.sample_of(self.dist(obs), u)

    @staticmethod
    def sample_of(dist: torch.distributions.Normal, u: torch.Tensor | None = None):
        """``sample`` from an already evaluated ``dist`` (a caller that also needs its mean)."""
        u = dist.rsample() if u is None else u
        return torch.tanh(u), tanh_log_prob(dist, u)

    def export_numpy(self) -> NumpyPolicy:
        return numpy_policy(self.net, self.activation, self.act_dim, std_head=True,
                            log_std_bounds=(self.LOG_STD_MIN, self.LOG_STD_MAX))


class CholeskyTanhGaussianPolicy(nn.Module):
    """Tanh-squashed Gaussian with a full state-dependent covariance (CVPO; MPO's Cholesky
    actor, Abdolmaleki et al. 2018): u ~ N(μ(s), L(s)L(s)ᵀ), a = tanh(u), L lower triangular
    with diagonal softplus(·) + ``MIN_DIAG``. The net outputs μ and the n(n+1)/2 entries of L
    (row-major lower triangle). Distributions are over u, so KLs and likelihoods are exact. The
    diagonal's bias starts at ``init_std``; with the orthogonal init (last layer's gain 0.01) that
    is the starting σ, with kaiming_uniform the last layer's weights add a state-dependent part."""

    MIN_DIAG = 1e-4

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], init_std: float = 0.5,
                 init: str = "orthogonal"):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp([obs_dim, *hidden, act_dim + act_dim * (act_dim + 1) // 2], activation=nn.ReLU,
                       out_gain=0.01, init=init)
        rows, cols = torch.tril_indices(act_dim, act_dim)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        # the diagonal starts at init_std: softplus⁻¹(init_std − MIN_DIAG) as the bias
        with torch.no_grad():
            diag = (rows == cols).nonzero().squeeze(-1) + act_dim
            self.net[-1].bias[diag] = float(np.log(np.expm1(init_std - self.MIN_DIAG)))

    def mean_and_tril(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(obs)
        mu, entries = out[..., :self.act_dim], out[..., self.act_dim:]
        on_diag = self.rows == self.cols
        entries = torch.where(on_diag, nn.functional.softplus(entries) + self.MIN_DIAG, entries)
        tril = out.new_zeros(*out.shape[:-1], self.act_dim, self.act_dim)
        tril[..., self.rows, self.cols] = entries
        return mu, tril

    def dist(self, obs: torch.Tensor) -> torch.distributions.MultivariateNormal:
        mu, tril = self.mean_and_tril(obs)
        return torch.distributions.MultivariateNormal(mu, scale_tril=tril)

    def export_numpy(self) -> NumpyPolicy:
        return numpy_policy(self.net, "relu", self.act_dim, cholesky_head=True, act_dim=self.act_dim,
                            min_diag=self.MIN_DIAG)


class DeterministicTanhPolicy(nn.Module):
    """Deterministic tanh actor a = tanh(μ(s)) (TD3 / DDPG). Env hosts explore with
    a = clip(tanh(μ(s)) + N(0, σ²), −1, 1), σ = ``exploration_noise`` (Fujimoto et al. 2018, §6.1),
    and store u = artanh(a) so that tanh(u) is the executed action; evaluation acts with tanh(μ(s))."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], exploration_noise: float = 0.1,
                 init: str = "orthogonal"):
        super().__init__()
        self.act_dim, self.exploration_noise = act_dim, exploration_noise
        self.net = mlp([obs_dim, *hidden, act_dim], activation=nn.ReLU, out_gain=0.01, init=init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def export_numpy(self) -> NumpyPolicy:
        return numpy_policy(self.net, "relu", self.act_dim, action_noise=float(self.exploration_noise),
                            act_dim=self.act_dim)


def normal_log_prob(mu: torch.Tensor, std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Σ_i log N(u_i; μ_i, σ_i²), term for term torch.distributions.Normal's log_prob (so the same
    floats) without building a distribution object and checking its arguments per call. ``std``
    must have μ's shape, as Normal broadcasts it: σ's gradient is then summed over the batch in
    the same order."""
    return (-((u - mu) ** 2) / (2 * std ** 2) - std.log() - math.log(math.sqrt(2 * math.pi))).sum(-1)


def normal_entropy(std: torch.Tensor) -> torch.Tensor:
    """Σ_i H[N(μ_i, σ_i²)] = Σ_i (½ + ½ log 2π + log σ_i), as torch.distributions.Normal's entropy."""
    return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(std)).sum(-1)


def tanh_log_prob(dist: torch.distributions.Normal, u: torch.Tensor) -> torch.Tensor:
    """log π(tanh u) = log N(u) − Σ log(1 − tanh² u), with the stable 2(log 2 − u − softplus(−2u))."""
    return (dist.log_prob(u) - 2 * (np.log(2.0) - u - nn.functional.softplus(-2 * u))).sum(-1)


@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Target ← (1 − τ) target + τ source."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def set_flat_params(module: nn.Module, flat: torch.Tensor) -> None:
    i = 0
    for p in module.parameters():
        n = p.numel()
        p.data.copy_(flat[i:i + n].view_as(p))
        i += n


def flat_grad(output: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    grads = torch.autograd.grad(output, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
