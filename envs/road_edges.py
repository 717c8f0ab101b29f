"""Exact signed distance to road-edge polylines, as the WOSAC realism metric defines it.

Road edges are polylines with the drivable area on their LEFT. A polyline is *closed* (a ring) when its first and
last points are less than 1 m apart, *open* otherwise (real datasets such as the Waymo Open Motion Dataset give
open edge pieces; the towns maps give rings, opened where lanes cross the map border: ``open_at_map_border``).

The distance of a point is its planar distance to the nearest segment of any polyline (ties: the segment listed
first). Its sign says on which side of that segment the point lies (negative: on the road), decided as follows:
where the point's projection falls inside the segment, by the side of the segment's line; where it falls before
the segment's start (after its end) and the polyline continues there, by the two segments meeting at that vertex
(the larger of their sides at a convex turn, the smaller at a concave one); at the open end of a polyline, by
the side of the end segment's line. A point exactly on a segment's line has distance 0.

Queries are exact and fast: a per-map grid lists, for every cell, the segments that can be nearest to some point
of the cell (those within the cell-centre distance plus the cell diagonal), so a query tests a handful of
segments; points beyond the grid test every segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np

from envs.parallel import parallel_kernel

CLOSED_TOLERANCE = 1.0  # m: a polyline whose ends are nearer than this is a ring (WOSAC: squared distance < 1 m^2)
EDGE_CELL = 1.0  # m: cell size of the candidate grid
EDGE_MARGIN = 100.0  # m of grid around the road edges (agents driving on past a map exit stay on the grid)


@dataclass(frozen=True, eq=False)
class RoadEdges:
    """Road-edge segments of one map and their candidate grid (numpy).

    segments: ``(S, 4)`` float64 x0, y0, x1, y1 (m) of every non-degenerate segment.
    prev / next: ``(S,)`` int64 the segment before / after it on its polyline (-1 at an open end; rings wrap).
    origin: ``(2,)`` float64 lower-left corner of the grid; cell: m per cell; shape: ``(H, W)`` cells.
    cell_start: ``(H * W + 1,)`` int64 CSR offsets into cell_segments ``(N,)`` int32, each cell's candidates in
        order of their distance to its centre, and cell_lower ``(N,)`` float32 a lower bound on each candidate's
        distance to any point of the cell (a query stops at the first candidate that cannot beat the best).
    cell_value: ``(H * W,)`` float32 signed distance at each cell's centre, NaN where a candidate segment ends a
        polyline (the distance may jump there: beyond an open end the sign flips across the end segment's line).
        Elsewhere the distance is continuous with slope at most 1, so it is within ``cell / sqrt 2`` of this value
        anywhere in the cell: a bound that lets ``box_edge_distance`` skip corners that cannot be the worst.
    """

    segments: np.ndarray
    prev: np.ndarray
    next: np.ndarray
    origin: np.ndarray
    cell: float
    shape: tuple[int, int]
    cell_start: np.ndarray
    cell_segments: np.ndarray
    cell_lower: np.ndarray
    cell_value: np.ndarray

    @property
    def empty(self) -> bool:
        return len(self.segments) == 0

    @cached_property
    def packed(self) -> np.ndarray:
        """``(S, 5)`` start x, y, direction x, y and 1 / squared length of every segment (what queries read)."""
        return _pack(self.segments)

    def polylines(self) -> list[np.ndarray]:
        """The polylines the segments came from (``(N, 2)`` each; rings end on their first point)."""
        out, start = [], 0
        for k in range(1, len(self.segments) + 1):
            if k == len(self.segments) or self.prev[k] != k - 1:
                seg = self.segments[start:k]
                out.append(np.concatenate([seg[:, :2], seg[-1:, 2:]]))
                start = k
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields as plain arrays (for saving)."""
        return {"edge_segments": self.segments, "edge_prev": self.prev, "edge_next": self.next,
                "edge_origin": self.origin, "edge_cell": np.array(self.cell), "edge_shape": np.array(self.shape),
                "edge_cell_start": self.cell_start, "edge_cell_segments": self.cell_segments,
                "edge_cell_lower": self.cell_lower, "edge_cell_value": self.cell_value}

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> RoadEdges:
        return cls(segments=d["edge_segments"], prev=d["edge_prev"], next=d["edge_next"], origin=d["edge_origin"],
                   cell=float(d["edge_cell"]), shape=tuple(int(v) for v in d["edge_shape"]),
                   cell_start=d["edge_cell_start"], cell_segments=d["edge_cell_segments"],
                   cell_lower=d["edge_cell_lower"], cell_value=d["edge_cell_value"])

    def kernel_args(self) -> tuple:
        """The arguments the compiled queries take after the points (``box_edge_distance``)."""
        return (self.packed, self.prev, self.next, float(self.origin[0]), float(self.origin[1]), self.cell,
                self.shape[0], self.shape[1], self.cell_start, self.cell_segments, self.cell_lower, self.cell_value)

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (m, > 0 off the road) of points ``(..., 2)`` -> ``(...)`` float64."""
        pts = np.ascontiguousarray(np.asarray(points, np.float64).reshape(-1, 2))
        out = np.empty(len(pts))
        if self.empty:
            out[:] = np.nan
        else:
            _query_points(pts, *self.kernel_args()[:-1], out)
        return out.reshape(np.shape(points)[:-1])


def build_road_edges(polylines: list[np.ndarray], cell: float = EDGE_CELL, margin: float = EDGE_MARGIN) -> RoadEdges:
    """Segments of ``polylines`` (each ``(N, 2)``, road on the left) and their candidate grid."""
    segs, prev, nxt = [], [], []
    for line in polylines:
        line = np.asarray(line, np.float64)[:, :2]
        if len(line) < 2:
            continue
        keep = np.hypot(*np.diff(line, axis=0).T) > 0  # zero-length segments have no side
        seg = np.concatenate([line[:-1], line[1:]], axis=1)[keep]
        n = len(seg)
        if n == 0:
            continue
        base = sum(len(s) for s in segs)
        idx = np.arange(n) + base
        closed = float(np.hypot(*(line[0] - line[-1]))) < CLOSED_TOLERANCE
        p, q = idx - 1, idx + 1
        p[0], q[-1] = (idx[-1], idx[0]) if closed else (-1, -1)
        segs.append(seg)
        prev.append(p)
        nxt.append(q)
    if not segs:
        z = np.zeros((0,), np.int64)
        return RoadEdges(np.zeros((0, 4)), z, z, np.zeros(2), cell, (0, 0), np.zeros(1, np.int64),
                         np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    segments = np.concatenate(segs)
    lo = np.minimum(segments[:, :2], segments[:, 2:]).min(axis=0) - margin
    hi = np.maximum(segments[:, :2], segments[:, 2:]).max(axis=0) + margin
    w, h = (int(v) for v in np.ceil((hi - lo) / cell))
    packed = _pack(segments)
    prev, nxt = np.concatenate(prev).astype(np.int64), np.concatenate(nxt).astype(np.int64)
    cell_start, cell_segments = _candidate_grid(packed, lo[0], lo[1], cell, h, w)
    cell_lower = _order_candidates(packed, lo[0], lo[1], cell, w, cell_start, cell_segments)
    cell_value = _cell_values(packed, prev, nxt, lo[0], lo[1], cell, h, w, cell_start, cell_segments, cell_lower)
    return RoadEdges(segments=segments, prev=prev, next=nxt, origin=lo.astype(np.float64), cell=float(cell),
                     shape=(h, w), cell_start=cell_start, cell_segments=cell_segments, cell_lower=cell_lower,
                     cell_value=cell_value)


def _pack(segments: np.ndarray) -> np.ndarray:
    d = segments[:, 2:] - segments[:, :2]
    return np.ascontiguousarray(np.concatenate([segments[:, :2], d, 1.0 / (d * d).sum(1, keepdims=True)], axis=1))


# ------------------------------------------------------------------------------------------------------------
# Compiled loops
# ------------------------------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True, inline="always")
def _segment_d2(px, py, seg, k):
    """Squared planar distance from (px, py) to packed segment k, and the projection's position along it."""
    dx, dy = px - seg[k, 0], py - seg[k, 1]
    ex, ey = seg[k, 2], seg[k, 3]
    t = (dx * ex + dy * ey) * seg[k, 4]
    c = min(max(t, 0.0), 1.0)
    return (dx - c * ex) ** 2 + (dy - c * ey) ** 2, t


@numba.njit(cache=True, nogil=True, inline="always")
def _side(px, py, seg, k):
    """-1 / 0 / +1: the point is left of / on / right of packed segment k's line (WOSAC: road on the left)."""
    c = (px - seg[k, 0]) * seg[k, 3] - (py - seg[k, 1]) * seg[k, 2]
    return 1.0 if c > 0 else (-1.0 if c < 0 else 0.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _convex(seg, a, b):
    """Whether the turn from packed segment a into segment b is to the left (counter-clockwise)."""
    return seg[a, 2] * seg[b, 3] - seg[a, 3] * seg[b, 2] > 0


@numba.njit(cache=True, nogil=True, inline="always")
def _signed(px, py, seg, prev, nxt, best, d2, t):
    """Signed distance given the nearest segment ``best``, its squared distance and the relative projection."""
    n = _side(px, py, seg, best)
    if t < 0.0 and prev[best] >= 0:
        m = _side(px, py, seg, prev[best])
        n = max(n, m) if _convex(seg, prev[best], best) else min(n, m)
    elif t > 1.0 and nxt[best] >= 0:
        m = _side(px, py, seg, nxt[best])
        n = max(n, m) if _convex(seg, best, nxt[best]) else min(n, m)
    return n * math.sqrt(d2)


@numba.njit(cache=True, nogil=True, inline="always")
def edge_distance(px, py, seg, prev, nxt, ox, oy, cell, h, w, cell_start, cell_segments, cell_lower):
    """Signed distance of one point (``RoadEdges`` fields, ``seg`` = ``RoadEdges.packed``): the candidates of its
    cell nearest first, until one cannot beat the best (ties: the lower segment index), or every segment beyond
    the grid."""
    i, j = math.floor((px - ox) / cell), math.floor((py - oy) / cell)
    best, best_d2, best_t = -1, 1e300, 0.0
    if 0 <= i < w and 0 <= j < h:
        c = j * w + i
        for q in range(cell_start[c], cell_start[c + 1]):
            if cell_lower[q] * cell_lower[q] > best_d2:
                break
            k = cell_segments[q]
            d2, t = _segment_d2(px, py, seg, k)
            if d2 < best_d2 or (d2 == best_d2 and k < best):
                best, best_d2, best_t = k, d2, t
    else:
        for k in range(seg.shape[0]):
            d2, t = _segment_d2(px, py, seg, k)
            if d2 < best_d2:
                best, best_d2, best_t = k, d2, t
    return _signed(px, py, seg, prev, nxt, best, best_d2, best_t)


@parallel_kernel
def _query_points(pts, seg, prev, nxt, ox, oy, cell, h, w, cell_start, cell_segments, cell_lower, out):
    for p in numba.prange(pts.shape[0]):
        out[p] = edge_distance(pts[p, 0], pts[p, 1], seg, prev, nxt, ox, oy, cell, h, w, cell_start, cell_segments,
                               cell_lower)


@numba.njit(cache=True, nogil=True, inline="always")
def _cell_and_parent(c, ox, oy, cell, w, parent_start, ratio, parent_w, n_seg):
    """Centre of cell c and the range of its parent's candidates (every segment without a parent grid)."""
    i, j = c % w, c // w
    if ratio:
        pc = (j // ratio) * parent_w + i // ratio
        return ox + (i + 0.5) * cell, oy + (j + 0.5) * cell, parent_start[pc], parent_start[pc + 1]
    return ox + (i + 0.5) * cell, oy + (j + 0.5) * cell, 0, n_seg


@parallel_kernel
def _refine(seg, ox, oy, cell, h, w, parent_start, parent_segments, ratio, parent_w):
    """Candidate lists of a grid of ``cell``-sized cells from those of a grid ``ratio`` times coarser (or, with
    ``ratio`` 0, from every segment): per cell, the segments within (distance of the nearest one to the cell
    centre) + the cell diagonal of the centre. Any point of the cell has its nearest segment among them (triangle
    inequality, both ways), and a finer cell's list is a subset of its parent's."""
    n_cells = h * w
    reach = math.sqrt(2.0) * cell  # twice the half diagonal
    counts = np.zeros(n_cells + 1, np.int64)
    bound = np.empty(n_cells)
    for c in numba.prange(n_cells):
        px, py, lo, hi = _cell_and_parent(c, ox, oy, cell, w, parent_start, ratio, parent_w, seg.shape[0])
        best = 1e300
        for q in range(lo, hi):
            k = parent_segments[q] if ratio else q
            best = min(best, _segment_d2(px, py, seg, k)[0])
        bound[c] = (math.sqrt(best) + reach) ** 2 + 1e-9
        m = 0
        for q in range(lo, hi):
            k = parent_segments[q] if ratio else q
            m += _segment_d2(px, py, seg, k)[0] <= bound[c]
        counts[c + 1] = m
    start = np.cumsum(counts)
    out = np.empty(start[-1], np.int32)
    for c in numba.prange(n_cells):
        px, py, lo, hi = _cell_and_parent(c, ox, oy, cell, w, parent_start, ratio, parent_w, seg.shape[0])
        q_out = start[c]
        for q in range(lo, hi):
            k = parent_segments[q] if ratio else q
            if _segment_d2(px, py, seg, k)[0] <= bound[c]:
                out[q_out] = k
                q_out += 1
    return start, out


def _candidate_grid(packed: np.ndarray, ox: float, oy: float, cell: float, h: int, w: int, levels: int = 3):
    """``_refine`` from a grid 2^levels times coarser down to ``cell`` (each level halves the cell): the
    coarse level tests every segment, the finer ones only their parent's candidates."""
    start, segs = np.zeros(1, np.int64), np.zeros(0, np.int32)
    parent_w, ratio = 0, 0
    for level in range(levels, -1, -1):
        f = 2 ** level
        lw, lh = -(-w // f), -(-h // f)
        start, segs = _refine(packed, ox, oy, cell * f, lh, lw, start, segs, ratio, parent_w)
        parent_w, ratio = lw, 2
    return start, segs


@parallel_kernel
def _order_candidates(seg, ox, oy, cell, w, cell_start, cell_segments):
    """Sort each cell's candidates by their distance to its centre (in place) and return ``cell_lower``: that
    distance less the half diagonal (any point of the cell is at least this far from the segment)."""
    lower = np.empty(cell_segments.shape[0], np.float32)
    half = cell * math.sqrt(0.5) + 1e-4  # + float32 slack
    for c in numba.prange(cell_start.shape[0] - 1):
        lo, hi = cell_start[c], cell_start[c + 1]
        px, py = ox + (c % w + 0.5) * cell, oy + (c // w + 0.5) * cell
        d = np.empty(hi - lo)
        for q in range(lo, hi):
            d[q - lo] = math.sqrt(_segment_d2(px, py, seg, cell_segments[q])[0])
        order = np.argsort(d, kind="mergesort")  # stable: equal distances keep ascending segment order
        ks = cell_segments[lo:hi].copy()
        for q in range(hi - lo):
            cell_segments[lo + q] = ks[order[q]]
            lower[lo + q] = max(d[order[q]] - half, 0.0)
    return lower


@parallel_kernel
def _cell_values(seg, prev, nxt, ox, oy, cell, h, w, cell_start, cell_segments, cell_lower):
    """``RoadEdges.cell_value``: the signed distance at each cell centre, NaN where a candidate ends a polyline."""
    out = np.empty(h * w, np.float32)
    for c in numba.prange(h * w):
        open_end = False
        for q in range(cell_start[c], cell_start[c + 1]):
            k = cell_segments[q]
            open_end = open_end or prev[k] < 0 or nxt[k] < 0
        if open_end:
            out[c] = np.nan
        else:
            px, py = ox + (c % w + 0.5) * cell, oy + (c // w + 0.5) * cell
            out[c] = edge_distance(px, py, seg, prev, nxt, ox, oy, cell, h, w, cell_start, cell_segments, cell_lower)
    return out


_BOUND_SLACK = 1e-3  # m added to the cell bound (float32 cell values)


@parallel_kernel
def box_edge_distance(traj, valid, extent, seg, prev, nxt, ox, oy, cell, h, w, cell_start, cell_segments,
                      cell_lower, cell_value):
    """Largest signed road-edge distance (m) of the 4 corners of every valid box: traj ``(B, A, T, 5)`` x, y,
    heading, vx, vy; valid ``(B, A, T)``; extent ``(A, 2)`` length, width. Returns ``(B, A, T)`` float64 (0 where
    invalid). The other arguments are ``RoadEdges.kernel_args()``.

    Exact: a corner is skipped only when its cell's bound proves it is below another corner's (typically the two
    corners away from the nearest edge), never otherwise."""
    n_b, n_a, n_t = valid.shape
    out = np.zeros((n_b, n_a, n_t))
    reach = cell * math.sqrt(0.5) + _BOUND_SLACK
    # agent-major: the rollouts of one agent visit the same cells one after the other (in cache; sample-major
    # order made this loop wait on memory)
    for ab in numba.prange(n_b * n_a):
        a, b = ab // n_b, ab % n_b
        hl, hw = 0.5 * extent[a, 0], 0.5 * extent[a, 1]
        px, py, lo, hi = np.empty(4), np.empty(4), np.empty(4), np.empty(4)
        for t in range(n_t):
            if not valid[b, a, t]:
                continue
            x, y = traj[b, a, t, 0], traj[b, a, t, 1]
            c, s = math.cos(traj[b, a, t, 2]), math.sin(traj[b, a, t, 2])
            floor = -1e300
            for k in range(4):
                sx = 1.0 if k == 0 or k == 3 else -1.0
                sy = 1.0 if k < 2 else -1.0
                px[k], py[k] = x + sx * hl * c - sy * hw * s, y + sx * hl * s + sy * hw * c
                i, j = math.floor((px[k] - ox) / cell), math.floor((py[k] - oy) / cell)
                v = cell_value[j * w + i] if 0 <= i < w and 0 <= j < h else np.nan
                if v == v:
                    lo[k], hi[k] = v - reach, v + reach
                else:
                    lo[k], hi[k] = -1e300, 1e300
                floor = max(floor, lo[k])
            worst = -1e300
            for k in range(4):
                if hi[k] >= floor:  # else it is below the corner that set the floor
                    worst = max(worst, edge_distance(px[k], py[k], seg, prev, nxt, ox, oy, cell, h, w, cell_start,
                                                     cell_segments, cell_lower))
            out[b, a, t] = worst
    return out
