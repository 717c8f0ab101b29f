"""The one home of geometry: angle wrapping, polylines (arc length, resampling, densifying, cutting into pieces),
frames (points, vectors and poses into and out of a local frame), boxes and box overlap.

Units are metres and radians; headings are counter-clockwise from +x. A local frame has x forward and y to the
left of its heading. Functions taking arrays accept numpy arrays or torch tensors alike (the result has the
input's kind) unless their name or docstring says otherwise.

Every frame transform goes through ``_into_frame`` / ``_out_of_frame``, whose exact arithmetic (operation order
included) is what every caller has always computed, so moving a caller here changes no result in its last digit.
"""

from __future__ import annotations

import numpy as np
import torch


def _stack(arrays, axis: int):
    return torch.stack(arrays, dim=axis) if isinstance(arrays[0], torch.Tensor) else np.stack(arrays, axis=axis)


def _cos_sin(angle):
    if isinstance(angle, torch.Tensor):
        return torch.cos(angle), torch.sin(angle)
    return np.cos(angle), np.sin(angle)


def wrap_angle(angle):
    """Wrap angles (rad) to [-pi, pi)."""
    if not isinstance(angle, torch.Tensor):
        angle = np.asarray(angle)
    return (angle + np.pi) % (2 * np.pi) - np.pi


# ---- polylines -------------------------------------------------------------------------------------------------

def arc_length(points: np.ndarray) -> np.ndarray:
    """Cumulative arc length (m) along polylines, numpy: ``(..., N, D)`` -> ``(..., N)``, starting at 0.

    Float64 unless ``points`` is float32 (then the sums run in float32 and the result is float64 holding them).
    """
    seg = np.linalg.norm(np.diff(points, axis=-2), axis=-1)
    return np.concatenate([np.zeros((*seg.shape[:-1], 1)), np.cumsum(seg, axis=-1)], axis=-1)


RESAMPLE_CHUNK = 64  # polylines per batched pass of resample_polylines


def resample_polylines(polylines: list[np.ndarray], spacing: float) -> list[np.ndarray]:
    """``resample_polyline`` of many polylines in one batched search and lerp (no Python loop per polyline):
    the same points up to the last digit (the lerp rounds differently from ``np.interp``), float64."""
    if spacing <= 0:
        raise ValueError(f"spacing must be > 0 m, got {spacing}.")
    if not polylines:
        return []
    if len(polylines) > RESAMPLE_CHUNK:  # length-sorted chunks: padding to the longest costs the rest little
        order = np.argsort([len(p) for p in polylines], kind="stable")
        out: list = [None] * len(polylines)
        for start in range(0, len(order), RESAMPLE_CHUNK):
            idx = order[start:start + RESAMPLE_CHUNK]
            for i, r in zip(idx, resample_polylines([polylines[i] for i in idx], spacing), strict=True):
                out[i] = r
        return out
    import torch

    sizes = np.array([len(p) for p in polylines])
    n_max = max(int(sizes.max()), 1)
    pts = np.zeros((len(polylines), n_max, 2))
    for i, p in enumerate(polylines):
        if len(p):
            pts[i, :len(p)] = p
            pts[i, len(p):] = p[-1]  # padding adds no arc length
    arc = arc_length(pts)  # (N, n_max)
    counts = np.where(sizes > 0, np.floor((arc[:, -1] + 1e-9) / spacing).astype(np.int64) + 1, 0)
    k_max = max(int(counts.max()), 1)
    targets = np.minimum(np.arange(k_max) * spacing, arc[:, -1:])  # (N, K)
    hi = torch.searchsorted(torch.from_numpy(arc), torch.from_numpy(targets), side="right").numpy()
    hi = hi.clip(1, max(n_max - 1, 1))
    lo = hi - 1
    a0, a1 = np.take_along_axis(arc, lo, 1), np.take_along_axis(arc, np.minimum(hi, n_max - 1), 1)
    frac = np.clip((targets - a0) / np.maximum(a1 - a0, 1e-12), 0.0, 1.0)[..., None]
    p0 = np.take_along_axis(pts, lo[..., None], 1)
    p1 = np.take_along_axis(pts, np.minimum(hi, n_max - 1)[..., None], 1)
    out = p0 + frac * (p1 - p0)
    return [out[i, :counts[i]] for i in range(len(polylines))]


def resample_polyline(points: np.ndarray, spacing: float) -> np.ndarray:
    """Points every ``spacing`` m of arc length along one polyline ``(N, 2)``, numpy (``np.interp``).

    Starts at the first point; the last point is kept only if it falls on the ``spacing`` grid (within 1e-9 m).
    Returns ``(K, 2)`` float64; one point for a single point or a zero-length polyline, none for no points.
    """
    if spacing <= 0:
        raise ValueError(f"spacing must be > 0 m, got {spacing}.")
    points = np.asarray(points)
    if len(points) == 0:
        return np.zeros((0, 2))
    arc = arc_length(points)
    s = np.arange(0.0, arc[-1] + 1e-9, spacing)
    return np.stack([np.interp(s, arc, points[:, 0]), np.interp(s, arc, points[:, 1])], -1)


def split_polyline(points, points_per_piece: int) -> list:
    """Cut a polyline ``(N, D)`` into consecutive pieces of ``points_per_piece`` points that share their end
    points (piece ``i`` starts at point ``i * (points_per_piece - 1)``); the last piece may be shorter. A polyline
    of fewer than two points is one piece. The pieces are views (slices) of ``points``."""
    if points_per_piece < 2:
        raise ValueError(f"points_per_piece must be >= 2 (pieces share an end point), got {points_per_piece}.")
    step = points_per_piece - 1
    return [points[start:start + points_per_piece] for start in range(0, max(len(points) - 1, 1), step)]


def densify_polyline(points: np.ndarray, max_spacing: float) -> np.ndarray:
    """Insert evenly spaced points so that consecutive points are at most ``max_spacing`` m apart.

    Original vertices are kept exactly (so shared end points stay shared). ``points``: ``(N, D)``, returns
    ``(N', D)`` with ``N' >= N``.
    """
    if max_spacing <= 0:
        raise ValueError(f"max_spacing must be > 0 m, got {max_spacing}.")
    points = np.asarray(points)
    if len(points) < 2:
        return points.copy()
    seg = np.diff(points[:, :2], axis=0)
    pieces = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / max_spacing - 1e-9).astype(int))
    if np.all(pieces == 1):
        return points.copy()
    out = [points[:1]]
    for i, n in enumerate(pieces):
        frac = (np.arange(1, n) / n)[:, None]
        out.append(points[i] + frac * (points[i + 1] - points[i]))
        out.append(points[i + 1:i + 2])
    return np.concatenate(out, axis=0)


def box_corners(x, y, heading, length, width):
    """Corners of oriented boxes, counter-clockwise from front-left: ``(..., 4, 2)`` for inputs of shape ``(...)``.

    Order: front-left, rear-left, rear-right, front-right (m, world frame).
    """
    if not isinstance(x, torch.Tensor):
        x, y, heading, length, width = (np.asarray(v, dtype=np.float64) for v in (x, y, heading, length, width))
    c, s = _cos_sin(heading)
    half_l, half_w = length / 2, width / 2
    # Box-frame corner offsets (forward, left) in counter-clockwise order starting front-left.
    fwd = _stack([half_l, -half_l, -half_l, half_l], axis=-1)
    left = _stack([half_w, half_w, -half_w, -half_w], axis=-1)
    return _stack(_out_of_frame(x[..., None], y[..., None], fwd, left, c[..., None], s[..., None]), axis=-1)


# ---- frames ----------------------------------------------------------------------------------------------------

def _into_frame(dx, dy, c, s):
    """World offsets ``(dx, dy)`` from a frame's origin, rotated into the frame (heading cos ``c``, sin ``s``)."""
    return dx * c + dy * s, -dx * s + dy * c


def _out_of_frame(ox, oy, lx, ly, c, s):
    """Frame-local ``(lx, ly)`` in the world, for a frame at ``(ox, oy)`` with heading cos ``c``, sin ``s``."""
    return ox + lx * c - ly * s, oy + lx * s + ly * c


def to_local(points, origin_xy, origin_heading):
    """Express world points ``(..., N, 2)`` in frames with origin ``(..., 2)`` and heading ``(...)``.

    Returns ``(..., N, 2)``: x forward, y left of each frame.
    """
    c, s = _cos_sin(origin_heading)
    d = points - origin_xy[..., None, :]
    return _stack(_into_frame(d[..., 0], d[..., 1], c[..., None], s[..., None]), axis=-1)


def to_world(points, origin_xy, origin_heading):
    """Inverse of ``to_local``: local points ``(..., N, 2)`` back to the world frame."""
    c, s = _cos_sin(origin_heading)
    return _stack(_out_of_frame(origin_xy[..., None, 0], origin_xy[..., None, 1], points[..., 0], points[..., 1],
                                c[..., None], s[..., None]), axis=-1)


def rotate_to_local(vectors, heading):
    """World vectors ``(..., N, 2)`` (velocities, displacements) in the axes of frames with heading ``(...)``:
    ``(..., N, 2)`` forward, left. Unlike ``to_local`` nothing is translated."""
    c, s = _cos_sin(heading)
    return _stack(_into_frame(vectors[..., 0], vectors[..., 1], c[..., None], s[..., None]), axis=-1)


def pose_in_frame(pose, frame, wrap: bool = True):
    """Poses ``(..., 3)`` x, y, heading in the frames of poses ``frame`` ``(..., 3)`` (the two broadcast):
    ``(..., 3)`` x forward, y left, heading relative to the frame's (wrapped to [-pi, pi) if ``wrap``)."""
    c, s = _cos_sin(frame[..., 2])
    x, y = _into_frame(pose[..., 0] - frame[..., 0], pose[..., 1] - frame[..., 1], c, s)
    heading = pose[..., 2] - frame[..., 2]
    return _stack([x, y, wrap_angle(heading) if wrap else heading], axis=-1)


def pose_from_frame(local, frame):
    """Inverse of ``pose_in_frame``: poses ``(..., 3)`` given in the frames ``frame`` ``(..., 3)`` (broadcast) in
    the world, heading wrapped to [-pi, pi)."""
    c, s = _cos_sin(frame[..., 2])
    x, y = _out_of_frame(frame[..., 0], frame[..., 1], local[..., 0], local[..., 1], c, s)
    return _stack([x, y, wrap_angle(local[..., 2] + frame[..., 2])], axis=-1)


def boxes_overlap(corners_a: torch.Tensor, corners_b: torch.Tensor) -> torch.Tensor:
    """Whether oriented boxes overlap (separating-axis test), torch: ``(..., 4, 2)`` x ``(..., 4, 2)`` -> ``(...)``.

    Touching boxes (shared edge or corner, zero-area intersection) do not overlap.
    """
    # Candidate separating axes: the two edge normals of each box (rectangles: edges 0-1 and 1-2).
    edges = torch.cat([corners_a[..., 1:3, :] - corners_a[..., 0:2, :],
                       corners_b[..., 1:3, :] - corners_b[..., 0:2, :]], dim=-2)  # (..., 4, 2)
    axes = torch.stack([-edges[..., 1], edges[..., 0]], dim=-1)  # (..., 4, 2)
    # Projections of every corner on every axis: (..., 4 axes, 4 corners). Plain broadcasting, not einsum:
    # tiny einsum outputs hit a slow reduction path in torch 2.x on CPU.
    proj_a = (axes[..., :, None, :] * corners_a[..., None, :, :]).sum(-1)
    proj_b = (axes[..., :, None, :] * corners_b[..., None, :, :]).sum(-1)
    # Separated on an axis if one interval ends before (or exactly where) the other begins. A small relative
    # tolerance makes exactly-touching boxes (up to float rounding) count as separated.
    scale = axes.norm(dim=-1) * 1e-6
    separated = (proj_a.amax(-1) <= proj_b.amin(-1) + scale) | (proj_b.amax(-1) <= proj_a.amin(-1) + scale)
    return ~separated.any(dim=-1)
