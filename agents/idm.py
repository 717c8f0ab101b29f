"""IDM: the Intelligent Driver Model following each agent's lane path, reacting to whoever is ahead on it.

Path. At reset each driven agent gets a path: its logged path (``SimState.route_xy``, resampled every 1 m),
continued along the lane graph past the end of the log (the lane under the last logged pose, then the
straightest successor, for ``continuation`` metres). The agent moves *along* this path; its heading is the
path's direction (pose dynamics).

Speed. Each step the acceleration is IDM's (Treiber et al. 2000)::

    a = a_max [1 - (v / v0)^delta - (s* / gap)^2],   s* = s0 + max(0, v T + v dv / (2 sqrt(a_max b)))

where ``gap`` and ``dv`` refer to the nearest obstacle ahead on the path within ``lookahead``:
- any live agent whose box centre lies on the path (within half the two widths + ``lateral_margin``),
  whatever drives it — including agents entering from other lanes at junctions once they are on the path;
- a crossing agent predicted (constant velocity, up to ``yield_horizon`` s) to reach the path before this
  agent reaches that point: it is treated as standing at the conflict point (yield to whoever arrives first).
The desired speed ``v0`` is the agent's 95th-percentile logged speed, kept within [``min_desired_speed``,
``max_desired_speed``]. Braking is limited to ``max_brake``; vehicles never reverse. An agent that reaches the
end of its path (a dead end of the lane graph: the map border) leaves the scene there.

Pedestrians and cyclists: driven the same way along their logged paths (they rarely share a lane with
vehicles in the towns data, which has none). Defaults are the textbook urban values.
"""

from __future__ import annotations

import numpy as np
import torch

from agents.base import Agent
from agents.registry import register_agent
from envs.dynamics import StatePose
from envs.types import ROUTE_SPACING, Action, MapData, PolylineType, SimState


@register_agent("idm")
class IDM(Agent):
    dynamics = StatePose()

    def __init__(self, time_headway: float = 1.5, min_gap: float = 2.0, max_accel: float = 1.5,
                 comfort_decel: float = 2.0, delta: float = 4.0, max_brake: float = 8.0, lookahead: float = 50.0,
                 lateral_margin: float = 0.3, yield_horizon: float = 3.0, min_desired_speed: float = 5.0,
                 max_desired_speed: float = 20.0, continuation: float = 120.0):
        super().__init__()
        for key, value in dict(time_headway=time_headway, max_accel=max_accel, comfort_decel=comfort_decel,
                               delta=delta, max_brake=max_brake, lookahead=lookahead).items():
            if value <= 0:
                raise ValueError(f"IDM {key} must be > 0, got {value}.")
        self.T, self.s0, self.a_max, self.b, self.delta = time_headway, min_gap, max_accel, comfort_decel, delta
        self.max_brake, self.lookahead, self.lateral_margin = max_brake, lookahead, lateral_margin
        self.yield_horizon, self.continuation = yield_horizon, continuation
        self.v_min, self.v_max = min_desired_speed, max_desired_speed
        self._path: torch.Tensor | None = None

    # ---- episode set-up ----------------------------------------------------------------------------------
    def reset(self, state, mask, seed=None, slots=None):
        super().reset(state, mask, seed, slots)
        b_size, a_size = state.batch_size, state.num_agents
        full = slots is None or self._path is None or tuple(self._path.shape[:2]) != (b_size, a_size)
        rows = list(range(b_size)) if full else [int(s) for s in slots]
        route = state.route_xy.cpu().numpy()
        route_len = state.route_len.cpu().numpy()
        heading = _last_logged_heading(state)
        driven = mask.cpu().numpy()
        paths: dict[tuple[int, int], np.ndarray] = {}
        for b in rows:
            lanes = _LaneIndex.of(state.maps.sources[int(state.map_idx[b])])
            for a in range(a_size):
                n = int(route_len[b, a])
                base = route[b, a, :max(n, 1)]
                # Only agents this IDM drives need the lane-graph continuation (the rest never move by it).
                paths[(b, a)] = _resample(lanes.extend(base, self.continuation, float(heading[b, a]))
                                          if n and driven[b, a] else base)
        longest = max([len(p) for p in paths.values()] + [2])
        if full:
            path = np.zeros((b_size, a_size, longest, 2), np.float32)
            length = np.ones((b_size, a_size), np.int64)
        else:
            path, length = self._path.cpu().numpy(), self._length.cpu().numpy()
            if longest > path.shape[2]:
                path = np.concatenate([path, np.repeat(path[:, :, -1:], longest - path.shape[2], axis=2)], axis=2)
        for (b, a), p in paths.items():
            path[b, a, :len(p)] = p
            path[b, a, len(p):] = p[-1]
            length[b, a] = len(p)
        dev = state.device
        self._path, self._length = torch.as_tensor(path, device=dev), torch.as_tensor(length, device=dev)
        rows_t = torch.as_tensor(rows, device=dev)
        pairs = torch.cartesian_prod(rows_t, torch.arange(a_size, device=dev))
        live = state.current_valid & state.agent_mask
        if full:
            self._pos = torch.zeros(b_size, a_size, device=dev)
            self._was_live = live.clone()
            self._placed = torch.zeros_like(live)
        self._pos[pairs[:, 0], pairs[:, 1]] = self._locate_rows(state, pairs)
        self._was_live[rows_t] = live[rows_t]
        self._placed[rows_t] = False
        speed = state.log[..., 3:5].norm(dim=-1).masked_fill(~state.log_valid, float("nan"))
        v0 = torch.nanquantile(speed.float(), 0.95, dim=-1).nan_to_num(self.v_min)
        self._v0 = v0.clamp(self.v_min, self.v_max)

    def _locate(self, state: SimState, full: bool = False) -> torch.Tensor:
        """``(B, A)`` arc position (m) of each agent's projection on its path: the nearest path point (searched
        in a window around the last position, or everywhere if ``full``), refined onto its two segments."""
        xy = state.current[..., :2]
        last = (self._length - 1)[..., None]
        if full:
            idx = torch.arange(self._path.shape[2], device=xy.device).expand(*xy.shape[:2], -1)
        else:
            base = (self._pos / ROUTE_SPACING).floor().long()[..., None]
            idx = torch.minimum((base + torch.arange(-3, 13, device=xy.device)).clamp(min=0), last)
        pts = self._point(idx)
        d2 = ((pts - xy[:, :, None]) ** 2).sum(-1).masked_fill(idx > last, float("inf"))
        k = idx.gather(2, d2.argmin(-1, keepdim=True)).squeeze(-1)  # (B, A)
        best_d, best_s = None, None
        for lo in ((k - 1).clamp(min=0), k):
            hi = torch.minimum(lo + 1, last.squeeze(-1))
            p0, p1 = self._point(lo), self._point(hi)
            seg = p1 - p0
            frac = (((xy - p0) * seg).sum(-1) / (seg * seg).sum(-1).clamp(min=1e-9)).clamp(0, 1)
            d = (p0 + frac[..., None] * seg - xy).norm(dim=-1)
            s_here = (lo.float() + frac * (hi > lo)) * ROUTE_SPACING
            if best_d is None:
                best_d, best_s = d, s_here
            else:
                best_s = torch.where(d < best_d, s_here, best_s)
                best_d = torch.minimum(d, best_d)
        return best_s

    def _locate_rows(self, state: SimState, rows: torch.Tensor) -> torch.Tensor:
        """Full-search arc position (m) for the ``(K, 2)`` (batch, agent) rows only."""
        xy = state.current[rows[:, 0], rows[:, 1], :2]  # (K, 2)
        path = self._path[rows[:, 0], rows[:, 1]]  # (K, P, 2)
        length = self._length[rows[:, 0], rows[:, 1]]
        d2 = ((path - xy[:, None]) ** 2).sum(-1)
        d2 = d2.masked_fill(torch.arange(path.shape[1], device=xy.device) >= length[:, None], float("inf"))
        return d2.argmin(-1).float() * ROUTE_SPACING

    def _point(self, i: torch.Tensor) -> torch.Tensor:
        """Path points at indices ``i`` ``(B, A, ...)`` -> ``(B, A, ..., 2)``, by flat row indexing (much faster
        on CPU than ``gather`` with an expanded index)."""
        b, a, p = self._path.shape[:3]
        base = torch.arange(b * a, device=i.device).view(b, a, *([1] * (i.dim() - 2))) * p
        return self._path.view(b * a * p, 2)[base + i]

    # ---- acting ------------------------------------------------------------------------------------------
    def act(self, state, mask):
        if self._path is None or self._path.shape[:2] != (state.batch_size, state.num_agents):
            self.reset(state, mask)
        cur = state.current
        live = state.current_valid & state.agent_mask
        # Agents this IDM placed last step are exactly at self._pos; others (just appeared, or driven by
        # someone else last step) are projected: windowed if they were live, fully if they just appeared.
        appeared = live & ~self._was_live
        located = self._locate(state)
        if appeared.any():
            rows = appeared.nonzero()
            located[rows[:, 0], rows[:, 1]] = self._locate_rows(state, rows)
        self._pos = torch.where(self._placed & live, self._pos, located)
        self._was_live = live.clone()
        v = cur[..., 3:5].norm(dim=-1)
        gap, lead_speed = self._obstacles(state, cur, live, v)
        s_star = self.s0 + (v * self.T + v * (v - lead_speed) / (2 * (self.a_max * self.b) ** 0.5)).clamp(min=0)
        free = 1 - (v / self._v0).clamp(min=0) ** self.delta
        interaction = torch.where(torch.isfinite(gap), (s_star / gap.clamp(min=0.1)) ** 2, torch.zeros_like(gap))
        accel = (self.a_max * (free - interaction)).clamp(-self.max_brake, self.a_max)
        v_new = (v + accel * state.dt).clamp(min=0)
        end = (self._length - 1).float() * ROUTE_SPACING
        s_new = torch.minimum(self._pos + 0.5 * (v + v_new) * state.dt, end)
        pose, has_direction = self._pose_at(s_new)
        pose[..., 2] = torch.where(has_direction, pose[..., 2], cur[..., 2])
        # The end of a path is a dead end of the lane graph (the map border, 120 m past the log): leave there.
        gone = (s_new >= end - 1e-6) & (self._pos < end - 1e-6)
        driven = mask & live & (state.t < state.end)[:, None]
        self._pos = torch.where(driven, s_new, self._pos)
        self._placed = driven
        return Action(pose, mask.clone(), remove=gone)

    def _pose_at(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A, 3)`` world pose at arc position ``s`` along each path (heading = path direction), and
        ``(B, A)`` whether the path has a direction there (one-point paths of standing agents have none)."""
        last = self._length - 1
        i0 = (s / ROUTE_SPACING).floor().long().clamp(min=0)
        i0 = torch.minimum(i0, (last - 1).clamp(min=0))
        i1 = torch.minimum(i0 + 1, last)
        p0, p1 = self._point(i0), self._point(i1)
        frac = (s / ROUTE_SPACING - i0.float()).clamp(0, 1)[..., None]
        xy = p0 + frac * (p1 - p0)
        d = p1 - p0
        heading = torch.atan2(d[..., 1], d[..., 0])
        return torch.cat([xy, heading[..., None]], dim=-1), i1 > i0

    def _obstacles(self, state, cur, live, v):
        """Gap (m, inf if none) to the nearest obstacle ahead on each agent's path and that obstacle's speed
        along the path. Pairs are pre-filtered (in reach, roughly ahead) so the exact tests run on few."""
        bsz, a = live.shape
        dev = cur.device
        steps = torch.arange(1, int(self.lookahead / ROUTE_SPACING) + 1, device=dev)
        ahead_idx = torch.minimum(self._pos.floor().long()[..., None] + steps, (self._length - 1)[..., None])
        gap = torch.full((bsz, a), float("inf"), device=dev)
        lead_speed = torch.zeros(bsz, a, device=dev)
        # The look-ahead window of each agent's path, and its bounding box grown by the widest corridor.
        window = self._point(ahead_idx)  # (B, A, W, 2)
        # (every 5th point and the last bound the box to within 2.5 m: add that to the margin)
        coarse = torch.cat([window[:, :, ::5], window[:, :, -1:]], dim=2)
        margin = state.extent[..., 1].amax() + self.lateral_margin + 0.5 + 2.5
        box_lo, box_hi = coarse.amin(2) - margin, coarse.amax(2) + margin  # (B, A, 2)
        # Candidate pairs (i follows or yields to j): both live, and the box swept by j over the yield horizon
        # (constant velocity) overlaps i's window box. Component-wise: size-2 reductions are slow on CPU.
        x, y = cur[..., 0], cur[..., 1]
        x_end, y_end = x + cur[..., 3] * self.yield_horizon, y + cur[..., 4] * self.yield_horizon
        sweep_lo_x, sweep_hi_x = torch.minimum(x, x_end)[:, None, :], torch.maximum(x, x_end)[:, None, :]
        sweep_lo_y, sweep_hi_y = torch.minimum(y, y_end)[:, None, :], torch.maximum(y, y_end)[:, None, :]
        overlap = ((sweep_hi_x >= box_lo[..., 0:1]) & (sweep_lo_x <= box_hi[..., 0:1])
                   & (sweep_hi_y >= box_lo[..., 1:2]) & (sweep_lo_y <= box_hi[..., 1:2]))  # (B, i, j)
        eye = torch.eye(a, dtype=torch.bool, device=dev)
        cand = live[:, :, None] & live[:, None, :] & ~eye & overlap
        pairs = cand.nonzero()  # (K, 3): b, i, j
        if len(pairs) == 0:
            return gap, lead_speed
        pb, pi, pj = pairs.unbind(-1)
        path_pts = window[pb, pi]  # (K, W, 2)
        width = state.extent[..., 1]
        corridor2 = (0.5 * (width[pb, pi] + width[pb, pj]) + self.lateral_margin) ** 2  # (K,)
        half_len = 0.5 * (state.extent[pb, pi, 0] + state.extent[pb, pj, 0])
        other = cur[pb, pj]  # (K, 5)
        # (1) obstacles on the path now
        dx, dy = path_pts[..., 0] - other[:, None, 0], path_pts[..., 1] - other[:, None, 1]
        d2_now = dx * dx + dy * dy  # (K, W)
        best_d2, k_int = d2_now.min(-1)
        on_path = best_d2 < corridor2
        seg = path_pts[:, 1:] - path_pts[:, :-1]
        seg = torch.cat([seg, seg[:, -1:]], 1)
        tangent = seg[torch.arange(len(pairs), device=dev), k_int]
        tangent = tangent / tangent.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        speed_along = (other[:, 3:5] * tangent).sum(-1).clamp(min=0)
        cand_gap = torch.where(on_path, (k_int + 1).float() * ROUTE_SPACING - half_len,
                               torch.full_like(half_len, float("inf")))
        cand_speed = speed_along
        # (2) moving agents off the path, predicted (constant velocity) to reach it before this agent gets there
        crossing = (~on_path & (other[:, 3:5].norm(dim=-1) > 0.5)).nonzero().squeeze(-1)
        if self.yield_horizon > 0 and len(crossing):
            taus = torch.arange(0.5, self.yield_horizon + 1e-6, 0.5, device=dev)  # (H,)
            o = other[crossing]
            pred = o[:, None, :2] + o[:, None, 3:5] * taus[:, None]  # (Kc, H, 2)
            # Every other path point (2 m apart) halves the cost; the corridor grows by 0.5 m to make up for the
            # coarser sampling (measured on towns val: fewer collisions than 1 m sampling, ADE within 0.2 m).
            pts = path_pts[crossing, 1::2]  # (Kc, W/2, 2): points 2, 4, ... m ahead
            dx = pts[:, None, :, 0] - pred[:, :, None, 0]  # (Kc, H, W/2)
            dy = pts[:, None, :, 1] - pred[:, :, None, 1]
            hit = dx * dx + dy * dy < (corridor2[crossing].sqrt() + 0.5)[:, None, None] ** 2
            k_hit = torch.where(hit, steps[1::2].float().expand_as(hit),
                                torch.full(hit.shape, float("inf"), device=dev))
            first_k = k_hit.min(-1).values * ROUTE_SPACING  # (Kc, H) metres ahead where j meets the path
            my_arrival = first_k / v[pb[crossing], pi[crossing]].clamp(min=0.5)[:, None]
            yields = torch.isfinite(first_k) & (taus[None] < my_arrival)
            conflict = torch.where(yields, first_k, torch.full_like(first_k, float("inf"))).min(-1).values
            conflict_gap = conflict - half_len[crossing]
            better = conflict_gap < cand_gap[crossing]
            cand_gap[crossing] = torch.where(better, conflict_gap, cand_gap[crossing])
            cand_speed[crossing] = torch.where(better, torch.zeros_like(conflict_gap), cand_speed[crossing])
        # nearest obstacle per (b, i)
        flat = pb * a + pi
        best = torch.full((bsz * a,), float("inf"), device=dev).scatter_reduce(0, flat, cand_gap, "amin")
        gap = best.view(bsz, a)
        is_best = torch.isfinite(cand_gap) & (cand_gap == best[flat])
        lead_speed.view(-1).scatter_(0, flat[is_best], cand_speed[is_best])
        return gap, lead_speed


class _LaneIndex:
    """Lane centre polylines of one map with a point lookup, for extending paths along the lane graph."""

    _cache: dict[int, _LaneIndex] = {}

    def __init__(self, m: MapData):
        self.lanes = np.flatnonzero(m.polyline_type == PolylineType.LANE_CENTER)
        self.points = [m.polyline(i).astype(np.float64) for i in self.lanes]
        self.row = {int(p): k for k, p in enumerate(self.lanes)}
        self.successors: dict[int, list[int]] = {}
        for src, dst in m.successors.tolist():
            if src in self.row and dst in self.row:
                self.successors.setdefault(self.row[src], []).append(self.row[dst])
        owner = [np.full(len(p), k) for k, p in enumerate(self.points)]
        self.flat = np.concatenate(self.points) if self.points else np.zeros((0, 2))
        self.owner = np.concatenate(owner) if owner else np.zeros(0, int)
        self.offset = np.concatenate([np.arange(len(p)) for p in self.points]) if self.points else np.zeros(0, int)
        # First and last flat index of each lane (neighbours of a point never cross into another lane).
        sizes = np.array([len(p) for p in self.points], int)
        self.lane_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else np.zeros(0, int)
        self.lane_end = self.lane_start + sizes - 1
        from scipy.spatial import cKDTree

        self.tree = cKDTree(self.flat if len(self.flat) else np.zeros((1, 2)))

    @classmethod
    def of(cls, m: MapData) -> _LaneIndex:
        key = id(m)
        if key not in cls._cache:
            if len(cls._cache) > 16:  # bounded: maps live as long as their dataset
                cls._cache.clear()
            cls._cache[key] = cls(m)
        return cls._cache[key]

    def extend(self, path: np.ndarray, length: float, heading: float) -> np.ndarray:
        """``path`` continued along the lane graph for about ``length`` m past its end (``heading``: the agent's
        last logged heading, which gives the direction of one-point paths of standing agents)."""
        if len(self.flat) == 0 or length <= 0:
            return path
        end = path[-1]
        direction = path[-1] - path[-2] if len(path) >= 2 else np.zeros(2)
        if np.linalg.norm(direction) < 1e-6:
            direction = np.array([np.cos(heading), np.sin(heading)])
        direction = direction / max(np.linalg.norm(direction), 1e-9)
        near = np.asarray(self.tree.query_ball_point(end, 3.0), dtype=int)
        if len(near) == 0:
            return path
        # The closest point whose lane runs the same way (alignment of the lane's local direction > 0.7).
        lane = self.owner[near]
        ahead = self.flat[np.minimum(near + 1, self.lane_end[lane])]
        behind = self.flat[np.maximum(near - 1, self.lane_start[lane])]
        seg = ahead - behind
        align = (seg @ direction) / np.maximum(np.linalg.norm(seg, axis=1), 1e-9)
        score = np.where(align > 0.7, align - 0.3 * np.linalg.norm(self.flat[near] - end, axis=1), -np.inf)
        best = near[int(np.argmax(score))] if np.isfinite(score).any() else None
        if best is None:
            return path
        lane, off = self.owner[best], self.offset[best]
        extra = [self.points[lane][off + 1:]]
        total = _length(self.points[lane][off:])
        heading = _end_direction(self.points[lane])
        for _ in range(20):
            if total >= length or lane not in self.successors:
                break
            lane = max(self.successors[lane], key=lambda s: float(_start_direction(self.points[s]) @ heading))
            extra.append(self.points[lane][1:])
            total += _length(self.points[lane])
            heading = _end_direction(self.points[lane])
        return np.concatenate([path, *[e for e in extra if len(e)]], axis=0)


def _last_logged_heading(state: SimState) -> np.ndarray:
    """``(B, A)`` heading at each agent's last logged step (0 for agents never logged)."""
    valid = state.log_valid.cpu().numpy()
    last = np.where(valid.any(-1), valid.shape[-1] - 1 - np.argmax(valid[..., ::-1], axis=-1), 0)
    heading = state.log[..., 2].cpu().numpy()
    return np.take_along_axis(heading, last[..., None], axis=-1)[..., 0]


def _length(p: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) if len(p) > 1 else 0.0


def _start_direction(p: np.ndarray) -> np.ndarray:
    d = p[min(1, len(p) - 1)] - p[0]
    return d / max(np.linalg.norm(d), 1e-9)


def _end_direction(p: np.ndarray) -> np.ndarray:
    d = p[-1] - p[max(len(p) - 2, 0)]
    return d / max(np.linalg.norm(d), 1e-9)


def _resample(path: np.ndarray, spacing: float = ROUTE_SPACING) -> np.ndarray:
    """Points every ``spacing`` m along ``path`` (at least one point)."""
    if len(path) < 2:
        return path.astype(np.float32).reshape(-1, 2)[:1] if len(path) else np.zeros((1, 2), np.float32)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    s = np.arange(0.0, arc[-1] + 1e-9, spacing)
    return np.stack([np.interp(s, arc, path[:, 0]), np.interp(s, arc, path[:, 1])], -1).astype(np.float32)
