"""The one home of geometry: angle wrapping, polyline resampling, frames and boxes.

Units are metres and radians; headings are counter-clockwise from +x.
"""

from __future__ import annotations

import numpy as np


def wrap_angle(angle: np.ndarray) -> np.ndarray:
    """Wrap angles (rad) to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


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


def box_corners(x: np.ndarray, y: np.ndarray, heading: np.ndarray, length: np.ndarray,
                width: np.ndarray) -> np.ndarray:
    """Corners of oriented boxes, counter-clockwise from front-left: ``(..., 4, 2)`` for inputs of shape ``(...)``.

    Order: front-left, rear-left, rear-right, front-right (m, world frame).
    """
    c, s = np.cos(heading), np.sin(heading)
    half_l, half_w = np.asarray(length) / 2, np.asarray(width) / 2
    # Box-frame corner offsets (forward, left) in counter-clockwise order starting front-left.
    fwd = np.stack([half_l, -half_l, -half_l, half_l], axis=-1)
    left = np.stack([half_w, half_w, -half_w, -half_w], axis=-1)
    cx = np.asarray(x)[..., None] + fwd * c[..., None] - left * s[..., None]
    cy = np.asarray(y)[..., None] + fwd * s[..., None] + left * c[..., None]
    return np.stack([cx, cy], axis=-1)
