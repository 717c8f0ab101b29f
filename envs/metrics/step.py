"""Per-step metrics over a batched ``SimState``, all ``(B, A)`` tensors, batched with no Python agent loops.

Each metric is registered with its units and how invalid agents are treated; values of invalid or padding
agents are 0 (False) and must be read together with ``state.current_valid``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from envs.errors import TrafficGymError, UnknownNameError
from envs.geometry import box_corners, boxes_overlap
from envs.map_index import sample_sdf
from envs.types import ROUTE_SPACING, AgentType, SimState

OFFROAD_TOLERANCE = 0.0  # m a box corner may lie beyond the road edge before it counts as off-road


@dataclass(frozen=True)
class StepMetric:
    name: str
    units: str
    doc: str
    fn: Callable[[SimState, dict], torch.Tensor]


STEP_METRICS: dict[str, StepMetric] = {}


def register_step_metric(name: str, units: str, doc: str):
    """Decorator registering ``fn(state, cache) -> (B, A) tensor``; duplicate names are refused."""

    def wrap(fn):
        if name in STEP_METRICS:
            raise TrafficGymError(f"Step metric {name!r} is already registered.")
        STEP_METRICS[name] = StepMetric(name, units, doc, fn)
        return fn

    return wrap


def _memo(cache: dict | None, key: str, fn):
    """``cache[key]``, computed by ``fn()`` on first use (metrics of one step share intermediate results)."""
    if cache is None:
        return fn()
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def _current(state: SimState, cache: dict | None) -> torch.Tensor:
    return _memo(cache, "current", lambda: state.current)


def _live(state: SimState, cache: dict | None = None) -> torch.Tensor:
    return _memo(cache, "live", lambda: state.current_valid & state.agent_mask)


def _corners(state: SimState, cache: dict) -> torch.Tensor:
    if "corners" not in cache:
        cur = _current(state, cache)
        cache["corners"] = box_corners(cur[..., 0], cur[..., 1], cur[..., 2], state.extent[..., 0],
                                       state.extent[..., 1])  # (B, A, 4, 2)
    return cache["corners"]


def collision_pairs(state: SimState, cache: dict | None = None) -> torch.Tensor:
    """``(K, 3)`` long rows ``(b, i, j)``, ``i < j``, of overlapping boxes among live agents at the current step.

    A bounding-circle test picks candidate pairs; the exact oriented-box test runs on those alone.
    """
    cache = {} if cache is None else cache
    if "pairs" in cache:
        return cache["pairs"]
    cur, live = _current(state, cache), _live(state, cache)
    radius = 0.5 * state.extent.norm(dim=-1)  # (B, A)
    # Squared centre distances by broadcasting (torch.cdist's thread pool stalls when the other core is busy).
    dx = cur[:, :, None, 0] - cur[:, None, :, 0]
    dy = cur[:, :, None, 1] - cur[:, None, :, 1]
    reach = radius[:, :, None] + radius[:, None, :]
    ar = torch.arange(state.num_agents, device=state.device)
    upper = ar[:, None] < ar[None, :]  # (torch.triu is pathologically slow on tiny bool matrices)
    candidates = (dx * dx + dy * dy < reach * reach) & live[:, :, None] & live[:, None, :] & upper
    idx = candidates.nonzero()  # (K, 3)
    corners = _corners(state, cache)
    hit = boxes_overlap(corners[idx[:, 0], idx[:, 1]], corners[idx[:, 0], idx[:, 2]])
    cache["pairs"] = idx[hit]
    return cache["pairs"]


@register_step_metric("collision", "bool", "Box overlaps another live agent's box (separating-axis test).")
def collision(state: SimState, cache: dict) -> torch.Tensor:
    pairs = collision_pairs(state, cache)
    out = torch.zeros(state.batch_size, state.num_agents, dtype=torch.bool, device=state.device)
    out[pairs[:, 0], pairs[:, 1]] = True
    out[pairs[:, 0], pairs[:, 2]] = True
    return out


@register_step_metric("road_edge_distance", "m",
                      "Signed distance of the box's worst corner to the road edge (> 0: beyond it). "
                      "0 on maps without road edges.")
def road_edge_distance(state: SimState, cache: dict) -> torch.Tensor:
    return _memo(cache, "road_edge_distance", lambda: _road_edge_distance(state, cache))


def _road_edge_distance(state: SimState, cache: dict) -> torch.Tensor:
    corners = _corners(state, cache).reshape(state.batch_size, -1, 2)  # (B, A*4, 2)
    maps = state.maps
    d = sample_sdf(maps.sdf, maps.sdf_origin, maps.sdf_resolution, state.map_idx, corners)
    d = d.reshape(state.batch_size, state.num_agents, 4).amax(dim=-1)
    has = maps.has_road_edges[state.map_idx][:, None]
    return torch.where(_live(state, cache) & has, d, torch.zeros_like(d))


@register_step_metric("offroad", "bool",
                      "A vehicle's box corner lies beyond the road edge (pedestrians/cyclists: always False).")
def offroad(state: SimState, cache: dict) -> torch.Tensor:
    vehicle = state.agent_type == AgentType.VEHICLE
    return (road_edge_distance(state, cache) > OFFROAD_TOLERANCE) & vehicle & _live(state, cache)


@register_step_metric("progress", "m", "Distance along the agent's own logged path (resampled every 1 m) to the "
                      "projection of its current position; 0 for agents never logged.")
def progress(state: SimState, cache: dict) -> torch.Tensor:
    xy = _current(state, cache)[..., :2]  # (B, A, 2)
    pos = state.route_pos
    last = (state.route_len - 1).clamp(min=0)

    def point(i):
        return state.route_xy.gather(2, i[..., None, None].expand(*i.shape, 1, 2)).squeeze(2)  # (B, A, 2)

    # Project onto the segments before and after the nearest point; keep the closer projection.
    best = None
    for lo in ((pos - 1).clamp(min=0), pos):
        hi = torch.minimum(lo + 1, last)
        p0, p1 = point(lo), point(hi)
        seg = p1 - p0
        frac = (((xy - p0) * seg).sum(-1) / (seg * seg).sum(-1).clamp(min=1e-9)).clamp(0, 1)
        dist = (p0 + frac[..., None] * seg - xy).norm(dim=-1)
        along = (lo + frac * (hi > lo)) * ROUTE_SPACING
        best = (dist, along) if best is None else (torch.minimum(best[0], dist),
                                                  torch.where(dist < best[0], along, best[1]))
    return best[1] * (_live(state, cache) & (state.route_len > 0))


@register_step_metric("log_divergence", "m", "Distance from the agent's position to its logged position at the "
                      "same step (0 where the log has no position).")
def log_divergence(state: SimState, cache: dict) -> torch.Tensor:
    d = (_current(state, cache)[..., :2] - state.at(state.log)[..., :2]).norm(dim=-1)
    ok = _live(state, cache) & state.at(state.log_valid)
    return torch.where(ok, d, torch.zeros_like(d))


def _speed_history(state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
    """Speeds ``(B, A, 3)`` at t-2, t-1, t and whether all three are valid ``(B, A)``."""
    steps = torch.stack([(state.t - k).clamp(min=0) for k in (2, 1, 0)], dim=-1)  # (B, 3)
    b = torch.arange(state.batch_size, device=state.device)[:, None]
    vel = state.traj[b, :, steps][..., 3:5]  # (B, 3, A, 2)
    ok = state.valid[b, :, steps].all(dim=1) & (state.t[:, None] >= 2)
    return vel.norm(dim=-1).permute(0, 2, 1), ok


@register_step_metric("acceleration", "m/s^2", "Change of speed over the last step (0 until 3 valid steps).")
def acceleration(state: SimState, cache: dict) -> torch.Tensor:
    speed, ok = _memo(cache, "speed_history", lambda: _speed_history(state))
    a = (speed[..., 2] - speed[..., 1]) / state.dt
    return torch.where(ok, a, torch.zeros_like(a))


@register_step_metric("jerk", "m/s^3", "Change of acceleration over the last step (0 until 3 valid steps).")
def jerk(state: SimState, cache: dict) -> torch.Tensor:
    speed, ok = _memo(cache, "speed_history", lambda: _speed_history(state))
    j = (speed[..., 2] - 2 * speed[..., 1] + speed[..., 0]) / state.dt**2
    return torch.where(ok, j, torch.zeros_like(j))


@register_step_metric("speed", "m/s", "Magnitude of the velocity.")
def speed(state: SimState, cache: dict) -> torch.Tensor:
    v = _current(state, cache)[..., 3:5].norm(dim=-1)
    return torch.where(_live(state, cache), v, torch.zeros_like(v))


def compute_step_metrics(state: SimState, names=None, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Every requested metric (default: all registered) on the current step, as ``(B, A)`` tensors.

    ``extra`` holds step inputs the state cannot know (``"infeasible"``: the applied action's flag); they are
    passed through as metrics of the same name.
    """
    return _compute(state, names, extra, {})


def compute_step_metrics_and_pairs(state: SimState, names=None, extra: dict | None = None
                                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``compute_step_metrics`` and the colliding pairs ``(K, 3)`` ``(b, i, j)`` (``collision_pairs``): the
    collision test runs once for both."""
    cache: dict = {}
    metrics = _compute(state, names, extra, cache)
    return metrics, collision_pairs(state, cache)


def _compute(state: SimState, names, extra: dict | None, cache: dict) -> dict[str, torch.Tensor]:
    extra = extra or {}
    names = [*STEP_METRICS, *extra] if names is None else list(names)
    out = {}
    for name in names:
        if name in extra:
            out[name] = extra[name]
        elif name in STEP_METRICS:
            out[name] = STEP_METRICS[name].fn(state, cache)
        else:
            raise UnknownNameError("step metric", name, [*STEP_METRICS, *extra])
    return out
