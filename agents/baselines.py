"""Reference agents: log replay (the realism upper reference), constant velocity, and random (the lower one).
The IDM lane follower lives in ``agents/idm.py``."""

from __future__ import annotations

import torch

from agents.base import Agent
from agents.registry import register_agent
from envs.dynamics import InvertibleBicycle, StatePose
from envs.types import Action, SimState


def _constant_velocity_pose(state: SimState) -> torch.Tensor:
    """``(B, A, 3)`` next pose keeping each agent's current velocity and heading."""
    cur = state.current
    return torch.stack([cur[..., 0] + cur[..., 3] * state.dt, cur[..., 1] + cur[..., 4] * state.dt, cur[..., 2]], -1)


@register_agent("log_replay")
class LogReplay(Agent):
    """Sets each driven agent to its logged pose at the next step, and lets it leave when its log does (the
    action is invalid there, so the simulator replays the absence): the rollout is exactly the log."""

    dynamics = StatePose()

    def act(self, state, mask):
        b = torch.arange(state.batch_size, device=state.device)
        nxt = (state.t + 1).clamp(max=state.num_steps - 1)
        logged = state.log[b, :, nxt, :3]
        has_log = state.log_valid[b, :, nxt] & (state.t < state.end)[:, None]
        return Action(logged, mask & has_log)


@register_agent("constant_velocity")
class ConstantVelocity(Agent):
    """Keeps every driven agent's current velocity vector and heading."""

    dynamics = StatePose()

    def act(self, state, mask):
        return Action(_constant_velocity_pose(state), mask.clone())


@register_agent("random")
class RandomAgent(Agent):
    """Independent random bicycle actions each step: acceleration ~ N(0, ``accel_std``²) m/s² and curvature ~
    N(0, ``curvature_std``²) 1/m, clipped to the bicycle's bounds. Deterministic given the reset seed."""

    dynamics = InvertibleBicycle()

    def __init__(self, accel_std: float = 2.0, curvature_std: float = 0.05):
        super().__init__()
        if accel_std < 0 or curvature_std < 0:
            raise ValueError(f"Standard deviations must be >= 0, got {accel_std}, {curvature_std}.")
        self.std = torch.tensor([accel_std, curvature_std])

    def act(self, state, mask):
        noise = torch.randn(state.batch_size, state.num_agents, 2, generator=self.generator)
        low, high = self.dynamics.bounds()
        data = torch.maximum(torch.minimum(noise * self.std, high), low).to(state.device)
        return Action(data, mask.clone())
