"""SafeGBPO's balancing tasks ("Provably Safe Reinforcement Learning from
Analytic Gradients", Appendix 7.1, eq 65-68) as differentiable ``DiffEnv``s.

Both integrate their ODE with semi-implicit Euler, dt = 0.05 (velocities first, then positions
with the new velocities), add bounded uniform noise w ~ U(⟨0, diag(0.1)⟩) to the accelerations,
take actions in [−1, 1]^m, run 240 steps, and reset uniformly-in-γ from the RCI zonotope.

Pendulum (eq 65-66), state s = (θ, θ̇), θ = 0 upright, action a ∈ [−1, 1]:
    θ̈ = 1.5 g/l sin θ + 3τ/(m l²) + w,  τ = 30a,  g = 9.81, l = m = 1
    r = −θ'² − 0.1 θ̇'² − 0.001 a²;  observation (sin θ, cos θ, θ̇).
Quadrotor (planar, eq 67-68), state (x, z, φ, ẋ, ż, φ̇, x₀, z₀) — the paper's eight state
variables; (x₀, z₀) is the position at reset and stays constant — action a ∈ [−1, 1]²:
    ẍ = T sin φ + w_x,  z̈ = T cos φ − g + w_z,  φ̈ = 55 φ_cmd − 70 φ − 17 φ̇,
    T = (6/7) a₀ + g,  φ_cmd = (π/12) a₁
    r = −2.5‖(x', z') − (x₀, z₀)‖ − 0.1(φ'² + ẋ'² + ż'² + φ̇'²) − 0.002 T² − 0.001 φ_cmd²;
    observation = the 8-dim state.
The RCI set and the dynamics concern the first ``dyn_dim`` state components (2 / 6).

Cost (the safety monitor): c = 1 if the next state s' = f(s, a, w) — before the feasibility
clamp — lies outside the RCI zonotope or outside the feasible state box (``violations``),
else 0. RCI membership is exact: the RCI set's halfspace form (``Zonotope.halfspaces``),
with tolerance ``violation_tol``. A safeguarded policy must never incur cost (cost_limit 0).

Safeguard helpers (paper eq 8, 12-14, 48): ``jacobians`` gives A = ∂f/∂s, B = ∂f/∂a,
E = ∂f/∂w in closed form. The safeguards linearise at the current state (paper eq 13, the
default of ``envs/safeguards.py``: ``jacobians`` evaluated at s with ū = w̄ = 0, the exact
next-state set for these control-affine tasks). ``lin`` is a linearisation at a fixed point,
by default the origin (x̄, ū, w̄) = 0 (the hover / upright equilibrium; the point the reference
code's wrappers are configured with, the safeguards' ``linearise="origin"``);
``linearised_next_set(s, a)`` is
    ⟨f(x̄, ū, w̄) + A(s − x̄) + B(a − ū) + E(c_w − w̄),  E G_w⟩
and ``next_set_affine(s)`` returns its centre as d(s) + B a for the safeguards' programs.
``rci``, ``ctrl`` and ``noise_set`` are the zonotopes.

Noise reproducibility: w is drawn from a per-instance CPU ``torch.Generator`` (seeded with
``noise_seed`` at construction) and advanced once per ``step``. ``initial_state(n, generator)``
reseeds that stream with one number drawn from the caller's generator, so an episode (initial
states and every noise draw) is a deterministic function of the reset generator's state.
(Gradient workers that slice one ``initial_state(N, gen)`` into shards therefore draw the same
noise sequence per local env index — valid bounded noise, but not bit-identical to one worker
stepping all N envs.)
``stochastic=False`` turns the noise off (G_w = 0). The noise does not depend on the
action or state, so it is a constant for the gradients.

Choices taken from the reference code (TimWalter/SafeGBPO @ 4ef0aec) where the paper is silent:
reward on the post-step state s' and the normalised action (thrust/roll terms on T and φ_cmd);
angles wrapped to (−π, π] with atan2 after each step; feasible state boxes θ ∈ [−π, π],
θ̇ ∈ [−1000, 1000] and x, z ∈ [−8, 8], |φ| ≤ π/12, |ẋ| ≤ 0.8, |ż| ≤ 1, |φ̇| ≤ π/2, to which
the next state is clamped (``clamp_state``, as the reference does); the noise bound 0.1 on
θ̈ / ẍ / z̈. Actions are not clipped here (the tanh policy or safeguard keeps them in range).
The quadrotor observes the true (x₀, z₀) (the reference's observation read a goal buffer its
balancing task never filled). Tensors default to float32 (what the policy networks take);
``dtype=torch.float64`` gives the reference's precision.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from saferl.envs.diff import DiffEnv, PicklableGenerators
from saferl.envs.zonotope import Zonotope, load_sets


@functools.cache
def _rci_halfspaces(task: str):
    return load_sets(task).rci.halfspaces()  # float64 CPU, computed once per process


@dataclass
class Linearisation:
    """f(s, a, w) ≈ f0 + A(s − x̄) + B(a − ū) + E(w − w̄) around (x̄, ū, w̄)."""
    state: torch.Tensor
    action: torch.Tensor
    noise: torch.Tensor
    f0: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    E: torch.Tensor


class _SafeGBPOTask(PicklableGenerators, DiffEnv):
    task: str
    dyn_dim: int
    noise_dim: int
    state_high: tuple[float, ...]
    max_episode_steps = 240
    accepts_device = True  # its sets and matrices are tensors: gradient workers build it on their device
    dt = 0.05
    gravity = 9.81
    noise_bound = 0.1
    rng_attrs = ("_noise_gen",)

    def __init__(self, stochastic: bool = True, clamp_state: bool = True, noise_seed: int = 0,
                 dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                 violation_tol: float | None = None):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.stochastic, self.clamp_state, self.noise_seed = stochastic, clamp_state, noise_seed
        self.dtype, self.device = dtype, torch.device(device)
        if violation_tol is None:
            violation_tol = 1e-9 if dtype == torch.float64 else 1e-5
        self.tol = violation_tol
        kw = dict(dtype=dtype, device=self.device)
        self.rci, self.ctrl = load_sets(self.task, **kw)
        self.rci_H, self.rci_h = (t.to(**kw) for t in _rci_halfspaces(self.task))
        self.state_high_t = torch.tensor(self.state_high, **kw)
        bound = self.noise_bound if stochastic else 0.0
        self.noise_set = Zonotope(torch.zeros(self.noise_dim, **kw), torch.eye(self.noise_dim, **kw) * bound)
        self._noise_gen = torch.Generator().manual_seed(noise_seed)
        self.lin = self.linearisation()

    # --- dynamics -----------------------------------------------------------------------
    def physical(self, state: torch.Tensor) -> torch.Tensor:
        """The dynamic part of the state (the RCI set's coordinates): [..., dyn_dim]."""
        return state[..., :self.dyn_dim]

    def f(self, s: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One semi-implicit Euler step of the dynamic state (no clamp): [..., dyn_dim]."""
        raise NotImplementedError  # abstract

    def jacobians(self, s, a, w=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Closed-form A = ∂f/∂s [..., n, n], B = ∂f/∂a [..., n, m], E = ∂f/∂w [..., n, q]."""
        raise NotImplementedError  # abstract

    def linearisation(self, state=None, action=None, noise=None) -> Linearisation:
        """Linearisation of f at a fixed (x̄, ū, w̄); defaults to the origin (the reference code's
        configured point; the safeguards linearise at the current state by default)."""
        kw = dict(dtype=self.dtype, device=self.device)
        x = torch.zeros(self.dyn_dim, **kw) if state is None else torch.as_tensor(state, **kw)
        u = torch.zeros(self.act_dim, **kw) if action is None else torch.as_tensor(action, **kw)
        w = torch.zeros(self.noise_dim, **kw) if noise is None else torch.as_tensor(noise, **kw)
        return Linearisation(x, u, w, self.f(x, u, w), *self.jacobians(x, u, w))

    def next_set_affine(self, state: torch.Tensor, lin: Linearisation | None = None):
        """(d [..., n], B [n, m], G [n, q]) with the linearised next-state set ⟨d + B a, G⟩:
        d = f0 + A(s − x̄) − B ū + E(c_w − w̄), G = E G_w (eq 48)."""
        lin = lin or self.lin
        s = self.physical(state).to(lin.f0.dtype)
        d = (lin.f0 + (s - lin.state) @ lin.A.mT - lin.B @ lin.action
             + lin.E @ (self.noise_set.center - lin.noise))
        return d, lin.B, lin.E @ self.noise_set.generators

    def linearised_next_set(self, state: torch.Tensor, action: torch.Tensor,
                            lin: Linearisation | None = None) -> Zonotope:
        """⟨f(x̄,ū,w̄) + A(s − x̄) + B(a − ū) + E(c_w − w̄), E G_w⟩, batched over state/action."""
        d, b, g = self.next_set_affine(state, lin)
        center = d + action.to(d.dtype) @ b.mT
        return Zonotope(center, g.expand(*center.shape[:-1], *g.shape))

    def sample_noise(self, n: int) -> torch.Tensor:
        """w ~ U[−0.1, 0.1]^q from the instance's noise stream (zeros if not stochastic)."""
        u = torch.rand(n, self.noise_dim, generator=self._noise_gen, dtype=torch.float64)
        bound = self.noise_set.generators.diagonal().double().cpu()
        return ((2 * u - 1) * bound).to(dtype=self.dtype, device=self.device)

    # --- safety monitor -----------------------------------------------------------------
    def in_rci(self, state: torch.Tensor) -> torch.Tensor:
        s = self.physical(state).detach().to(self.rci_H.dtype)
        flat, H, h, step = s.reshape(-1, s.shape[-1]), self.rci_H, self.rci_h, 4096
        # max_i (H_i s − h_i) in blocks of rows: a [N, 28.7k] temporary (quadrotor) is slow
        viol = torch.stack([torch.addmm(-h[i:i + step], flat, H[i:i + step].mT).amax(-1)
                            for i in range(0, H.shape[0], step)], -1).amax(-1)
        return (viol <= self.tol).reshape(s.shape[:-1])

    def in_box(self, state: torch.Tensor) -> torch.Tensor:
        s = self.physical(state).detach().to(self.rci_H.dtype)
        return (s.abs() <= self.state_high_t + self.tol).all(-1)

    def violations(self, state: torch.Tensor) -> torch.Tensor:
        """True where the state is outside the RCI set or the feasible state box: [...] bool."""
        return ~(self.in_rci(state) & self.in_box(state))

    # --- DiffEnv protocol ---------------------------------------------------------------
    def initial_state(self, n: int, generator: torch.Generator) -> torch.Tensor:
        seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device)
        self._noise_gen.manual_seed(int(seed))
        s = self.rci.sample(n, generator)
        return self._extend(s)

    def _extend(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def step(self, state: torch.Tensor, action: torch.Tensor):
        action = action.to(state.dtype)
        w = self.sample_noise(state.shape[0]).to(state)  # zeros when not stochastic
        nxt = self.f(self.physical(state), action, w)
        cost = self.violations(nxt).to(state.dtype)
        if self.clamp_state:
            high = self.state_high_t.to(state.dtype)
            nxt = torch.clamp(nxt, -high, high)
        nxt = torch.cat([nxt, state[..., self.dyn_dim:]], -1)
        return nxt, self.reward(nxt, action), cost

    def reward(self, next_state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract


class SafeGBPOPendulum(_SafeGBPOTask):
    """Pendulum balancing (SafeGBPO paper, Appendix 7.1, eq 65-66); see the module docstring."""
    task = "pendulum"
    obs_dim, act_dim, dyn_dim, noise_dim = 3, 1, 2, 1
    state_high = (math.pi, 1000.0)
    length = mass = 1.0
    torque_mag = 30.0

    @property
    def k_g(self) -> float:
        return 1.5 * self.gravity / self.length

    @property
    def k_a(self) -> float:
        return 3.0 * self.torque_mag / (self.mass * self.length ** 2)

    def f(self, s, a, w):
        th, thd = s[..., 0], s[..., 1]
        thdd = self.k_g * torch.sin(th) + self.k_a * a[..., 0] + w[..., 0]
        thd = thd + self.dt * thdd
        th = th + self.dt * thd
        return torch.stack([torch.atan2(torch.sin(th), torch.cos(th)), thd], -1)

    def jacobians(self, s, a, w=None):
        dt, shape = self.dt, s.shape[:-1]
        c = self.k_g * torch.cos(s[..., 0])  # ∂θ̈/∂θ
        one = torch.ones_like(c)
        A = torch.stack([torch.stack([one + dt * dt * c, dt * one], -1),
                         torch.stack([dt * c, one], -1)], -2)
        col = torch.tensor([dt * dt, dt], dtype=s.dtype, device=s.device)
        B = (col * self.k_a).unsqueeze(-1).expand(*shape, 2, 1)
        E = col.unsqueeze(-1).expand(*shape, 2, 1)
        return A, B, E

    def observe(self, state):
        th = state[..., 0:1]
        return torch.cat([torch.sin(th), torch.cos(th), state[..., 1:2]], -1)

    def reward(self, next_state, action):
        th, thd = next_state[..., 0], next_state[..., 1]
        return -th ** 2 - 0.1 * thd ** 2 - 0.001 * action[..., 0] ** 2


class SafeGBPOQuadrotor(_SafeGBPOTask):
    """Planar quadrotor balancing (SafeGBPO paper, Appendix 7.1, eq 67-68); see the module docstring."""
    task = "quadrotor"
    obs_dim, act_dim, dyn_dim, noise_dim = 8, 2, 6, 2
    state_high = (8.0, 8.0, math.pi / 12, 0.8, 1.0, math.pi / 2)
    thrust_mag = 6.0 / 7.0
    roll_mag = math.pi / 12
    gains = (70.0, 17.0, 55.0)  # φ̈ = 55 φ_cmd − 70 φ − 17 φ̇

    def thrust(self, a):
        return self.thrust_mag * a[..., 0] + self.gravity

    def f(self, s, a, w):
        x, z, phi, xd, zd, phid = s.unbind(-1)
        k0, k1, k2 = self.gains
        t = self.thrust(a)
        xdd = t * torch.sin(phi) + w[..., 0]
        zdd = t * torch.cos(phi) - self.gravity + w[..., 1]
        phidd = k2 * self.roll_mag * a[..., 1] - k0 * phi - k1 * phid
        xd, zd, phid = xd + self.dt * xdd, zd + self.dt * zdd, phid + self.dt * phidd
        x, z, phi = x + self.dt * xd, z + self.dt * zd, phi + self.dt * phid
        return torch.stack([x, z, torch.atan2(torch.sin(phi), torch.cos(phi)), xd, zd, phid], -1)

    def jacobians(self, s, a, w=None):
        dt, shape = self.dt, s.shape[:-1]
        k0, k1, k2 = self.gains
        phi, t = s[..., 2], self.thrust(a)
        # accelerations' partials J_acc = ∂(ẍ, z̈, φ̈)/∂(·); then v' = v + dt·acc, p' = p + dt·v'
        acc_s = torch.zeros(*shape, 3, 6, dtype=s.dtype, device=s.device)
        acc_s[..., 0, 2] = t * torch.cos(phi)
        acc_s[..., 1, 2] = -t * torch.sin(phi)
        acc_s[..., 2, 2] = -k0
        acc_s[..., 2, 5] = -k1
        acc_a = torch.zeros(*shape, 3, 2, dtype=s.dtype, device=s.device)
        acc_a[..., 0, 0] = self.thrust_mag * torch.sin(phi)
        acc_a[..., 1, 0] = self.thrust_mag * torch.cos(phi)
        acc_a[..., 2, 1] = k2 * self.roll_mag
        acc_w = torch.zeros(*shape, 3, 2, dtype=s.dtype, device=s.device)
        acc_w[..., 0, 0] = acc_w[..., 1, 1] = 1.0
        eye3 = torch.eye(3, dtype=s.dtype, device=s.device)
        base = torch.cat([torch.cat([eye3, dt * eye3], -1),
                          torch.cat([torch.zeros_like(eye3), eye3], -1)], -2)
        A = base + torch.cat([dt * dt * acc_s, dt * acc_s], -2)
        B = torch.cat([dt * dt * acc_a, dt * acc_a], -2)
        E = torch.cat([dt * dt * acc_w, dt * acc_w], -2)
        return A, B, E

    def _extend(self, s):
        return torch.cat([s, s[..., :2]], -1)  # (x₀, z₀) = reset position

    def observe(self, state):
        return state

    def reward(self, next_state, action):
        x, z, phi, xd, zd, phid, x0, z0 = next_state.unbind(-1)
        dist = torch.linalg.vector_norm(torch.stack([x - x0, z - z0], -1), dim=-1)  # grad 0 at 0
        return (-2.5 * dist - 0.1 * (phi ** 2 + xd ** 2 + zd ** 2 + phid ** 2)
                - 0.002 * self.thrust(action) ** 2 - 0.001 * (self.roll_mag * action[..., 1]) ** 2)
