"""Traffic-light violations, as the WOSAC 2025 realism metric defines them.

A vehicle violates a light at step t when the lane it is on at t (the lane centre nearest to its position) is
controlled by a signal that is red at t, and between steps t - 1 and t it passes the signal's stop point (its
position projected on the lane segment of the stop point moves from behind to ahead of it).

Two conventions to know:
- "The lane it is on" is found as the official code finds it: each lane segment's distance is measured from the
  point to ``start - t (end - start)``, not to the projection ``start + t (end - start)`` (``t`` the clipped
  relative projection). This reproduces the reference implementation's scores; it is not the geometric distance.
- trajdata gives per-lane signal states but no stop points, so the stop point of a signal-controlled lane is its
  first point: the stop line where the lane enters the junction it controls (WOMD and nuPlan attach signals to
  lanes that start at their stop line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from envs.parallel import parallel_kernel
from envs.types import PolylineType, TrafficLightState


@dataclass(frozen=True, eq=False)
class TrafficLights:
    """A scene's signals, for the violation feature (numpy).

    lane_segments: ``(S, 4)`` float64 x0, y0, x1, y1 of every lane-centre segment of the map; segment_lane ``(S,)``
    int64 the lane (polyline index) each belongs to.
    signal_lane: ``(K,)`` int64 polyline index of each signal-controlled lane; stop_point ``(K, 2)`` float64.
    red: ``(K, T)`` bool, whether the signal is in a stop state at each step of the scene.
    """

    lane_segments: np.ndarray
    segment_lane: np.ndarray
    signal_lane: np.ndarray
    stop_point: np.ndarray
    red: np.ndarray

    @classmethod
    def from_scene(cls, scene) -> TrafficLights | None:
        """The scene's signals, or None if it has none (or no map)."""
        if scene.map is None or len(scene.tl_lane) == 0:
            return None
        m = scene.map
        segs, owner = [], []
        for p in np.flatnonzero(m.polyline_type == PolylineType.LANE_CENTER):
            line = m.polyline(int(p)).astype(np.float64)
            if len(line) >= 2:
                segs.append(np.concatenate([line[:-1], line[1:]], axis=1))
                owner.append(np.full(len(line) - 1, int(p), np.int64))
        if not segs:
            return None
        signal_lane = np.asarray(scene.tl_lane, np.int64)
        stop = np.stack([m.polyline(int(p))[0].astype(np.float64) for p in signal_lane])
        return cls(lane_segments=np.concatenate(segs), segment_lane=np.concatenate(owner), signal_lane=signal_lane,
                   stop_point=stop, red=np.asarray(scene.tl_state) == TrafficLightState.RED)

    def violations(self, xy: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Red-light violations ``(B, A, T)`` bool of tracks ``xy`` ``(B, A, T, 2)`` with validity ``(B, A, T)``
        over the scene's steps (T must match ``red``); a violation at t also needs step t valid."""
        if xy.shape[2] != self.red.shape[1]:
            raise ValueError(f"TrafficLights: tracks have {xy.shape[2]} steps, the signals {self.red.shape[1]}.")
        stop_seg = np.empty((len(self.signal_lane), 4))
        for k, lane in enumerate(self.signal_lane):
            mine = np.flatnonzero(self.segment_lane == lane)
            best = _nearest_segment(self.stop_point[k, 0], self.stop_point[k, 1], self.lane_segments[mine])
            stop_seg[k] = self.lane_segments[mine[best]]
        return _violations(np.ascontiguousarray(xy, np.float64), np.ascontiguousarray(valid), self.lane_segments,
                           self.segment_lane, self.signal_lane, stop_seg, self.stop_point,
                           np.ascontiguousarray(self.red))


@numba.njit(cache=True, nogil=True)
def _nearest_segment(px, py, seg):
    """Index of the segment the official code calls nearest to (px, py) (see the module docstring)."""
    best, best_d = 0, 1e300
    for k in range(seg.shape[0]):
        sx, sy, ex, ey = seg[k, 0], seg[k, 1], seg[k, 2] - seg[k, 0], seg[k, 3] - seg[k, 1]
        dx, dy = px - sx, py - sy
        n2 = ex * ex + ey * ey
        t = (dx * ex + dy * ey) / n2 if n2 > 0 else 0.0
        t = min(max(t, 0.0), 1.0)
        d = math.hypot(dx + t * ex, dy + t * ey)
        if d < best_d:
            best, best_d = k, d
    return best


@numba.njit(cache=True, nogil=True)
def _along(px, py, seg):
    """Relative position of (px, py) projected on the line of segment ``seg`` (x0, y0, x1, y1)."""
    ex, ey = seg[2] - seg[0], seg[3] - seg[1]
    n2 = ex * ex + ey * ey
    return ((px - seg[0]) * ex + (py - seg[1]) * ey) / n2 if n2 > 0 else 0.0


@parallel_kernel
def _violations(xy, valid, seg, seg_lane, signal_lane, stop_seg, stop_point, red):
    n_b, n_a, n_t = valid.shape
    n_k = signal_lane.shape[0]
    out = np.zeros((n_b, n_a, n_t), np.bool_)
    stop_t = np.empty(n_k)
    for k in range(n_k):
        stop_t[k] = _along(stop_point[k, 0], stop_point[k, 1], stop_seg[k])
    for ba in numba.prange(n_b * n_a):
        b, a = ba // n_a, ba % n_a
        for t in range(1, n_t):
            if not valid[b, a, t]:
                continue
            lane = seg_lane[_nearest_segment(xy[b, a, t, 0], xy[b, a, t, 1], seg)]
            for k in range(n_k):
                if signal_lane[k] != lane or not red[k, t]:
                    continue
                before = _along(xy[b, a, t - 1, 0], xy[b, a, t - 1, 1], stop_seg[k])
                now = _along(xy[b, a, t, 0], xy[b, a, t, 1], stop_seg[k])
                if before < stop_t[k] < now:
                    out[b, a, t] = True
    return out
