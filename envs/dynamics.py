"""Dynamics models: how an action moves an agent one step. Each has ``forward`` and ``inverse``.

All work on torch tensors of any batch shape. The agent state is the last axis of ``(..., 5)``:
x, y (box centre, m), heading (rad), vx, vy (m/s, world frame) — ``envs.types.TRAJECTORY_FIELDS``.

``inverse(state, next_state)`` gives the action that ``forward`` turns into ``next_state`` (exactly for
``DeltaLocal`` and ``StatePose``; for the bicycle the pose is reproduced up to what a 2-DoF action cannot
express — see its docstring). Behaviour-cloning labels come from ``inverse(log)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from envs.errors import UnknownNameError
from envs.geometry import wrap_angle

_EPS = 1e-6


def speed_along_heading(state: torch.Tensor) -> torch.Tensor:
    """Signed speed (m/s): the velocity projected on the heading, ``(...)``."""
    return state[..., 3] * torch.cos(state[..., 2]) + state[..., 4] * torch.sin(state[..., 2])


def _accelerate(state: torch.Tensor, accel: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The speed after accelerating by ``accel`` for ``dt`` (braking stops a vehicle; it never drives it
    backwards) and the trapezoidal distance travelled meanwhile, ``(...)`` each."""
    v0 = speed_along_heading(state)
    v1 = v0 + accel * dt
    v1 = torch.where((v0 >= 0) & (v1 < 0), torch.zeros_like(v1), v1)
    return v1, 0.5 * (v0 + v1) * dt


def _advance(state: torch.Tensor, v1: torch.Tensor, distance: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """The next state ``(..., 5)``: ``distance`` along the mean heading of a ``turn``, heading turned by it, speed
    ``v1`` along the new heading."""
    mean_heading = state[..., 2] + 0.5 * turn
    heading = wrap_angle(state[..., 2] + turn)
    return torch.stack([state[..., 0] + distance * torch.cos(mean_heading),
                        state[..., 1] + distance * torch.sin(mean_heading), heading,
                        v1 * torch.cos(heading), v1 * torch.sin(heading)], dim=-1)


class Dynamics(ABC):
    """A dynamics model. ``action_low``/``action_high`` are the physical bounds of one agent's action."""

    name: str
    action_names: tuple[str, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]

    @property
    def action_dim(self) -> int:
        return len(self.action_names)

    def bounds(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.action_low, device=device, dtype=dtype),
                torch.tensor(self.action_high, device=device, dtype=dtype))

    def infeasible(self, action: torch.Tensor) -> torch.Tensor:
        """``(...)`` bool: the action lies outside the physical bounds."""
        low, high = self.bounds(action.device, action.dtype)
        return ((action < low) | (action > high)).any(dim=-1)

    @abstractmethod
    def forward(self, state: torch.Tensor, action: torch.Tensor, dt: float) -> torch.Tensor:
        """Next state ``(..., 5)`` from state ``(..., 5)`` and action ``(..., action_dim)``."""

    @abstractmethod
    def inverse(self, state: torch.Tensor, next_state: torch.Tensor, dt: float) -> torch.Tensor:
        """Action ``(..., action_dim)`` taking ``state`` to (as close as possible to) ``next_state``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DeltaLocal(Dynamics):
    """Action = displacement in the agent's own frame at t: (dx forward m, dy left m, dheading rad).

    Velocity after the step = displacement / dt. ``forward(inverse(s0, s1))`` reproduces the pose exactly.
    Bounds: 6 m forward / 2 m back, 1.5 m sideways and 0.6 rad per 0.1 s step (enough for any logged road user).
    """

    name = "delta_local"
    action_names = ("dx", "dy", "dheading")
    action_low = (-2.0, -1.5, -0.6)
    action_high = (6.0, 1.5, 0.6)

    def forward(self, state, action, dt):
        c, s = torch.cos(state[..., 2]), torch.sin(state[..., 2])
        dx = action[..., 0] * c - action[..., 1] * s
        dy = action[..., 0] * s + action[..., 1] * c
        heading = wrap_angle(state[..., 2] + action[..., 2])
        return torch.stack([state[..., 0] + dx, state[..., 1] + dy, heading, dx / dt, dy / dt], dim=-1)

    def inverse(self, state, next_state, dt):
        d = next_state[..., :2] - state[..., :2]
        c, s = torch.cos(state[..., 2]), torch.sin(state[..., 2])
        return torch.stack([d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c,
                            wrap_angle(next_state[..., 2] - state[..., 2])], dim=-1)


class InvertibleBicycle(Dynamics):
    """Kinematic bicycle with action (acceleration m/s², curvature 1/m).

    Speed changes by ``a·dt``; the heading turns by ``curvature × distance travelled`` (so a standing vehicle
    cannot turn on the spot); the position advances by the trapezoidal distance along the mean heading.
    ``inverse`` takes the speed change from the velocities and the curvature from the heading change, so
    ``forward(inverse(s0, s1))`` reproduces heading and speed exactly; the position matches to the extent the
    logged displacement agrees with the logged speeds (measured on the towns data in the README).
    Braking stops a moving vehicle and never reverses it (no reverse gear in this model).
    Bounds: accel in [-10, 6] m/s² (hard braking to brisk acceleration), |curvature| <= 0.3 1/m (3.3 m radius).
    """

    name = "bicycle"
    action_names = ("acceleration", "curvature")
    action_low = (-10.0, -0.3)
    action_high = (6.0, 0.3)

    def forward(self, state, action, dt):
        v1, distance = _accelerate(state, action[..., 0], dt)
        return _advance(state, v1, distance, action[..., 1] * distance)

    def inverse(self, state, next_state, dt):
        v0, v1 = speed_along_heading(state), speed_along_heading(next_state)
        accel = (v1 - v0) / dt
        distance = 0.5 * (v0 + v1) * dt
        turn = wrap_angle(next_state[..., 2] - state[..., 2])
        safe = distance.abs() > _EPS
        curvature = torch.where(safe, turn / torch.where(safe, distance, torch.ones_like(distance)),
                                torch.zeros_like(turn))
        return torch.stack([accel, curvature], dim=-1)


class Unicycle(Dynamics):
    """Unicycle with action (acceleration m/s², yaw rate rad/s): the action space of the latent diffusion policy.

    Speed changes by ``a·dt`` and the heading by ``yaw_rate·dt`` (it can turn on the spot, unlike the bicycle);
    the position advances by the trapezoidal distance along the mean heading. ``inverse`` takes the speed change
    from the velocities and the yaw rate from the heading change, so ``forward(inverse(s0, s1))`` reproduces heading
    and speed exactly and the position as far as the logged displacement agrees with the logged speeds (the
    towns round trip is in the README). Braking stops a moving vehicle and never reverses it.
    Bounds: accel in [-10, 6] m/s² (as the bicycle), |yaw rate| <= 1.5 rad/s.
    """

    name = "unicycle"
    action_names = ("acceleration", "yaw_rate")
    action_low = (-10.0, -1.5)
    action_high = (6.0, 1.5)

    def forward(self, state, action, dt):
        v1, distance = _accelerate(state, action[..., 0], dt)
        return _advance(state, v1, distance, action[..., 1] * dt)

    def inverse(self, state, next_state, dt):
        v0, v1 = speed_along_heading(state), speed_along_heading(next_state)
        return torch.stack([(v1 - v0) / dt, wrap_angle(next_state[..., 2] - state[..., 2]) / dt], dim=-1)


class StatePose(Dynamics):
    """Action = the next pose in the world frame (x m, y m, heading rad): for planners and token policies
    that emit poses. Velocity = displacement / dt. Bounds are the world itself; per-step plausibility is
    what the ``infeasible`` check reports (more than 6 m or 0.6 rad in one step)."""

    name = "pose"
    action_names = ("x", "y", "heading")
    action_low = (-1e6, -1e6, -torch.pi)
    action_high = (1e6, 1e6, torch.pi)
    max_step_m, max_step_rad = 6.0, 0.6

    def forward(self, state, action, dt):
        d = action[..., :2] - state[..., :2]
        return torch.stack([action[..., 0], action[..., 1], wrap_angle(action[..., 2]), d[..., 0] / dt,
                            d[..., 1] / dt], dim=-1)

    def inverse(self, state, next_state, dt):
        return next_state[..., :3].clone()

    def infeasible_step(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        jump = (action[..., :2] - state[..., :2]).norm(dim=-1) > self.max_step_m
        turn = wrap_angle(action[..., 2] - state[..., 2]).abs() > self.max_step_rad
        return jump | turn


DYNAMICS: dict[str, type[Dynamics]] = {cls.name: cls for cls in (DeltaLocal, InvertibleBicycle, Unicycle, StatePose)}


def make_dynamics(name: str | Dynamics) -> Dynamics:
    """A dynamics model by name (``"bicycle"``, ``"unicycle"``, ``"delta_local"``, ``"pose"``) or pass-through of
    an instance."""
    if isinstance(name, Dynamics):
        return name
    if name not in DYNAMICS:
        raise UnknownNameError("dynamics model", name, DYNAMICS)
    return DYNAMICS[name]()


def from_normalized(action, low, high):
    """``action_scale="normalized"`` -> physical units: [-1, 0, 1] maps piecewise-linearly onto [low, 0, high]
    (so 0 stays "no acceleration, no steering"). numpy arrays or torch tensors; ``low``/``high`` broadcast."""
    if isinstance(action, torch.Tensor):
        low, high = torch.as_tensor(low, dtype=action.dtype), torch.as_tensor(high, dtype=action.dtype)
        return torch.where(action >= 0, action * high, -action * low)
    import numpy as np

    return np.where(action >= 0, action * high, -action * low).astype(np.float32)


def to_normalized(action, low, high):
    """The inverse of ``from_normalized`` (physical units -> [-1, 1] for actions within [low, high])."""
    if isinstance(action, torch.Tensor):
        low, high = torch.as_tensor(low, dtype=action.dtype), torch.as_tensor(high, dtype=action.dtype)
        return torch.where(action >= 0, action / high, -action / low)
    import numpy as np

    return np.where(action >= 0, action / high, -action / low).astype(np.float32)
