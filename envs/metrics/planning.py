"""Ego planning metrics over the rollouts' future steps (``Rollouts.ego_index``), each averaged over rollouts.

``ego_planning_metrics`` raises ``NoEgoError`` for scenes without an ego; the registered ``planning`` metric
reports NaN for every key there (so that evaluating every metric on such scenes still works; NaN means "not
applicable" and is skipped by nan-aware means over scenes).
"""

from __future__ import annotations

import torch

from envs.errors import NoEgoError
from envs.metrics.episode import Rollouts, register_episode_metric
from envs.metrics.features import scene_features
from envs.metrics.realism import displacement_errors, wosac_objects

PLANNING_KEYS = ("planning_progress", "planning_collision", "planning_offroad", "planning_max_jerk",
                 "planning_max_lateral_accel", "planning_min_ttc", "planning_ade", "planning_min_ade")


def route_arclength(route: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Arc length (m) along a polyline ``route`` ``(P, 2)`` of the projection of each of ``points`` ``(..., 2)``
    onto it (nearest point of the polyline; a single-point route gives 0)."""
    if route.shape[0] < 2:
        return torch.zeros(points.shape[:-1], dtype=points.dtype)
    p0, seg = route[:-1], route[1:] - route[:-1]  # (S, 2)
    seg_len = seg.norm(dim=-1)
    start = torch.cat([seg_len.new_zeros(1), seg_len.cumsum(0)[:-1]])
    rel = points[..., None, :] - p0  # (..., S, 2)
    frac = ((rel * seg).sum(-1) / (seg_len**2).clamp(min=1e-9)).clamp(0, 1)
    dist = (rel - frac[..., None] * seg).norm(dim=-1)
    best = dist.argmin(dim=-1, keepdim=True)
    return (start + frac * seg_len).gather(-1, best)[..., 0]


def ego_planning_metrics(rollouts: Rollouts) -> dict[str, float]:
    """The ego's planning metrics, each the mean over rollouts of a per-rollout value:

    - ``planning_progress`` (m): arc length along the ego's logged path (its valid logged positions) from the
      projection of its position at the last history step to the projection of its last valid simulated position.
    - ``planning_collision`` / ``planning_offroad``: fraction of rollouts where the ego's box overlaps another
      object / (a vehicle ego) crosses the road edge at any future step.
    - ``planning_max_jerk`` (m/s^3) / ``planning_max_lateral_accel`` (m/s^2): max over valid future steps of
      |jerk| (central differences of speed) / |speed × yaw rate|.
    - ``planning_min_ttc`` (s): min over future steps of the followed-object TTC (capped at 5 s).
    - ``planning_ade`` / ``planning_min_ade`` (m): the ego's ADE against its log (the official definition,
      ``realism.displacement_errors``), mean / min over rollouts.
    Raises ``NoEgoError`` if ``ego_index`` is -1.
    """
    e = rollouts.ego_index
    if e < 0:
        raise NoEgoError(f"Rollouts {rollouts.scene_id} have no ego (ego_index=-1); planning metrics need one. "
                         "Pass the ego's index among the evaluated agents.")
    f = scene_features(rollouts).sim
    h = rollouts.history_steps

    def ego(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return f[name].value[:, e], f[name].valid[:, e]  # (R, Tf)

    def masked_max(x: torch.Tensor, ok: torch.Tensor) -> float:
        m = torch.where(ok, x, torch.full_like(x, -float("inf"))).amax(dim=-1)
        return float(m[torch.isfinite(m)].mean()) if torch.isfinite(m).any() else float("nan")

    route = rollouts.log[e, rollouts.log_valid[e], :2]
    valid = rollouts.sim_valid[:, e]  # (R, T)
    last = torch.where(valid, torch.arange(valid.shape[-1]), -1).amax(dim=-1)  # (R,)
    final_xy = rollouts.sim[torch.arange(valid.shape[0]), e, last.clamp(min=0), :2]
    start_xy = rollouts.log[e, h - 1, :2]
    progress = route_arclength(route, final_xy) - route_arclength(route, start_xy)
    speed, speed_ok = ego("linear_speed")
    yaw, yaw_ok = ego("angular_speed")
    jerk, jerk_ok = ego("jerk")
    ov_a, col_ok = ego("overlaps_agents")
    ov_c, _ = ego("overlaps_context")
    collision = (ov_a + ov_c) > 0  # sharp boxes, every object (as the simulator's collision)
    offroad, off_ok = ego("offroad")
    ttc, ttc_ok = ego("time_to_collision")
    ade, _, ade_ok = displacement_errors(rollouts)  # columns: the WOSAC objects only
    objs = wosac_objects(rollouts)
    if bool(objs[e]):
        col = int(objs[:e].sum())
        ade, ade_ok = ade[:, col], ade_ok[:, col]
    else:  # an ego not valid at the last history step is not scored by displacement
        ade, ade_ok = ade[:, :0].sum(-1), torch.zeros(ade.shape[0], dtype=torch.bool)
    return {
        "planning_progress": float(progress.mean()),
        "planning_collision": float((collision & col_ok).any(dim=-1).float().mean()),
        "planning_offroad": float((offroad & off_ok).any(dim=-1).float().mean()) if off_ok.any() else float("nan"),
        "planning_max_jerk": masked_max(jerk.abs(), jerk_ok),
        "planning_max_lateral_accel": masked_max((speed * yaw).abs(), speed_ok & yaw_ok),
        "planning_min_ttc": -masked_max(-ttc, ttc_ok),
        "planning_ade": float(ade[ade_ok].mean()) if ade_ok.any() else float("nan"),
        "planning_min_ade": float(ade[ade_ok].min()) if ade_ok.any() else float("nan"),
    }


@register_episode_metric(
    "planning", "m, fraction, m/s^3, m/s^2, s",
    "Ego planning set (see ego_planning_metrics): planning_progress (m along the ego's logged path), "
    "planning_collision / planning_offroad (fraction of rollouts with any), planning_max_jerk, "
    "planning_max_lateral_accel, planning_min_ttc, planning_ade; means over rollouts; planning_min_ade: the min over "
    "rollouts of the ego's ADE. NaN for scenes without "
    "an ego.", family="planning")
def planning(rollouts: Rollouts) -> dict[str, float]:
    if rollouts.ego_index < 0:
        return dict.fromkeys(PLANNING_KEYS, float("nan"))
    return ego_planning_metrics(rollouts)


@register_episode_metric(
    "distance_travelled", "m",
    "Mean over rollouts and evaluated agents of the path length driven over the future steps (sum of the "
    "step displacements where consecutive simulated states are valid).", family="planning")
def distance_travelled(rollouts: Rollouts) -> dict[str, float]:
    h = rollouts.history_steps
    xy = rollouts.sim[:, :, h - 1:, :2]  # from the current step on
    ok = rollouts.sim_valid[:, :, h - 1:]
    step = (xy[:, :, 1:] - xy[:, :, :-1]).norm(dim=-1) * (ok[:, :, 1:] & ok[:, :, :-1])
    return {"distance_travelled": float(step.sum(-1).mean())}
