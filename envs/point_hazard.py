"""The custom point/hazard task of the FAC-SIS paper ("Joint Synthesis of Safety Certificate and
Safe Control Policy", Appendix E.2), and the geometry tail that safety-index learners read from
observations.

A point robot with two inputs, rotation and acceleration, heads for a static goal at (0, 5) past
one hazard of radius 0.5 placed near the origin; 120 steps of dt = 0.05 s. State (x, y, θ, v,
h_x, h_y):

    θ' = θ + ω_max · a_0 · dt,   v' = clip(v + acc_max · a_1 · dt, −v_max, v_max),
    p' = p + v' (cos θ', sin θ') dt

**Actuator constants.** The paper gives neither the acceleration bound ``acc_max`` nor the speed
bound ``v_max`` (nor ω_max or dt), yet they decide Table 3: whether an index is feasible is a
question of how hard the robot can brake before reaching the hazard. They are constructor
parameters (``PointHazardEnv(distribution, acc_max=…, v_max=…, omega_max=…)``; the registered
tasks use the defaults below), and ``saferl study sis-feasibility`` reports Table 3's rates over a
grid of them. The defaults are chosen to match the paper's stated setting as closely as the grid
allows: φ_F is a valid index (Zhao et al. 2021's synthesis rules), so it must be 100% feasible,
while φ_h is not (Table 3: 70% success); of the settings that keep φ_F at 100%, the default gives
φ_h the success rate nearest 70%. The speed bound is the authors' reference environment's (2; a
bound of 1 could not track the reward's target speed from the start). Feasibility changes
sharply with acc_max in this band: the study's sensitivity table shows how.

Reward: the tracking errors of the heading towards the goal and of the speed, whose target is
the goal distance over 5 s ("it requires that the agent always takes 5 seconds to reach the
goal"): r = −|wrap(θ − ∠(g − p))| − |v − ‖g − p‖ / 5|. Cost 1 per step inside the hazard.
Initial distributions (Table 1; uniform on the intervals; the heading angle is read as an
offset from facing the goal, +y; distribution 2's hazard interval "[0.5, 1, 5]" is read as
[0.5, 1.5]):

    1: agent (0, [−1.5, −1.0]), hazard (0, [0.5, 1])
    2: agent (0, [−1.5, −0.5]), hazard (0, [0.5, 1.5])
    3: agent ([−0.5, 0.5], [−1.5, −0.5]), hazard (0, [0.5, 1])

**Geometry tail.** Tasks registered with ``geometry: true`` append to the observation what a
safety index needs, as plain numbers: robot position (2), robot planar velocity (2), and per
hazard its position (2) and radius (1) — ``geometry_dim(H) = 4 + 3H`` entries, H =
``n_hazards`` in the env spec. Learners that do not use it see it as ordinary features;
``saferl.learners.safety_index`` splits it off.
"""
from __future__ import annotations

import math

import torch

from saferl.envs.diff import DiffEnv

GOAL = (0.0, 5.0)
HAZARD_RADIUS = 0.5
DISTRIBUTIONS = {  # (agent x, agent y, hazard y) intervals; heading offset U[−π/4, π/4]
    1: ((0.0, 0.0), (-1.5, -1.0), (0.5, 1.0)),
    2: ((0.0, 0.0), (-1.5, -0.5), (0.5, 1.5)),
    3: ((-0.5, 0.5), (-1.5, -0.5), (0.5, 1.0)),
}


# acc_max, v_max, omega_max (module docstring). The authors' reference environment bounds speed at
# 2, acceleration at 4 and turn rate at π, with dt 0.1 and RK4; here dt is 0.05 with the Euler step.
DEFAULT_CONSTANTS = {"acc_max": 2.25, "v_max": 2.0, "omega_max": 2.0}


def geometry_dim(n_hazards: int) -> int:
    return 4 + 3 * n_hazards


class PointHazardEnv(DiffEnv):
    obs_dim = 9 + geometry_dim(1)
    act_dim = 2
    max_episode_steps = 120
    n_hazards = 1
    dt = 0.05
    reach_time = 5.0

    def __init__(self, distribution: int = 1, acc_max: float = DEFAULT_CONSTANTS["acc_max"],
                 v_max: float = DEFAULT_CONSTANTS["v_max"], omega_max: float = DEFAULT_CONSTANTS["omega_max"]):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {sorted(DISTRIBUTIONS)} (got {distribution})")
        for name, value in (("acc_max", acc_max), ("v_max", v_max), ("omega_max", omega_max)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 (got {value})")
        self.distribution = distribution
        self.acc_max, self.v_max, self.omega_max = float(acc_max), float(v_max), float(omega_max)

    def constants(self) -> dict:
        return {"acc_max": self.acc_max, "v_max": self.v_max, "omega_max": self.omega_max, "dt": self.dt}

    def initial_state(self, n: int, generator: torch.Generator) -> torch.Tensor:
        (x0, x1), (y0, y1), (h0, h1) = DISTRIBUTIONS[self.distribution]
        u = torch.rand(n, 4, generator=generator)
        x, y, hy = x0 + (x1 - x0) * u[:, 0], y0 + (y1 - y0) * u[:, 1], h0 + (h1 - h0) * u[:, 3]
        theta = math.pi / 2 + (u[:, 2] * 2 - 1) * math.pi / 4
        zero = torch.zeros(n)
        return torch.stack([x, y, theta, zero, zero, hy], -1)

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        x, y, th, v, hx, hy = state.unbind(-1)
        gx, gy = GOAL
        radius = torch.full_like(x, HAZARD_RADIUS)
        policy_obs = [x, y, th.cos(), th.sin(), v, hx - x, hy - y, gx - x, gy - y]
        geometry = [x, y, v * th.cos(), v * th.sin(), hx, hy, radius]
        return torch.stack(policy_obs + geometry, -1)

    def step(self, state: torch.Tensor, action: torch.Tensor):
        x, y, th, v, hx, hy = state.unbind(-1)
        a = action.clamp(-1.0, 1.0)
        th = th + self.omega_max * a[:, 0] * self.dt
        v = (v + self.acc_max * a[:, 1] * self.dt).clamp(-self.v_max, self.v_max)
        x, y = x + v * th.cos() * self.dt, y + v * th.sin() * self.dt
        gx, gy = GOAL
        dist = torch.hypot(gx - x, gy - y)
        heading_err = torch.remainder(th - torch.atan2(gy - y, gx - x) + math.pi, 2 * math.pi) - math.pi
        reward = -heading_err.abs() - (v - dist / self.reach_time).abs()
        cost = (torch.hypot(hx - x, hy - y) < HAZARD_RADIUS).to(state.dtype)
        return torch.stack([x, y, th, v, hx, hy], -1), reward, cost
