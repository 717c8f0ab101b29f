"""Per (rollout, agent, step) features of a scene, shared by every episode-metric family.

Everything is batched torch over ``B`` samples (``R`` rollouts, or ``R = 1`` for the log) × ``A`` evaluated agents
× ``T`` steps, with no Python loops over agents or steps. Every feature is a ``Feature(value, valid)`` pair of
``(B, A, T)`` tensors: a feature is valid only where every sample it is computed from is valid; invalid entries
hold 0 and must be ignored.

Kinematic features (``kinematic_features``) use central differences of positions / headings, so they are
valid from the second to the second-to-last step of a valid stretch (acceleration: third to third-to-last).
Interaction and map features (``interaction_features``, ``road_edge_features``) are computed per step from the
boxes; ``scene_features`` assembles everything for the future steps of a ``Rollouts`` (memoised per object, so
the realism, BLM and planning families share one computation).

Objects interacting with the evaluated agents: the other evaluated agents of the same sample plus the
``Rollouts.context`` agents (log-replayed, identical in every rollout).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch

from envs.geometry import box_corners, wrap_angle
from envs.map_index import NO_ROAD_EDGE, sample_sdf
from envs.metrics.episode import RolloutError, Rollouts
from envs.types import AgentType

TTC_CAP = 5.0  # s: time-to-collision values (and "nothing ahead") are capped here (WOSAC)
TTC_MAX_HEADING_DIFF = math.radians(75.0)  # an object is "followed" only if headed within this of the agent
NEIGHBOURS = 8  # objects per agent (nearest centres) for the pair features; nearest distance stays exact
EXACT_CANDIDATES = 2  # neighbours per agent whose exact box distance is computed (certified, see below)
OFFROAD_THRESHOLD = 0.0  # m: a vehicle is off-road when its worst corner is beyond the road edge by more
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

def central_diff(values: torch.Tensor, valid: torch.Tensor, dt: float, wrap: bool = False) -> Feature:
    """``(v[t+1] - v[t-1]) / (2 dt)`` over the last axis, ``(..., T)``; valid where t-1, t and t+1 are valid.

    ``wrap``: differences of angles are wrapped to [-pi, pi) first. The first and last steps are invalid.
    """
    d = values[..., 2:] - values[..., :-2]
    if wrap:
        d = wrap_angle(d)
    ok = valid[..., 2:] & valid[..., :-2] & valid[..., 1:-1]
    out = torch.zeros_like(values)
    out[..., 1:-1] = torch.where(ok, d / (2 * dt), torch.zeros_like(d))
    ok_full = torch.zeros_like(valid)
    ok_full[..., 1:-1] = ok
    return Feature(out, ok_full)


def kinematic_features(traj: torch.Tensor, valid: torch.Tensor, dt: float) -> dict[str, Feature]:
    """Kinematics from positions and headings (velocities in ``traj`` are not used, as in WOSAC).

    Args:
        traj: ``(..., T, 5)`` x, y (m), heading (rad), vx, vy; valid ``(..., T)`` bool; dt: s per step.
    Returns:
        ``linear_speed`` (m/s, central difference of position), ``linear_accel`` (m/s^2, signed: central
        difference of speed), ``jerk`` (m/s^3, central difference of acceleration), ``angular_speed`` (rad/s,
        wrapped central difference of heading), ``angular_accel`` (rad/s^2), each ``(..., T)``.
    """
    step = traj[..., 2:, :2] - traj[..., :-2, :2]
    ok = valid[..., 2:] & valid[..., :-2] & valid[..., 1:-1]
    speed = torch.zeros_like(traj[..., 0])
    speed[..., 1:-1] = torch.where(ok, step.norm(dim=-1) / (2 * dt), torch.zeros_like(step[..., 0]))
    speed_ok = torch.zeros_like(valid)
    speed_ok[..., 1:-1] = ok
    accel = central_diff(speed, speed_ok, dt)
    jerk = central_diff(accel.value, accel.valid, dt)
    ang_speed = central_diff(traj[..., 2], valid, dt, wrap=True)
    ang_accel = central_diff(ang_speed.value, ang_speed.valid, dt)
    return {"linear_speed": Feature(speed, speed_ok), "linear_accel": accel, "jerk": jerk,
            "angular_speed": ang_speed, "angular_accel": ang_accel}


# ------------------------------------------------------------------------------------------------------------
# Box geometry
# ------------------------------------------------------------------------------------------------------------

def _box_frames(box_a: torch.Tensor, box_b: torch.Tensor):
    """Centre of each box in the other's frame, relative heading and half sizes (shared by the two below)."""
    dx, dy = box_b[..., 0] - box_a[..., 0], box_b[..., 1] - box_a[..., 1]
    ca, sa = torch.cos(box_a[..., 2]), torch.sin(box_a[..., 2])
    cb, sb = torch.cos(box_b[..., 2]), torch.sin(box_b[..., 2])
    # Centre of b in a's frame, and of a in b's frame.
    ab = (dx * ca + dy * sa, -dx * sa + dy * ca)
    ba = (-(dx * cb + dy * sb), dx * sb - dy * cb)
    halves = (box_a[..., 3] / 2, box_a[..., 4] / 2, box_b[..., 3] / 2, box_b[..., 4] / 2)
    return ab, ba, box_b[..., 2] - box_a[..., 2], halves


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
    c, s = torch.cos(rel)[..., None], torch.sin(rel)[..., None]
    sx = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=cx.dtype, device=cx.device)
    sy = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=cx.dtype, device=cx.device)
    fx, fy = sx * hl_b[..., None], sy * hw_b[..., None]
    px = cx[..., None] + fx * c - fy * s  # (..., 4) corner x in a's frame
    py = cy[..., None] + fx * s + fy * c
    ex = (px.abs() - hl_a[..., None]).clamp(min=0)
    ey = (py.abs() - hw_a[..., None]).clamp(min=0)
    return torch.sqrt(ex * ex + ey * ey).amin(dim=-1)


def projected_half_extents(rel_heading: torch.Tensor, length: torch.Tensor, width: torch.Tensor):
    """Half-extents along and across another frame of a box rotated by ``rel_heading`` in it (m)."""
    c, s = torch.cos(rel_heading).abs(), torch.sin(rel_heading).abs()
    return c * length / 2 + s * width / 2, s * length / 2 + c * width / 2


# ------------------------------------------------------------------------------------------------------------
# Interaction features
# ------------------------------------------------------------------------------------------------------------

def interaction_features(agents: torch.Tensor, agents_valid: torch.Tensor, extent: torch.Tensor,
                         others: torch.Tensor | None = None, others_valid: torch.Tensor | None = None,
                         others_extent: torch.Tensor | None = None,
                         neighbours: int = NEIGHBOURS) -> dict[str, Feature]:
    """Box-to-box features of every agent against the other objects at the same step.

    Each agent is compared with its ``neighbours`` nearest objects by centre distance (broad phase, one
    ``topk`` over all pairs). The nearest-object distance, collision and overlap counts are exact regardless:
    rows whose answer a farther object could change (its bounding-circle lower bound is below the best exact
    distance, or it could overlap) are redone against every object. TTC, RSS and closest approach consider only
    the neighbours (an object beyond the ``neighbours`` nearest is in practice neither followed nor alongside).

    Args:
        agents: ``(B, A, T, 5)`` x, y, heading, vx, vy of the evaluated agents; agents_valid ``(B, A, T)``;
            extent ``(A, 2)`` length, width (m).
        others: optional ``(B or 1, O, T, 5)`` further objects (context), others_valid, others_extent ``(O, 2)``.
    Returns ``(B, A, T)`` features:
        ``distance_to_nearest_object`` (m, exact signed box distance, < 0 overlapping; valid where the agent and
        at least one other object are valid), ``collision`` (bool, that distance < 0), ``overlaps_agents`` /
        ``overlaps_context`` (number of evaluated / context boxes overlapping the agent's),
        ``time_to_collision`` (s, with the object followed ahead: heading within 75°, centre ahead, lateral box
        overlap; the nearest such object's longitudinal box gap over the closing speed of the two velocities
        projected on the agent's heading; 0 if the boxes already overlap lengthwise, ``TTC_CAP`` if nothing is
        followed or it is not closing), ``follow_gap`` (m, that gap; inf without a followed object),
        ``rss_longitudinal`` / ``rss_lateral`` (bool RSS violations, see ``blm.py``), ``closest_approach_ttc``
        (s, minimum over objects of the time of closest approach at constant velocities, for approaching pairs
        whose bounding circles would touch then; ``TTC_CAP`` otherwise).
    """
    b, a, t, _ = agents.shape
    if others is not None and others.shape[1] > 0:
        objs = torch.cat([agents, others.expand(b, -1, -1, -1)], dim=1)
        objs_valid = torch.cat([agents_valid, others_valid.expand(b, -1, -1)], dim=1)
        objs_extent = torch.cat([extent, others_extent], dim=0)
    else:
        objs, objs_valid, objs_extent = agents, agents_valid, extent
    n = objs.shape[1]
    # Frames first: (F = B*T, N, ...); the agents are the first A objects.
    s = objs.permute(0, 2, 1, 3).reshape(b * t, n, 5)
    v = objs_valid.permute(0, 2, 1).reshape(b * t, n)
    f, dev, dtype = s.shape[0], s.device, s.dtype
    radius = 0.5 * objs_extent.norm(dim=-1)  # (N,) bounding circles
    inf = torch.tensor(float("inf"), dtype=dtype, device=dev)
    zeros_fa = torch.zeros((f, a), dtype=dtype, device=dev)
    if n < 2:
        nearest = torch.full((f, a), float("inf"), dtype=dtype, device=dev)
        n_agents = n_context = torch.zeros((f, a), dtype=torch.long, device=dev)
        ttc = approach = torch.full((f, a), TTC_CAP, dtype=dtype, device=dev)
        gap = nearest.clone()
        rss_long = rss_lat = torch.zeros((f, a), dtype=torch.bool, device=dev)
    else:
        # ---- broad phase: squared centre distances as |p|^2 + |q|^2 - 2 p.q (one batched matmul instead of
        # five passes over all pairs); positions are taken relative to each frame's first object for precision,
        # and invalid objects are parked far away so no mask pass over the pairs is needed.
        xy = s[..., :2] - s[:, :1, :2]
        xy = torch.where(v[..., None], xy, torch.full_like(xy, 1e6))
        sq = xy.square().sum(-1)  # (F, N)
        d2 = torch.baddbmm(sq[:, :a, None] + sq[:, None, :], xy[:, :a], xy.transpose(1, 2), alpha=-2.0)
        d2.diagonal(dim1=1, dim2=2)[:] = float("inf")  # never one's own neighbour
        kk = min(neighbours + 1, n - 1)
        k = min(neighbours, n - 1)
        near_d2, idx_all = d2.topk(kk, dim=-1, largest=False)  # (F, A, kk)
        idx = idx_all[..., :k]
        fi = torch.arange(f, device=dev)[:, None, None]
        own = s[:, :a, None, :]  # (F, A, 1, 5)
        oth = s[fi, idx]  # (F, A, K, 5)
        ok = v[fi, idx] & v[:, :a, None]  # (F, A, K)
        ext_o = objs_extent[idx]  # (F, A, K, 2)
        ext_a = objs_extent[:a]

        own_box = torch.cat([own[..., :3], ext_a[None, :, None, :].expand(f, a, 1, 2)], dim=-1)
        oth_box = torch.cat([oth[..., :3], ext_o], dim=-1)
        # Separating-axis gaps of all neighbours: exact for overlaps, a lower bound otherwise, so only the
        # EXACT_CANDIDATES best need the (costlier) corner distances; rows a third one could change are redone.
        gap_lb = torch.where(ok, separating_gap(own_box, oth_box), inf)  # (F, A, K)
        over = gap_lb < 0
        n_agents, n_context = (over & (idx < a)).sum(-1), (over & (idx >= a)).sum(-1)
        m = min(EXACT_CANDIDATES, k)
        best_lb, best = gap_lb.topk(min(m + 1, k), dim=-1, largest=False)
        pick = best[..., :m]
        picked = oth_box.gather(2, pick[..., None].expand(-1, -1, -1, 5))
        exact = box_signed_distance(own_box.expand(f, a, m, 5), picked)
        nearest = torch.where(torch.isfinite(best_lb[..., :m]), exact, inf).amin(dim=-1)
        redo = torch.zeros_like(ok[..., 0])
        if m < k:
            redo = v[:, :a] & (nearest > best_lb[..., m])
        if kk > k:
            # Farther objects are at least (centre distance - both radii) away; redo rows they could change.
            bound = near_d2[..., k].clamp(min=0).sqrt() - radius[:a] - radius.max()
            redo = redo | (v[:, :a] & ((nearest > bound) | (bound < 0)))
        if redo.any():
            rf, ra = redo.nonzero(as_tuple=True)
            boxes = torch.cat([s[rf, :, :3], objs_extent[None].expand(len(rf), n, 2)], dim=-1)  # (M, N, 5)
            own_r = torch.cat([s[rf, ra, :3], objs_extent[ra]], dim=-1)[:, None].expand(-1, n, 5)
            full = box_signed_distance(own_r, boxes)
            full = torch.where(v[rf] & (torch.arange(n, device=dev)[None] != ra[:, None]), full, inf)
            nearest[rf, ra] = full.amin(dim=-1)
            n_agents[rf, ra] = (full[:, :a] < 0).sum(-1)
            n_context[rf, ra] = (full[:, a:] < 0).sum(-1)

        # ---- neighbours in each agent's frame.
        dx, dy = oth[..., 0] - own[..., 0], oth[..., 1] - own[..., 1]
        ca, sa = torch.cos(own[..., 2]), torch.sin(own[..., 2])  # (F, A, 1)
        lx, ly = dx * ca + dy * sa, dy * ca - dx * sa
        rel = wrap_angle(oth[..., 2] - own[..., 2])
        hx, hy = projected_half_extents(rel, ext_o[..., 0], ext_o[..., 1])
        half_l, half_w = ext_a[None, :, None, 0] / 2, ext_a[None, :, None, 1] / 2
        ovx, ovy = oth[..., 3], oth[..., 4]
        v_oth_long = ovx * ca + ovy * sa  # object's velocity along the agent's heading
        v_oth_lat = ovy * ca - ovx * sa
        v_own_long = (own[..., 3] * ca + own[..., 4] * sa)[..., 0]  # (F, A)
        v_own_lat = (own[..., 4] * ca - own[..., 3] * sa)  # (F, A, 1)

        # ---- object followed ahead: TTC and RSS longitudinal.
        ahead = ok & (rel.abs() <= TTC_MAX_HEADING_DIFF) & (lx > 0) & (ly.abs() < half_w + hy)
        gap, lead = torch.where(ahead, lx - half_l - hx, inf).min(dim=-1)  # (F, A)
        followed = torch.isfinite(gap)
        v_lead = v_oth_long.gather(-1, lead[..., None])[..., 0]
        closing = v_own_long - v_lead
        ttc = torch.where(followed & (closing > 0), gap.clamp(min=0) / closing.clamp(min=1e-9), inf)
        ttc = ttc.clamp(max=TTC_CAP)
        v_r, v_f = v_own_long.clamp(min=0), v_lead.clamp(min=0)
        d_long = (v_r * RSS_RHO + 0.5 * RSS_ACCEL * RSS_RHO**2 + (v_r + RSS_RHO * RSS_ACCEL) ** 2 / (2 * RSS_BRAKE)
                  - v_f**2 / (2 * RSS_BRAKE)).clamp(min=0)
        rss_long = followed & (gap < d_long)

        # ---- RSS lateral, objects alongside (longitudinal box overlap); positive = from the agent towards them.
        side = torch.where(ly >= 0, 1.0, -1.0)
        v1, v2 = side * v_own_lat, side * v_oth_lat
        rho, acc, brk = RSS_RHO, RSS_LAT_ACCEL, RSS_LAT_BRAKE
        reach1 = (2 * v1 + rho * acc) / 2 * rho + (v1 + rho * acc) ** 2 / (2 * brk)
        reach2 = (2 * v2 - rho * acc) / 2 * rho - (v2 - rho * acc) ** 2 / (2 * brk)
        d_lat = RSS_MU + (reach1 - reach2).clamp(min=0)
        rss_lat = (ok & (lx.abs() < half_l + hx) & (ly.abs() - half_w - hy < d_lat)).any(dim=-1)

        # ---- closest approach at constant velocities (BLM minimum TTC), world frame.
        rvx, rvy = ovx - own[..., 3], ovy - own[..., 4]
        dot = dx * rvx + dy * rvy
        t_star = (-dot / (rvx * rvx + rvy * rvy).clamp(min=1e-9)).clamp(min=0)
        mx, my = dx + t_star * rvx, dy + t_star * rvy
        reach = radius[:a, None] + radius[idx]
        hit = ok & (dot < 0) & (mx * mx + my * my < reach * reach)
        approach = torch.where(hit, t_star, inf).amin(dim=-1).clamp(max=TTC_CAP)

    def back(x: torch.Tensor) -> torch.Tensor:  # (F, A) -> (B, A, T)
        return x.reshape(b, t, a).permute(0, 2, 1)

    own_valid = agents_valid
    has_other = back(torch.isfinite(nearest)) & own_valid
    nearest_value = back(torch.where(torch.isfinite(nearest), nearest, zeros_fa))
    zero = torch.zeros_like(nearest_value)
    return {
        "distance_to_nearest_object": Feature(torch.where(has_other, nearest_value, zero), has_other),
        "collision": Feature((nearest_value < 0) & has_other, has_other),
        "overlaps_agents": Feature(back(n_agents) * own_valid, own_valid),
        "overlaps_context": Feature(back(n_context) * own_valid, own_valid),
        "time_to_collision": Feature(torch.where(own_valid, back(ttc), zero), own_valid),
        "follow_gap": Feature(back(torch.where(torch.isfinite(gap), gap, inf)), own_valid),
        "rss_longitudinal": Feature(back(rss_long) & own_valid, own_valid),
        "rss_lateral": Feature(back(rss_lat) & own_valid, own_valid),
        "closest_approach_ttc": Feature(torch.where(own_valid, back(approach), zero), own_valid),
    }


# ------------------------------------------------------------------------------------------------------------
# Map features
# ------------------------------------------------------------------------------------------------------------

_SDF_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sdf_tensors(map_index) -> tuple[torch.Tensor, torch.Tensor]:
    """The map's SDF as ``(1, H, W)`` and its origin ``(1, 2)`` tensors (no copy of the grid, cached)."""
    if map_index not in _SDF_TENSORS:
        _SDF_TENSORS[map_index] = (torch.as_tensor(map_index.sdf)[None],
                                   torch.as_tensor(map_index.origin, dtype=torch.float32)[None])
    return _SDF_TENSORS[map_index]


def road_edge_features(traj: torch.Tensor, valid: torch.Tensor, extent: torch.Tensor, agent_type: torch.Tensor,
                       map_index) -> dict[str, Feature]:
    """Signed distance of the worst box corner to the road edge, and off-road.

    Args:
        traj: ``(B, A, T, 5)``; valid ``(B, A, T)``; extent ``(A, 2)``; agent_type ``(A,)`` ``AgentType``;
        map_index: ``envs.map_index.MapIndex`` or None.
    Returns ``(B, A, T)`` features: ``distance_to_road_edge`` (m, bilinear SDF lookup at each corner, max over
    the corners; > 0 beyond the edge; exact to the SDF grid's resolution), ``offroad`` (bool, a vehicle whose
    distance exceeds ``OFFROAD_THRESHOLD``; other agent types are never off-road). Both are invalid everywhere
    when the map is missing or has no road edges.
    """
    if map_index is None or not map_index.has_road_edges:
        none = torch.zeros_like(valid)
        return {"distance_to_road_edge": Feature(torch.zeros_like(traj[..., 0]), none),
                "offroad": Feature(none.clone(), none)}
    sdf, origin = _sdf_tensors(map_index)
    b, a, t, _ = traj.shape
    corners = box_corners(traj[..., 0], traj[..., 1], traj[..., 2], extent[:, None, 0], extent[:, None, 1])
    d = sample_sdf(sdf, origin.to(traj.dtype), map_index.resolution, torch.zeros(1, dtype=torch.long),
                   corners.reshape(1, -1, 2).float()).reshape(b, a, t, 4).amax(dim=-1)
    d = torch.where(valid & (d > NO_ROAD_EDGE / 2), d, torch.zeros_like(d))
    vehicle = (agent_type == AgentType.VEHICLE)[None, :, None]
    return {"distance_to_road_edge": Feature(d, valid), "offroad": Feature((d > OFFROAD_THRESHOLD) & vehicle & valid,
                                                                           valid)}


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


def _features(traj: torch.Tensor, valid: torch.Tensor, r: Rollouts) -> tuple[dict[str, Feature], torch.Tensor]:
    """All features of ``(B, A, T, 5)`` trajectories, restricted to the future steps."""
    h = r.history_steps
    out = {name: Feature(f.value[..., h:], f.valid[..., h:])
           for name, f in kinematic_features(traj, valid, r.dt).items()}
    fut, fut_valid = traj[:, :, h:].float(), valid[:, :, h:]
    extent = r.extent.float()
    ctx = ctx_valid = ctx_extent = None
    if r.context is not None:
        ctx, ctx_valid, ctx_extent = r.context[None, :, h:].float(), r.context_valid[None, :, h:], \
            r.context_extent.float()
    out.update(interaction_features(fut, fut_valid, extent, ctx, ctx_valid, ctx_extent))
    out.update(road_edge_features(fut, fut_valid, extent, r.agent_type, r.map_index))
    # No traffic lights in our scenes: nobody ever violates one (kept so the 2025 meta-metric is complete).
    out["traffic_light_violation"] = Feature(torch.zeros_like(fut_valid), fut_valid)
    return out, fut_valid


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scene_features(rollouts: Rollouts) -> SceneFeatures:
    """Features of the simulation and of the log over the future steps (validated, memoised per object)."""
    if rollouts not in _CACHE:
        rollouts.validate()
        with torch.inference_mode():
            sim, sim_valid = _features(rollouts.sim, rollouts.sim_valid, rollouts)
            log, log_valid = _features(rollouts.log[None], rollouts.log_valid[None], rollouts)
        _CACHE[rollouts] = SceneFeatures(sim, log, sim_valid, log_valid)
    return _CACHE[rollouts]


def require_rollouts(rollouts: Rollouts, minimum: int, what: str) -> None:
    """``RolloutError`` unless there are at least ``minimum`` rollouts (``what`` names the metric)."""
    if rollouts.num_rollouts < minimum:
        raise RolloutError(f"Rollouts {rollouts.scene_id}: {what} needs at least {minimum} rollouts, got "
                           f"{rollouts.num_rollouts}. Sample more rollouts per scene (WOSAC: 32).")
