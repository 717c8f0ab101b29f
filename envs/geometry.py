"""The one home of geometry: angle wrapping, polyline resampling, frames, boxes and box overlap.

Units are metres and radians; headings are counter-clockwise from +x. Functions taking arrays accept numpy
arrays or torch tensors alike (the result has the input's kind) unless their name says otherwise.
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
    cx = x[..., None] + fwd * c[..., None] - left * s[..., None]
    cy = y[..., None] + fwd * s[..., None] + left * c[..., None]
    return _stack([cx, cy], axis=-1)


def to_local(points, origin_xy, origin_heading):
    """Express world points ``(..., N, 2)`` in frames with origin ``(..., 2)`` and heading ``(...)``.

    Returns ``(..., N, 2)``: x forward, y left of each frame.
    """
    c, s = _cos_sin(origin_heading)
    d = points - origin_xy[..., None, :]
    return _stack([d[..., 0] * c[..., None] + d[..., 1] * s[..., None],
                   -d[..., 0] * s[..., None] + d[..., 1] * c[..., None]], axis=-1)


def to_world(points, origin_xy, origin_heading):
    """Inverse of ``to_local``: local points ``(..., N, 2)`` back to the world frame."""
    c, s = _cos_sin(origin_heading)
    wx = points[..., 0] * c[..., None] - points[..., 1] * s[..., None] + origin_xy[..., None, 0]
    wy = points[..., 0] * s[..., None] + points[..., 1] * c[..., None] + origin_xy[..., None, 1]
    return _stack([wx, wy], axis=-1)


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
