"""CGPO's differentiable Brax tasks (CGPO paper, Appendix E, Table 4) as torch ``DiffEnv``s.

| task (registry name)            | brax env / backend             | cost c_t                  | T   | limit |
|---------------------------------|--------------------------------|---------------------------|-----|-------|
| BraxCartPole-v1 (E.1)           | inverted_pendulum/positional   | −x_cart²                  | 300 | −50   |
| BraxReacher-v0 (E.2)            | reacher/generalized            | ‖fingertip position‖²     | 300 | 400   |
| BraxHalfCheetahVel-v0 (E.3)     | halfcheetah/generalized        | ‖v_torso,xy‖              | 200 | 400   |
| BraxAntVel-v0 (E.4)             | ant/generalized                | ‖v_torso,xy‖              | 300 | 1000  |

State is a torch tensor ``[n, nq + nv]`` = (q, qd), so the DiffEnv protocol stays a plain tensor.
Each ``step`` is one jitted, vmapped JAX function called through ``jax_bridge.JaxFunction``: it
re-creates the Brax pipeline state from (q, qd) with ``pipeline_init`` (forward kinematics,
differentiable), applies the action with the env's own ``pipeline_step`` (its ``n_frames``
physics substeps), and returns (q', qd'), the Brax env's reward and the paper's cost, all
evaluated on the transition (s_t, a_t, s_{t+1}) like Brax's own ``step``. Gradients flow to the
actions and to the incoming state (backward by ``jax.vjp``).

Backend: ``generalized`` for Reacher, HalfCheetah and Ant (Brax's own default for these envs;
``backend=`` overrides); ``positional`` for CartPole, whose generalized pipeline diverges once the
pole falls (no termination here: Brax's own generalized inverted_pendulum reaches |qd| > 1e3 by
step ~60 under random actions, then NaN), while positional stays bounded over T = 300. The price:
rebuilt from (q, qd) each step, positional CartPole is a (q, qd)-Markov variant of Brax's
positional rollout (max deviation 0.09 after 20 steps of a smooth action sequence). The deciding fact
is the state: the generalized backend's pipeline state is a
function of (q, qd) alone, so rebuilding it every env step reproduces Brax's own rollout
(measured on this CPU, 4 envs, random actions: max |Δq| 1e-4 after 10 steps for Ant, 2e-3 for
HalfCheetah — float round-off, then chaotic contact dynamics amplify it). The positional backend
carries maximal coordinates (x, xd, x_i, ...) that (q, qd) do not determine — after *one*
rebuilt step HalfCheetah's q already differs by 4e-2 and qd by 0.4 from Brax's positional
rollout — so a (q, qd) state would silently turn it into a different simulator. Cost is not
the issue: earlier measurements covered only positional for HalfCheetah/Ant; measured here at 64
envs (2-core CPU, cold compile) generalized compiles its VJP faster (HalfCheetah 33 s vs 45 s,
Ant 24 s vs 40 s) and steps at about the same speed (fwd+bwd per batched step of 64 envs: HalfCheetah 129 vs
108 ms, Ant 65 vs 80 ms). Within an env step the ``n_frames`` physics substeps carry Brax's
full state as usual.

Choices the paper leaves open (all overridable by kwargs):

* CartPole reward. Brax's ``inverted_pendulum`` pays a constant +1 per step and *terminates* when
  |θ| > 0.2. With a fixed horizon and no termination (this protocol) a constant reward has zero
  gradient, so g = ∇J_R ≡ 0 and CGPO's sub-problem degenerates. Default ``reward="upright"``:
  r = 1 − (θ/0.2)², a smooth stand-in for "+1 while |θ| ≤ 0.2" (1 upright, 0 at Brax's
  termination angle, negative beyond). ``reward="brax"`` gives the literal constant 1.
* CartPole's fallen pole. With no termination, a fallen pole comes to rest on the hinge's ±90°
  joint limit, and from there a window's reward has almost no gradient with respect to the
  actions (about 1 % of its norm from an upright start): analytic-gradient methods cannot recover
  it, and once every env has fallen their updates stall. ``pole_reset`` (registered as
  BraxCartPole-v1, 1.4 rad) puts a pole past that angle back upright at rest after the step, the
  cart keeping its position and velocity: a continuing stand-in for Brax's termination within the
  fixed horizon (the falling steps still pay their negative reward). BraxCartPole-v0 keeps the
  resting pole.
* CartPole cost. The paper writes c_t = −‖x_pos‖² with the constraint Σ c_t ≤ −50 over T = 300,
  i.e. Σ x² ≥ 50: the cart must stay *away* from the origin (mean |x| ≳ 0.41 on the [−1, 1] rail),
  which conflicts with balancing — the "contradiction between the constraints and the goal" of
  E.1. We implement exactly that: c = −x_cart² (x after the step).
* Reacher cost: c = ‖fingertip world position‖² (3-D, after the step), as the text writes it.
  Note the arm reaches at most 0.21 m, so Σ c ≤ 300·0.21² ≈ 13.2: the paper's limit 400 can
  never bind with this definition (the same holds for the squared fingertip–target distance,
  ≤ 300·0.41² ≈ 50). Kept as written; ``cost="to_target"`` gives ‖tip − target‖² instead.
* Velocity cost: ‖v‖ of the torso in the horizontal plane, v = Δ(torso xy position)/dt over the
  env step — the same finite-difference velocity Brax's reward uses (for HalfCheetah, a planar
  robot, this is |v_x|; for Ant sqrt(v_x² + v_y²), as in FOCOPS / Safety-Gymnasium velocity
  tasks). Computed with ``brax.math.safe_norm`` (finite gradient at 0).
* Observations are Brax's: CartPole 4, Reacher 11, HalfCheetah 17 (Brax drops the root x; the
  paper says 18), Ant 27.
* Actions are in [−1, 1] for every task (the policy's tanh range); CartPole maps them to the
  paper's force range [−3, 3] exactly as Brax's ``inverted_pendulum.step`` does.
* Ant keeps Brax's default ``terminate_when_unhealthy=True``: healthy bonus 1 per step, and the
  episode ends once the torso height leaves ``healthy_z_range`` [0.2, 1.0] — here, with a fixed
  horizon, as an absorbing state (frozen, reward 0, cost 0 from then on; see ``BraxAntVel``).
  Without it the ant flips, sinks through the floor (only its feet collide), is launched
  metres up and the generalized pipeline diverges to NaN within T = 300 under random actions.

Initial states use each Brax env's reset noise, drawn from the torch generator passed in, so
they are reproducible from the seed and identical on every worker.
"""
from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch

# jax_bridge configures JAX before JAX is imported: keep this order
# isort: off
from saferl.envs import jax_bridge  # noqa: F401
from saferl.envs.diff import DiffEnv
from saferl.envs.jax_bridge import JaxFunction, jax_mlp_policy, window_function

import jax
import jax.numpy as jnp
# isort: on

# Known, harmless notices from the pinned stack (brax 0.14 is in maintenance; jaxopt is
# deprecated but is what brax's generalized constraint solver uses).
warnings.filterwarnings("ignore", message="Brax System, piplines and environments")
warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
warnings.filterwarnings("ignore", message="Accessing `.*` directly from `Data` is deprecated")


def _cast_floats(tree, dtype):
    """Cast floating leaves of a pytree (a brax System) to ``dtype`` (float64 under x64)."""
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, dtype)
        return x
    return jax.tree_util.tree_map(cast, tree)


# One prototype per (task class, options, float dtype): instances built with the same options
# share its Brax system and jitted functions, so a second instance (a GradientWorker next to a
# TorchVecEnv, a test after another) does not trace and compile again.
_PROTOTYPES: dict = {}


class BraxTask(DiffEnv):
    """A Brax env as a batched differentiable torch task over states (q, qd).

    Subclasses map their own options to attribute names in ``task_options`` (set before the
    build); every other keyword goes to ``brax.envs.get_environment``."""

    env_name: str
    default_backend: str
    task_options: ClassVar[dict[str, str]] = {}
    act_low = -1.0
    act_high = 1.0

    def __init__(self, backend: str | None = None, grad_mode: str = "recompute", **options):
        self._init_kwargs = dict(backend=backend, grad_mode=grad_mode, **options)
        key = (type(self), repr(sorted(self._init_kwargs.items())), str(jnp.zeros(()).dtype))
        proto = _PROTOTYPES.get(key)
        if proto is not None:
            self.__dict__.update(proto.__dict__)
            return
        self._build(backend, grad_mode, options)
        _PROTOTYPES[key] = self

    def _build(self, backend, grad_mode, options) -> None:
        from brax import envs as brax_envs

        for option, attribute in self.task_options.items():
            setattr(self, attribute, options.pop(option))
        self.backend = backend or self.default_backend
        self.brax = brax_envs.get_environment(self.env_name, backend=self.backend, **options)
        float_dtype = jnp.zeros(()).dtype
        if float_dtype != jnp.float32:  # constructed under jax x64: run the physics in float64
            self.brax.sys = _cast_floats(self.brax.sys, float_dtype)
        sys = self.brax.sys
        self.nq, self.nv = sys.q_size(), sys.qd_size()
        self.state_dim = self.nq + self.nv
        self.act_dim = self.brax.action_size
        self.dt = float(self.brax.dt)
        self.init_q = torch.tensor(jax.device_get(sys.init_q).tolist(), dtype=torch.float32)
        self._step = JaxFunction(self.jax_step, vmap=True, mode=grad_mode)
        self._windows: dict = {}  # policy_window's compiled windows (shared like _step)
        self._setup(grad_mode)

    def _setup(self, grad_mode: str) -> None:
        """Subclass hook: constants and extra jitted functions (built once per prototype)."""

    # --- pure JAX, one env -------------------------------------------------------------------
    def jax_step(self, s: jax.Array, a: jax.Array):
        """(q, qd), action -> ((q', qd'), reward, cost) for one env; pure and differentiable."""
        q, qd = s[: self.nq], s[self.nq:]
        ps0 = self.brax.pipeline_init(q, qd)
        ps1 = self.brax.pipeline_step(ps0, self.scale_action(a))
        next_state = jnp.concatenate([ps1.q, ps1.qd]).astype(s.dtype)
        return next_state, self.reward(ps0, ps1, a).astype(s.dtype), self.cost(ps0, ps1, a).astype(s.dtype)

    def batched_step(self, s: jax.Array, a: jax.Array):
        """Batched JAX step [n, S], [n, A] -> ([n, S], [n], [n]) (for ``window_function``)."""
        return jax.vmap(self.jax_step)(s, a)

    def jax_observe(self, s: jax.Array) -> jax.Array:
        """Observation of one env from (q, qd), in JAX (for ``policy_window``)."""
        raise NotImplementedError  # abstract

    def batched_observe(self, s: jax.Array) -> jax.Array:
        return jax.vmap(self.jax_observe)(s)

    def scale_action(self, a):
        return a

    def reward(self, ps0, ps1, a):
        raise NotImplementedError  # abstract

    def cost(self, ps0, ps1, a):
        raise NotImplementedError  # abstract

    # --- DiffEnv protocol (torch) ----------------------------------------------------------------
    def step(self, state: torch.Tensor, action: torch.Tensor):
        next_state, reward, cost = self._step(state, action.to(state.dtype))
        return next_state, reward, cost

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def initial_state(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def policy_window(self, policy, h: int, remat: bool = True):
        """Optional fast path: a whole window of h steps in one XLA call (``lax.scan``) with a JAX
        port of the torch ``GaussianPolicy``. Returns ``run(state, noise [h, n, A]) -> (state_h,
        sum_r, sum_c, obs [h+1, n, d], r [h, n], c [h, n])`` as torch tensors whose gradients
        reach ``policy``'s parameters (and ``state``). Compiled once per (architecture, h, n).
        Same numbers as ``rollout_window`` with ``rsample`` (pass zeros for no noise)."""
        tensors, apply = jax_mlp_policy(policy)
        key = ("window", h, remat, tuple(tuple(t.shape) for t in tensors), policy.squash,
               [type(m) for m in policy.net].__repr__())
        fn = self._windows.get(key)
        if fn is None:
            fn = JaxFunction(window_function(self.batched_step, self.batched_observe,
                                             lambda ps, obs, eps: apply(list(ps), obs, eps), h, remat),
                             mode=self._init_kwargs["grad_mode"])
            self._windows[key] = fn

        def run(state: torch.Tensor, noise: torch.Tensor):
            tensors_now, _ = jax_mlp_policy(policy)
            return fn(*tensors_now, state, noise.to(state.dtype))

        return run

    # Jitted closures do not pickle: rebuild from the constructor arguments instead.
    def __getstate__(self):
        return self._init_kwargs

    def __setstate__(self, kwargs):
        self.__init__(**kwargs)


def _uniform(shape, low, high, generator):
    return torch.rand(shape, generator=generator) * (high - low) + low


class BraxCartPole(BraxTask):
    """Position-constrained CartPole (E.1) on Brax ``inverted_pendulum``."""

    env_name = "inverted_pendulum"
    # Not generalized: with the pole free to fall (fixed horizon, no termination) Brax's own
    # generalized inverted_pendulum diverges under random actions (|qd| > 1e3 by step ~60, then
    # NaN); the positional backend stays bounded over the whole T = 300.
    default_backend = "positional"
    obs_dim = 4
    max_episode_steps = 300

    task_options: ClassVar[dict[str, str]] = {"reward": "reward_kind", "pole_reset": "pole_reset"}

    def __init__(self, reward: str = "upright", pole_reset: float | None = None, backend: str | None = None,
                 grad_mode: str = "recompute"):
        if reward not in ("upright", "brax"):
            raise ValueError(f"reward must be 'upright' or 'brax', not {reward!r}")
        if pole_reset is not None and not 0.2 < pole_reset < math.pi / 2:
            raise ValueError(f"pole_reset must lie in (0.2, π/2) rad (past Brax's termination angle, "
                             f"before the hinge limit), not {pole_reset!r}")
        super().__init__(backend=backend, grad_mode=grad_mode, reward=reward, pole_reset=pole_reset)

    def jax_step(self, s, a):
        """With ``pole_reset``: a pole past that angle is put back upright at rest after the step
        (its reward and cost are the step's); the cart keeps its position and velocity."""
        next_state, r, c = super().jax_step(s, a)
        if self.pole_reset is None:
            return next_state, r, c
        upright = next_state.at[1].set(0.0).at[3].set(0.0)  # (x, θ, ẋ, θ̇): θ and θ̇ reset
        return jnp.where(jnp.abs(next_state[1]) > self.pole_reset, upright, next_state), r, c

    def _setup(self, grad_mode):
        ctrl = self.brax.sys.actuator.ctrl_range
        self._a_min, self._a_max = ctrl[:, 0], ctrl[:, 1]

    def scale_action(self, a):  # [-1, 1] -> ctrl range [-3, 3], as inverted_pendulum.step
        return (a + 1) * (self._a_max - self._a_min) * 0.5 + self._a_min

    def reward(self, ps0, ps1, a):
        if self.reward_kind == "brax":
            return jnp.ones((), a.dtype)
        return 1.0 - (ps1.q[1] / 0.2) ** 2

    def cost(self, ps0, ps1, a):
        return -ps1.q[0] ** 2

    def observe(self, state):
        return state  # (q, qd): cart x, pole θ, their velocities — Brax's observation

    def jax_observe(self, s):
        return s

    def initial_state(self, n, generator):
        q = self.init_q + _uniform((n, self.nq), -0.01, 0.01, generator)
        qd = _uniform((n, self.nv), -0.01, 0.01, generator)
        return torch.cat([q, qd], 1)


class BraxReacher(BraxTask):
    """Position-constrained Reacher (E.2) on Brax ``reacher`` (target = q[2:], slide joints)."""

    env_name = "reacher"
    default_backend = "generalized"
    obs_dim = 11
    max_episode_steps = 300

    task_options: ClassVar[dict[str, str]] = {"cost": "cost_kind"}

    def __init__(self, cost: str = "fingertip", backend: str | None = None,
                 grad_mode: str = "recompute"):
        if cost not in ("fingertip", "to_target"):
            raise ValueError(f"cost must be 'fingertip' or 'to_target', not {cost!r}")
        super().__init__(backend=backend, grad_mode=grad_mode, cost=cost)

    def _setup(self, grad_mode):
        self._obs = JaxFunction(self.jax_observe, vmap=True, mode=grad_mode)

    def _tip(self, ps):
        from brax import base
        return ps.x.take(1).do(base.Transform.create(pos=jnp.array([0.11, 0.0, 0.0], ps.q.dtype))).pos

    def jax_observe(self, s):
        ps = self.brax.pipeline_init(s[: self.nq], s[self.nq:])
        return self.brax._get_obs(ps).astype(s.dtype)

    def reward(self, ps0, ps1, a):
        from brax import math as bmath
        tip_to_target = self._tip(ps1) - ps1.x.pos[2]
        return -bmath.safe_norm(tip_to_target) - jnp.sum(a ** 2)

    def cost(self, ps0, ps1, a):
        tip = self._tip(ps1)
        if self.cost_kind == "to_target":
            tip = tip - ps1.x.pos[2]
        return jnp.sum(tip ** 2)

    def observe(self, state):
        return self._obs(state)[0]

    def initial_state(self, n, generator):
        q = self.init_q + _uniform((n, self.nq), -0.1, 0.1, generator)
        qd = _uniform((n, self.nv), -0.005, 0.005, generator)
        dist = 0.2 * torch.rand(n, generator=generator)
        ang = 2.0 * math.pi * torch.rand(n, generator=generator)
        q[:, 2], q[:, 3] = dist * torch.cos(ang), dist * torch.sin(ang)
        qd[:, 2:] = 0.0
        return torch.cat([q, qd], 1)


class _VelocityTask(BraxTask):
    """Velocity-constrained locomotion (E.3, E.4): cost = ‖torso velocity in the xy plane‖."""

    default_backend = "generalized"
    obs_skip: int  # leading q entries Brax leaves out of the observation (root x [, y])

    def _setup(self, grad_mode):
        self.reset_noise = float(self.brax._reset_noise_scale)

    def torso_velocity(self, ps0, ps1):
        return (ps1.x.pos[0, :2] - ps0.x.pos[0, :2]) / self.brax.dt

    def cost(self, ps0, ps1, a):
        from brax import math as bmath
        return bmath.safe_norm(self.torso_velocity(ps0, ps1))

    def observe(self, state):
        return state[:, self.obs_skip:]

    def jax_observe(self, s):
        return s[self.obs_skip:]

    def initial_state(self, n, generator):
        h = self.reset_noise
        q = self.init_q + _uniform((n, self.nq), -h, h, generator)
        qd = h * torch.randn(n, self.nv, generator=generator)
        return torch.cat([q, qd], 1)


class BraxHalfCheetahVel(_VelocityTask):
    """Velocity-constrained HalfCheetah (E.3). Reward (Brax): v_x − 0.1‖a‖²."""

    env_name = "halfcheetah"
    obs_dim = 17
    obs_skip = 1
    max_episode_steps = 200

    def reward(self, ps0, ps1, a):
        b = self.brax
        return b._forward_reward_weight * self.torso_velocity(ps0, ps1)[0] - b._ctrl_cost_weight * jnp.sum(a ** 2)


class BraxAntVel(_VelocityTask):
    """Velocity-constrained Ant (E.4). Reward (Brax): v_x + 1 − 0.5‖a‖² (contact cost 0).

    Termination as an absorbing state (Brax's default ``terminate_when_unhealthy=True``): a
    state whose torso height z = q[2] lies outside Brax's ``healthy_z_range`` [0.2, 1.0] is
    *absorbing* — every later step returns it unchanged with reward 0 and cost 0 — so the
    fixed-horizon return is exactly the return of Brax's terminated episode (the step that leaves
    the range still pays the healthy bonus, as in Brax). Gradients through an absorbed step are
    the identity on the state and zero into the action. The physics is never evaluated from an
    absorbed state: those envs step a fixed, valid pose instead and the result is discarded
    (``jnp.where`` on both sides, so no inf/NaN of the unused branch can reach a gradient).

    Why not simply run on (as before): only the four feet collide in Brax's ant.xml, so once the
    ant flips its torso sinks through the floor (z < 0), feet contacts drive joints up to ~2 rad
    past their limits, the stiff limit springs launch it metres up (z 5–270 m), and the
    generalized pipeline (substep 0.01 s) then spins the free-flying body up (root angular
    velocity 50 → 1.2e3 rad/s in ~10 steps, at z ≈ 11 m) until NaN. Under random actions every env leaves
    the healthy range (median step ~15–30) and a few per hundred reach NaN within T = 300,
    both through this task and through Brax's own env with ``terminate_when_unhealthy=False``;
    on trajectories that stay in the healthy range |qd| stayed below ~80. Brax never simulates
    that regime (its ant terminates there). ``terminate_when_unhealthy=False`` restores the old
    behaviour (no absorption, healthy bonus only while healthy) and with it the divergence."""

    env_name = "ant"
    obs_dim = 27
    obs_skip = 2
    max_episode_steps = 300

    def _setup(self, grad_mode):
        super()._setup(grad_mode)
        self.absorbing = bool(self.brax._terminate_when_unhealthy)
        self.healthy_z_range = tuple(float(z) for z in self.brax._healthy_z_range)

    def _healthy(self, z):
        lo, hi = self.healthy_z_range
        return (z >= lo) & (z <= hi)  # Brax: unhealthy iff z < lo or z > hi

    def alive(self, state: torch.Tensor) -> torch.Tensor:
        """[n] bool: not (yet) in the absorbing state (always True without absorption)."""
        if not self.absorbing:
            return torch.ones(state.shape[0], dtype=torch.bool, device=state.device)
        return self._healthy(state[:, 2])

    def jax_step(self, s, a):
        if not self.absorbing:
            return super().jax_step(s, a)
        alive = self._healthy(s[2])  # torso z: the free root joint's q[2] = Brax's x.pos[0, 2]
        safe = jnp.concatenate([self.brax.sys.init_q, jnp.zeros(self.nv)]).astype(s.dtype)
        next_state, r, c = super().jax_step(jnp.where(alive, s, safe), a)
        zero = jnp.zeros((), s.dtype)
        return jnp.where(alive, next_state, s), jnp.where(alive, r, zero), jnp.where(alive, c, zero)

    def reward(self, ps0, ps1, a):
        b = self.brax
        healthy = b._healthy_reward
        if not b._terminate_when_unhealthy:
            healthy = healthy * jnp.where(self._healthy(ps1.x.pos[0, 2]), 1.0, 0.0)
        return self.torso_velocity(ps0, ps1)[0] + healthy - b._ctrl_cost_weight * jnp.sum(a ** 2)


__all__ = ["BraxAntVel", "BraxCartPole", "BraxHalfCheetahVel", "BraxReacher", "BraxTask"]
