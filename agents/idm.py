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

The per-step arithmetic is one compiled loop over scenes and agents (``agents/idm_kernel.py``, numba): as
torch ops it was ~200 small kernels per step whose dispatch cost dominated. Paths and positions live on the
CPU as numpy arrays; states on another device are copied over each step (IDM is a CPU model).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from agents.base import Agent
from agents.idm_kernel import full_search, idm_step
from agents.registry import register_agent
from envs.dynamics import StatePose
from envs.geometry import resample_polylines
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
        if lookahead < 2 * ROUTE_SPACING:
            raise ValueError(f"IDM lookahead must be >= {2 * ROUTE_SPACING} m (two path points), got {lookahead}.")
        if yield_horizon < 0:
            raise ValueError(f"IDM yield_horizon must be >= 0 (0 turns yielding off), got {yield_horizon}.")
        self.T, self.s0, self.a_max, self.b, self.delta = time_headway, min_gap, max_accel, comfort_decel, delta
        self.max_brake, self.lookahead, self.lateral_margin = max_brake, lookahead, lateral_margin
        self.yield_horizon, self.continuation = yield_horizon, continuation
        self.v_min, self.v_max = min_desired_speed, max_desired_speed
        self._params = (float(time_headway), float(min_gap), float(max_accel), float(comfort_decel), float(delta),
                        float(max_brake), float(lookahead), float(lateral_margin), float(yield_horizon))
        self._path: np.ndarray | None = None

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
        by_map: dict[int, list[tuple[int, int]]] = {}  # one batched path set-up per map, not per scene
        for b in rows:
            by_map.setdefault(int(state.map_idx[b]), []).extend((b, a) for a in range(a_size))
        for m, agents in by_map.items():
            lanes = _LaneIndex.of(state.maps.sources[m])
            bases = [route[b, a, :max(int(route_len[b, a]), 1)] for b, a in agents]
            # Only agents this IDM drives need the lane-graph continuation (the rest never move by it).
            wanted = [bool(route_len[b, a] and driven[b, a]) for b, a in agents]
            headings = np.array([heading[b, a] for b, a in agents])
            paths.update(zip(agents, lanes.paths(bases, self.continuation, headings, wanted), strict=True))
        longest = max([len(p) for p in paths.values()] + [2])
        if full:
            path = np.zeros((b_size, a_size, longest, 2), np.float32)
            length = np.ones((b_size, a_size), np.int64)
        else:
            path, length = self._path, self._length
            if longest > path.shape[2]:
                path = np.concatenate([path, np.repeat(path[:, :, -1:], longest - path.shape[2], axis=2)], axis=2)
        for (b, a), p in paths.items():
            path[b, a, :len(p)] = p
            path[b, a, len(p):] = p[-1]
            length[b, a] = len(p)
        self._path, self._length = np.ascontiguousarray(path), length
        live = (state.current_valid & state.agent_mask).cpu().numpy()
        if full:
            self._pos = np.zeros((b_size, a_size), np.float32)
            self._was_live = live.copy()
            self._placed = np.zeros_like(live)
        rows_np = np.array(rows, np.int64)
        pairs = np.stack(np.meshgrid(rows_np, np.arange(a_size), indexing="ij"), -1).reshape(-1, 2)
        xy = state.current[..., :2].cpu().numpy()[pairs[:, 0], pairs[:, 1]]
        self._pos[pairs[:, 0], pairs[:, 1]] = full_search(self._path, self._length, pairs, xy) * ROUTE_SPACING
        self._was_live[rows_np] = live[rows_np]
        self._placed[rows_np] = False
        speed = state.log[..., 3:5].norm(dim=-1).masked_fill(~state.log_valid, float("nan"))
        v0 = torch.nanquantile(speed.float(), 0.95, dim=-1).nan_to_num(self.v_min)
        self._v0 = v0.clamp(self.v_min, self.v_max).cpu().numpy().astype(np.float64)

    # ---- acting ------------------------------------------------------------------------------------------
    def act(self, state, mask):
        if self._path is None or self._path.shape[:2] != (state.batch_size, state.num_agents):
            self.reset(state, mask)
        live = (state.current_valid & state.agent_mask).cpu().numpy()
        driven = (mask.cpu().numpy() & live & (state.t < state.end)[:, None].cpu().numpy())
        extent = state.extent.cpu().numpy()
        pose = np.empty((state.batch_size, state.num_agents, 3), np.float32)
        gone = np.empty((state.batch_size, state.num_agents), bool)
        idm_step(self._path, self._length, self._pos, self._placed, self._was_live,
                 np.ascontiguousarray(state.current.cpu().numpy()), live, driven, extent[..., 1],
                 0.5 * extent[..., 0], self._v0, float(state.dt), ROUTE_SPACING, self._params, pose, gone)
        dev = state.device
        return Action(torch.from_numpy(pose).to(dev), mask.clone(), remove=torch.from_numpy(gone).to(dev))


PATH_CACHE_SIZE = 50_000  # memoised IDM paths per map (a towns map's scenes hold ~10,000 agents per split)
NEAR_POINTS = 64  # lane points looked up per path end by extend_many (more within 3 m: extend's exact lookup)


class _LaneIndex:
    """Lane centre polylines of one map with a point lookup, for extending paths along the lane graph."""

    # map_id -> (weak reference to the MapData it was built from, its index). Keyed by the map's name, never by
    # id(): a dead map's id can be reused by another map. The reference check serves an entry only to the very
    # map object it was built from (two maps that share a name, e.g. test fixtures, never share an index).
    _cache: dict[str, tuple[weakref.ref, _LaneIndex]] = {}

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
        # Per lane, once: segment lengths, total length and the straightest successor (what extend() chains), so
        # a path continuation costs one point lookup and a walk over lane ids, not geometry per lane and agent.
        self.seg_length = [np.linalg.norm(np.diff(p, axis=0), axis=1) for p in self.points]
        self.lane_length = [_length(p) for p in self.points]
        self.next_lane = {lane: self._straightest(lane, succ) for lane, succ in self.successors.items()}
        self._paths: dict[tuple, np.ndarray] = {}

    def _straightest(self, lane: int, successors: list[int]) -> int:
        heading = _end_direction(self.points[lane])
        return max(successors, key=lambda s: float(_start_direction(self.points[s]) @ heading))

    @classmethod
    def of(cls, m: MapData) -> _LaneIndex:
        hit = cls._cache.get(m.map_id)
        if hit is None or hit[0]() is not m:
            if len(cls._cache) > 16:  # bounded: maps live as long as their dataset
                cls._cache.clear()
            hit = cls._cache[m.map_id] = (weakref.ref(m), cls(m))
        return hit[1]

    def paths(self, bases: list[np.ndarray], length: float, headings: np.ndarray, extend: list[bool]) -> list:
        """The IDM paths of agents whose logged paths are ``bases``: continued along the lane graph where
        ``extend`` says (``extend_many``) and resampled every ``ROUTE_SPACING`` m. Memoised per map: an RL run
        resets the same scenes again and again, and a path depends only on these arguments (results are shared:
        callers copy them, never write into them)."""
        keys = [(base.tobytes(), base.shape, float(length), float(h) if ext else 0.0, ext)
                for base, h, ext in zip(bases, headings, extend, strict=True)]
        missing = [k for k, key in enumerate(keys) if key not in self._paths]
        if len(self._paths) + len(missing) > PATH_CACHE_SIZE:
            self._paths.clear()
            missing = list(range(len(keys)))
        grow = [k for k in missing if extend[k]]
        longer = dict(zip(grow, self.extend_many([bases[k] for k in grow], length, [headings[k] for k in grow]),
                          strict=True))
        for k, path in zip(missing, _resample_many([longer.get(k, bases[k]) for k in missing]), strict=True):
            self._paths[keys[k]] = path
        return [self._paths[key] for key in keys]

    def extend_many(self, paths: list[np.ndarray], length: float, headings) -> list[np.ndarray]:
        """``extend`` for many paths at once: the lane-point lookup and alignment scores run batched (the nearest
        ``NEAR_POINTS`` points within 3 m of each end; a path with more points that close takes ``extend``'s own
        lookup, so the result is always ``extend``'s)."""
        if not paths:
            return []
        if len(self.flat) == 0 or length <= 0:
            return list(paths)
        ends = np.stack([p[-1] for p in paths])
        step = ends - np.stack([p[-2] if len(p) >= 2 else p[-1] for p in paths])  # in the paths' dtype, as extend
        norm = np.linalg.norm(step, axis=1)
        h = np.asarray(headings, np.float64)
        still = norm < 1e-6
        direction = (step / np.maximum(norm, 1e-9)[:, None]).astype(np.float64)
        direction[still] = np.stack([np.cos(h[still]), np.sin(h[still])], -1)
        k = min(NEAR_POINTS, len(self.flat))
        _, near = self.tree.query(ends, k=k, distance_upper_bound=3.0)
        near = near.reshape(len(paths), k)
        found = near < len(self.flat)
        safe = np.where(found, near, 0)
        score = np.where(found, self._scores(safe, ends, direction), -np.inf)
        best = safe[np.arange(len(paths)), np.argmax(score, axis=1)]
        out = []
        for i, path in enumerate(paths):
            if found[i].all():  # more lane points within 3 m than were looked up: the exact lookup
                out.append(self.extend(path, length, float(h[i])))
            elif not np.isfinite(score[i]).any():
                out.append(path)
            else:
                out.append(self._continue(path, int(best[i]), length))
        return out

    def _continue(self, path: np.ndarray, best: int, length: float) -> np.ndarray:
        """``path`` continued from lane point ``best`` along the straightest successors for ``length`` m."""
        lane, off = int(self.owner[best]), int(self.offset[best])
        extra = [self.points[lane][off + 1:]]
        total = float(self.seg_length[lane][off:].sum())
        for _ in range(20):
            if total >= length or lane not in self.next_lane:
                break
            lane = self.next_lane[lane]  # the successor whose start runs straightest on from this lane's end
            extra.append(self.points[lane][1:])
            total += self.lane_length[lane]
        return np.concatenate([path, *[e for e in extra if len(e)]], axis=0)

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
        score = self._scores(near[None], end[None], direction[None])[0]
        if not np.isfinite(score).any():
            return path
        return self._continue(path, int(near[int(np.argmax(score))]), length)

    def _scores(self, near: np.ndarray, ends: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """``(N, K)`` scores of candidate lane points ``near`` (flat indices) for path ends ``ends`` ``(N, 2)``
        heading along unit ``direction`` ``(N, 2)``: the closest point whose lane runs the same way wins (alignment
        of the lane's local direction > 0.7, then 0.3 per metre of distance); -inf where the lane does not."""
        lane = self.owner[near]
        seg = self.flat[np.minimum(near + 1, self.lane_end[lane])] - self.flat[np.maximum(near - 1,
                                                                                       self.lane_start[lane])]
        align = (seg * direction[:, None]).sum(-1) / np.maximum(np.linalg.norm(seg, axis=-1), 1e-9)
        gap = np.linalg.norm(self.flat[near] - ends[:, None], axis=-1)
        return np.where(align > 0.7, align - 0.3 * gap, -np.inf)


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


def _resample_many(paths: list[np.ndarray], spacing: float = ROUTE_SPACING) -> list[np.ndarray]:
    """Points every ``spacing`` m along each path (at least one point), float32, in one batched pass
    (``geometry.resample_polylines``)."""
    out = resample_polylines([p.astype(np.float64) for p in paths], spacing)
    return [r.astype(np.float32) if len(r) else np.zeros((1, 2), np.float32) for r in out]
