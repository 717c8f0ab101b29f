"""Per (rollout, agent, step) features of a scene, shared by every episode-metric family.

Everything is batched over ``B`` samples (``R`` rollouts, or ``R = 1`` for the log) × ``A`` evaluated agents
× ``T`` steps, by compiled loops (``kernels.py``) with torch tensors in and out. Every feature is a
``Feature(value, valid)`` pair of ``(B, A, T)`` tensors: a feature is valid only where every sample it is
computed from is valid; invalid entries hold 0 and must be ignored.

Kinematic features (``kinematic_features``) use central differences of positions / headings, so they are
valid from the second to the second-to-last step of a valid stretch (acceleration: third to third-to-last).
Interaction and map features (``interaction_features``, ``road_edge_features``) are computed per step from the
boxes; ``scene_features`` assembles everything for the future steps of a ``Rollouts`` (memoised per object, so
the realism, BLM and planning families share one computation).

Objects interacting with the evaluated agents: the other evaluated agents of the same sample plus the
``Rollouts.context`` agents (log-replayed, identical in every rollout) for the BLM features (overlaps, RSS,
closest approach); for the WOSAC features (nearest rounded-box distance, time to collision) only the evaluated
agents valid at the current step, as the official metric defines its objects.

The WOSAC features (``wosac_*`` kinematics, ``distance_to_nearest_object``, ``collision``, ``time_to_collision``,
``distance_to_road_edge``, ``traffic_light_violation``) follow the official Waymo implementation's definitions;
``realism.py`` scores them. Their ``valid`` means "counts": for a rollout, the value enters its histogram; for
the log, the value is scored.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch

from envs.geometry import pose_in_frame, to_world
from envs.metrics.episode import RolloutError, Rollouts, cpu_numpy
from envs.metrics.kernels import interaction_pairs, kinematics, wosac_kinematics
from envs.road_edges import box_edge_distance
from envs.types import AgentType

TTC_CAP = 5.0  # s: time-to-collision values (and "nothing ahead") are capped here (WOSAC)
TTC_MAX_HEADING_DIFF = math.radians(75.0)  # an object is "followed" only if headed within this of the agent
TTC_SMALL_OVERLAP = 0.5  # m: a followed object overlapping the agent's lane by less than this ...
TTC_SMALL_OVERLAP_HEADING = math.radians(10.0)  # ... must be headed within this of the agent (WOSAC)
NEIGHBOURS = 8  # objects per agent (nearest centres) for RSS and closest approach
OFFROAD_THRESHOLD = 0.0  # m: an agent is off-road when its worst corner is beyond the road edge by more
# RSS parameters (BLM): response time, longitudinal accel / brake, lateral accel / brake, lateral margin.
RSS_RHO = 0.5  # s
RSS_ACCEL = 2.0  # m/s^2
RSS_BRAKE = 4.0  # m/s^2 (used as both the rear car's minimum and the front car's maximum braking)
RSS_LAT_ACCEL = 1.5  # m/s^2
RSS_LAT_BRAKE = 2.5  # m/s^2
RSS_MU = 0.2  # m


class Feature(NamedTuple):
    """A feature's values and validity, both ``(B, A, T)``; value is 0 where invalid."""

    value: torch.Tensor
    valid: torch.Tensor


# ------------------------------------------------------------------------------------------------------------
# Kinematics
# ------------------------------------------------------------------------------------------------------------

def kinematic_features(traj: torch.Tensor, valid: torch.Tensor, dt: float, start: int = 0) -> dict[str, Feature]:
    """Kinematics from positions and headings (velocities in ``traj`` are not used, as in WOSAC).

    Each is a central difference ``(v[t+1] - v[t-1]) / (2 dt)``, valid where t - 1, t and t + 1 are valid (so
    the first and last steps of a valid stretch are not): ``linear_speed`` (m/s, of position: the norm of the
    displacement), ``linear_accel`` (m/s^2, signed: of speed), ``jerk`` (m/s^3, of acceleration),
    ``angular_speed`` (rad/s, of heading, the difference wrapped to [-pi, pi)), ``angular_accel`` (rad/s^2).
    One compiled pass over the tracks (``kernels.kinematics``; the differences in float64).

    Args:
        traj: ``(..., T, 5)`` x, y (m), heading (rad), vx, vy; valid ``(..., T)`` bool; dt: s per step;
        start: the first step returned (e.g. the history length, for the future steps only).
    Returns:
        each feature ``(..., T - start)``, in the dtype and on the device of ``traj``.
    """
    lead, t = traj.shape[:-2], traj.shape[-2]
    values, ok = kinematics(cpu_numpy(traj.reshape(-1, t, 5)), cpu_numpy(valid.reshape(-1, t)), float(dt), int(start))
    values = torch.from_numpy(values).to(traj.device).reshape(5, *lead, t - start)
    ok = torch.from_numpy(ok).to(traj.device).reshape(5, *lead, t - start)
    return {name: Feature(values[k], ok[k]) for k, name in
            enumerate(("linear_speed", "linear_accel", "jerk", "angular_speed", "angular_accel"))}


# ------------------------------------------------------------------------------------------------------------
# Box geometry
# ------------------------------------------------------------------------------------------------------------

def _box_frames(box_a: torch.Tensor, box_b: torch.Tensor):
    """Centre of each box in the other's frame, relative heading and half sizes (shared by the two below)."""
    b_in_a = pose_in_frame(box_b[..., :3], box_a[..., :3], wrap=False)
    a_in_b = pose_in_frame(box_a[..., :3], box_b[..., :3], wrap=False)
    halves = (box_a[..., 3] / 2, box_a[..., 4] / 2, box_b[..., 3] / 2, box_b[..., 4] / 2)
    return (b_in_a[..., 0], b_in_a[..., 1]), (a_in_b[..., 0], a_in_b[..., 1]), b_in_a[..., 2], halves


def separating_gap(box_a: torch.Tensor, box_b: torch.Tensor, frames=None) -> torch.Tensor:
    """Largest separating-axis gap over the four edge normals of two oriented boxes ``(..., 5)`` -> ``(...)`` (m).

    A lower bound on the distance between separated boxes, and exactly minus the penetration depth (the signed
    distance) when they overlap (gap < 0), since for convex polygons the minimum translation is along an edge
    normal. Boxes are ``x, y, heading, length, width``.
    """
    (ax_, ay_), (bx_, by_), rel, (la, wa, lb, wb) = frames or _box_frames(box_a, box_b)
    cr, sr = torch.cos(rel).abs(), torch.sin(rel).abs()
    # Projections of a rectangle on another's axis have half-extent |cos| l + |sin| w.
    return torch.maximum(torch.maximum(ax_.abs() - la - (cr * lb + sr * wb), ay_.abs() - wa - (sr * lb + cr * wb)),
                         torch.maximum(bx_.abs() - lb - (cr * la + sr * wa), by_.abs() - wb - (sr * la + cr * wa)))


def box_signed_distance(box_a: torch.Tensor, box_b: torch.Tensor) -> torch.Tensor:
    """Exact signed distance between oriented boxes, ``(..., 5)`` x ``(..., 5)`` -> ``(...)`` (m).

    Boxes are ``x, y, heading, length, width``. Separated boxes: the Euclidean distance between them (the
    closest pair of points always involves a corner of one box, so it is the smaller of the corner-to-box
    distances of either box's corners). Overlapping boxes: minus the penetration depth (``separating_gap``).
    Touching boxes: 0. Symmetric in its arguments and invariant to a shared rigid transform.
    """
    frames = _box_frames(box_a, box_b)
    (ax_, ay_), (bx_, by_), rel, (la, wa, lb, wb) = frames
    depth = separating_gap(box_a, box_b, frames)
    sep = torch.minimum(_corners_to_box(ax_, ay_, rel, lb, wb, la, wa),
                        _corners_to_box(bx_, by_, -rel, la, wa, lb, wb))
    return torch.where(depth < 0, depth, sep)


def _corners_to_box(cx, cy, rel, hl_b, hw_b, hl_a, hw_a) -> torch.Tensor:
    """Smallest distance from the 4 corners of box b (centre ``cx, cy`` and heading ``rel`` in box a's frame,
    half sizes ``hl_b, hw_b``) to the filled axis-aligned box a (half sizes ``hl_a, hw_a``)."""
    sx = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=cx.dtype, device=cx.device)
    sy = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=cx.dtype, device=cx.device)
    corners = torch.stack([sx * hl_b[..., None], sy * hw_b[..., None]], dim=-1)  # (..., 4, 2) in b's frame
    p = to_world(corners, torch.stack([cx, cy], dim=-1), rel)  # (..., 4, 2) in a's frame
    px, py = p[..., 0], p[..., 1]
    ex = (px.abs() - hl_a[..., None]).clamp(min=0)
    ey = (py.abs() - hw_a[..., None]).clamp(min=0)
    return torch.sqrt(ex * ex + ey * ey).amin(dim=-1)


# ------------------------------------------------------------------------------------------------------------
# Interaction features
# ------------------------------------------------------------------------------------------------------------

def interaction_features(agents: torch.Tensor, agents_valid: torch.Tensor, extent: torch.Tensor,
                         others: torch.Tensor | None = None, others_valid: torch.Tensor | None = None,
                         others_extent: torch.Tensor | None = None, speed: torch.Tensor | None = None,
                         wosac_objects: torch.Tensor | None = None, neighbours: int = NEIGHBOURS) -> dict[str, Feature]:
    """Box-to-box features of every agent against the other objects at the same step.

    Computed by one compiled loop over frames and agents (``kernels.py``, numba, on the CPU; inputs on another
    device are copied there and back). Exact: an object is skipped only where a bound proves it cannot matter.

    Args:
        agents: ``(B, A, T, 5)`` x, y, heading, vx, vy of the evaluated agents; agents_valid ``(B, A, T)``;
            extent ``(A, 2)`` length, width (m).
        others: optional ``(1, O, T, 5)`` further objects shared by every sample (context), others_valid
            ``(1, O, T)``, others_extent ``(O, 2)``.
        speed: ``(B, A, T)`` the agents' speeds from central differences of positions (m/s, NaN where there is
            none; default: the norm of vx, vy), for the time to collision.
        wosac_objects: ``(A,)`` bool, the agents that are objects of the WOSAC features (default: all).
    Returns ``(B, A, T)`` features:
        ``distance_to_nearest_object`` (m, WOSAC: the signed distance between boxes with rounded corners — each
        box's corners rounded with radius 0.7 x half its shorter side — to the nearest other WOSAC object, < 0
        overlapping; ``NO_OBJECT`` = 1e10 where there is none), ``collision`` (bool, that distance < 0),
        ``overlaps_agents`` / ``overlaps_context`` (number of evaluated / context boxes, sharp, overlapping the
        agent's), ``time_to_collision`` (s, WOSAC: with the nearest WOSAC object followed ahead — headed within
        75° of the agent (headings not wrapped), entirely ahead of its front, overlapping its lane laterally, by
        at least 0.5 m or headed within 10° — the longitudinal gap over the difference of the two speeds; 5 s if
        nothing is followed, it is not closing, or a speed is missing), ``rss_longitudinal`` / ``rss_lateral``
        (bool RSS violations with the ``neighbours`` nearest objects, see ``blm.py``), ``closest_approach_ttc`` (s,
        minimum over those objects of the time of closest approach at constant velocities, for approaching pairs
        whose bounding circles would touch then; ``TTC_CAP`` otherwise). All valid where the agent is.
    """
    t = agents.shape[2]
    dev, dtype = agents.device, agents.dtype
    if others is not None and others.shape[1] > 0:
        if others.shape[0] != 1:
            raise ValueError(f"interaction_features: context objects are shared by every sample, (1, O, T, 5); "
                             f"got {tuple(others.shape)}.")
        ctx, ctx_valid, objs_extent = others[0], others_valid[0], torch.cat([extent, others_extent], dim=0)
    else:
        ctx, ctx_valid, objs_extent = agents.new_zeros((0, t, 5)), agents_valid.new_zeros((0, t)), extent
    if speed is None:
        speed = agents[..., 3:5].norm(dim=-1)
    if wosac_objects is None:
        wosac_objects = torch.ones(agents.shape[1], dtype=torch.bool)
    params = (TTC_CAP, TTC_MAX_HEADING_DIFF, TTC_SMALL_OVERLAP_HEADING, TTC_SMALL_OVERLAP, RSS_RHO, RSS_ACCEL,
              RSS_BRAKE, RSS_LAT_ACCEL, RSS_LAT_BRAKE, RSS_MU)
    out = interaction_pairs(cpu_numpy(agents), cpu_numpy(agents_valid), cpu_numpy(speed.float()),
                            cpu_numpy(ctx.to(agents.dtype)), cpu_numpy(ctx_valid), cpu_numpy(objs_extent.float()),
                            cpu_numpy(wosac_objects), neighbours, params)
    nearest, n_agents, n_context, ttc, rss_long, rss_lat, approach = (
        torch.from_numpy(x).to(dev, dtype if x.dtype.kind == "f" else None) for x in out)
    own_valid = agents_valid
    return {
        "distance_to_nearest_object": Feature(nearest, own_valid),
        "collision": Feature(nearest < 0, own_valid),
        "overlaps_agents": Feature(n_agents, own_valid),
        "overlaps_context": Feature(n_context, own_valid),
        "time_to_collision": Feature(ttc, own_valid),
        "rss_longitudinal": Feature(rss_long, own_valid),
        "rss_lateral": Feature(rss_lat, own_valid),
        "closest_approach_ttc": Feature(approach, own_valid),
    }


# ------------------------------------------------------------------------------------------------------------
# Map features
# ------------------------------------------------------------------------------------------------------------

def has_road_edges(map_index) -> bool:
    """Whether off-road is defined on the map of a ``Rollouts`` (a ``MapIndex`` with metric road edges)."""
    return map_index is not None and map_index.has_road_edges and not map_index.road_edges.empty


def road_edge_features(traj: torch.Tensor, valid: torch.Tensor, extent: torch.Tensor, agent_type: torch.Tensor,
                       map_index) -> dict[str, Feature]:
    """Signed distance of the worst box corner to the road edge, and off-road.

    Args:
        traj: ``(B, A, T, 5)``; valid ``(B, A, T)``; extent ``(A, 2)``; agent_type ``(A,)`` ``AgentType``;
        map_index: ``envs.map_index.MapIndex`` or None.
    Returns ``(B, A, T)`` features: ``distance_to_road_edge`` (m, the largest over the 4 corners of the exact
    signed distance to the map's metric road edges, ``envs.road_edges``; > 0 beyond the edge), ``offroad`` (bool, a
    *vehicle* whose distance exceeds ``OFFROAD_THRESHOLD``: BLM's off-road; the WOSAC one counts every type). Both
    are invalid everywhere when the map is missing or has no road edges.
    """
    if not has_road_edges(map_index):
        none = torch.zeros_like(valid)
        return {"distance_to_road_edge": Feature(torch.zeros_like(traj[..., 0]), none),
                "offroad": Feature(none.clone(), none)}
    d = box_edge_distance(cpu_numpy(traj), cpu_numpy(valid), cpu_numpy(extent), *map_index.road_edges.kernel_args())
    d = torch.from_numpy(d).to(traj.device, traj.dtype)
    vehicle = (agent_type == AgentType.VEHICLE).to(traj.device)
    return {"distance_to_road_edge": Feature(d, valid),
            "offroad": Feature(valid & vehicle[:, None] & (d > OFFROAD_THRESHOLD), valid)}


# ------------------------------------------------------------------------------------------------------------
# Scene features of a Rollouts
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SceneFeatures:
    """Features of the future steps of the simulation (``B = R``) and of the log (``B = 1``).

    ``sim[name]`` / ``log[name]``: ``Feature`` of ``(B, A, T_future)`` tensors; ``sim_valid`` ``(R, A, T_future)``
    and ``log_valid`` ``(1, A, T_future)`` are the agents' own validity on those steps.
    """

    sim: dict[str, Feature]
    log: dict[str, Feature]
    sim_valid: torch.Tensor
    log_valid: torch.Tensor
    joint: dict[str, Feature]  # (R + 1, A, T_future): the rollouts, then the log (``sim`` / ``log`` are views)


def _features(traj: torch.Tensor, valid: torch.Tensor, r: Rollouts) -> tuple[dict[str, Feature], torch.Tensor]:
    """All features of ``(B, A, T, 5)`` trajectories (the last sample is the log), restricted to the future
    steps."""
    h, n = r.history_steps, traj.shape[0]
    out = kinematic_features(traj, valid, r.dt, start=h)
    # the WOSAC kinematics on the raw arrays (the last sample is the log: scored by its own validity rule)
    is_log = torch.zeros(n, r.num_agents, dtype=torch.bool)
    is_log[-1] = True
    w, use = wosac_kinematics(cpu_numpy(traj.reshape(-1, *traj.shape[2:])),
                              cpu_numpy(valid.reshape(-1, valid.shape[-1])), float(r.dt), int(h),
                              cpu_numpy(is_log.reshape(-1)))
    w = torch.from_numpy(w).reshape(4, n, r.num_agents, -1)
    use = torch.from_numpy(use).reshape(4, n, r.num_agents, -1)
    for k, name in enumerate(("linear_speed", "linear_accel", "angular_speed", "angular_accel")):
        out[f"wosac_{name}"] = Feature(w[k].to(traj.device, traj.dtype), use[k].to(traj.device))
    # one contiguous copy of the future steps: the interaction and road-edge loops both read it as is
    fut, fut_valid = traj[:, :, h:].float().contiguous(), valid[:, :, h:].contiguous()
    extent = r.extent.float()
    ctx = ctx_valid = ctx_extent = None
    if r.context is not None:
        ctx, ctx_valid, ctx_extent = r.context[None, :, h:].float(), r.context_valid[None, :, h:], \
            r.context_extent.float()
    out.update(interaction_features(fut, fut_valid, extent, ctx, ctx_valid, ctx_extent, speed=w[0, :, :],
                                    wosac_objects=r.wosac_objects))
    out.update(road_edge_features(fut, fut_valid, extent, r.agent_type, r.map_index))
    if r.traffic_lights is not None:
        tl = r.traffic_lights.violations(cpu_numpy(traj[..., :2].double()), cpu_numpy(valid))[:, :, h:]
        out["traffic_light_violation"] = Feature(torch.from_numpy(tl).to(traj.device), fut_valid)
    else:  # a scene without signals: nobody ever violates one
        out["traffic_light_violation"] = Feature(torch.zeros_like(fut_valid), fut_valid)
    return out, fut_valid


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scene_features(rollouts: Rollouts) -> SceneFeatures:
    """Features of the simulation and of the log over the future steps (validated, memoised per object)."""
    if rollouts not in _CACHE:
        rollouts.validate()
        r = rollouts.num_rollouts
        with torch.inference_mode():  # the log as one more sample: one pass of every feature instead of two
            both, valid = _features(torch.cat([rollouts.sim, rollouts.log[None].to(rollouts.sim.dtype)]),
                                    torch.cat([rollouts.sim_valid, rollouts.log_valid[None]]), rollouts)
        sim = {k: Feature(f.value[:r], f.valid[:r]) for k, f in both.items()}
        log = {k: Feature(f.value[r:], f.valid[r:]) for k, f in both.items()}
        _CACHE[rollouts] = SceneFeatures(sim, log, valid[:r], valid[r:], both)
    return _CACHE[rollouts]


def require_rollouts(rollouts: Rollouts, minimum: int, what: str) -> None:
    """``RolloutError`` unless there are at least ``minimum`` rollouts (``what`` names the metric)."""
    if rollouts.num_rollouts < minimum:
        raise RolloutError(f"Rollouts {rollouts.scene_id}: {what} needs at least {minimum} rollouts, got "
                           f"{rollouts.num_rollouts}. Sample more rollouts per scene (WOSAC: 32).")
