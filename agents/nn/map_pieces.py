"""Map pieces: every map cut into 5 m polyline pieces, the input of the learned agents' map encoder
(``agents.nn.map_encoder.MapEncoder``), and the per-map caches of their positions and neighbour lists.

A piece is ``PIECE_POINTS`` points 0.5 m apart in its own frame (origin at its first point, x towards its last),
its pose in the world and its polyline type. Pieces depend on the map alone, so they are computed once per map
and process and shared by training samples and rollouts.
"""

from __future__ import annotations

import numpy as np

from agents.nn.attention import RadiusGrid, radius_neighbours
from envs.geometry import arc_length, resample_polyline, split_polyline, to_local
from envs.types import PolylineType

PIECE_SPACING = 0.5  # m between the points of a map piece
PIECE_POINTS = 11  # points per piece: 5 m
PIECE_GAP = 3.0  # m: polylines are split where consecutive points are farther apart
# Lane boundaries (markings) are left out: lane centres and road edges carry the same geometry for driving, and
# the boundaries would more than double the pieces the map encoder attends over (measured on the towns maps).
MAP_PIECE_TYPES = (PolylineType.LANE_CENTER, PolylineType.ROAD_EDGE, PolylineType.CROSSWALK, PolylineType.WALKWAY)


def map_pieces(m, types=MAP_PIECE_TYPES) -> dict[str, np.ndarray]:
    """A ``MapData`` cut into 5 m pieces: ``pose`` ``(M, 3)`` (first point, direction first -> last point),
    ``points`` ``(M, PIECE_POINTS, 2)`` in the piece's frame, ``type`` ``(M,)`` ``PolylineType``. Polylines are
    resampled every 0.5 m and split at gaps > 3 m; a last piece shorter than 5 m keeps repeating its end point.
    """
    poses, points, kinds = [], [], []
    keep = {int(t) for t in types}
    for p in range(m.num_polylines):
        if int(m.polyline_type[p]) not in keep:
            continue
        line = m.polyline(p).astype(np.float64)
        if len(line) < 2:
            continue
        gaps = np.flatnonzero(np.linalg.norm(np.diff(line, axis=0), axis=1) > PIECE_GAP) + 1
        for part in np.split(line, gaps):
            if len(part) < 2 or arc_length(part)[-1] < 1e-6:
                continue
            for piece in split_polyline(resample_polyline(part, PIECE_SPACING), PIECE_POINTS):
                if len(piece) < 2:
                    continue
                piece = np.concatenate([piece, np.repeat(piece[-1:], PIECE_POINTS - len(piece), axis=0)])
                d = piece[-1] - piece[0]
                heading = float(np.arctan2(d[1], d[0]))
                points.append(to_local(piece, piece[0], heading))
                poses.append((piece[0, 0], piece[0, 1], heading))
                kinds.append(int(m.polyline_type[p]))
    if not poses:
        return {"pose": np.zeros((0, 3), np.float32), "points": np.zeros((0, PIECE_POINTS, 2), np.float32),
                "type": np.zeros(0, np.int64)}
    return {"pose": np.asarray(poses, np.float32), "points": np.asarray(points, np.float32),
            "type": np.asarray(kinds, np.int64)}


_PIECES: dict[str, dict] = {}


def cached_map_pieces(m) -> dict:
    """``map_pieces(m)`` plus ``tree``, a ``scipy.spatial.cKDTree`` of the piece positions, computed once per
    process and map id (training samples and rollouts on the same map share them)."""
    if m.map_id not in _PIECES:
        from scipy.spatial import cKDTree

        p = map_pieces(m)
        p["tree"] = cKDTree(p["pose"][:, :2] if len(p["pose"]) else np.zeros((1, 2)))
        _PIECES[m.map_id] = p
    return _PIECES[m.map_id]


def map_piece_grid_table(m, radius: float, cell: float) -> tuple:
    """``RadiusGrid.table`` of the piece positions of map ``m``, cached with the pieces (rollouts on the map
    share it)."""
    p = cached_map_pieces(m)
    key = ("grid", float(radius), float(cell))
    if key not in p:
        p[key] = RadiusGrid.table(p["pose"][:, :2], radius, cell, tree=p["tree"] if len(p["pose"]) else None)
    return p[key]


def map_piece_neighbours(m, k: int, radius: float) -> np.ndarray:
    """``(M, k)`` the ``k`` nearest pieces of every piece of map ``m`` within ``radius`` (m) on the whole map (-1:
    none), cached with the pieces. Training crops and rollouts use these same lists, so a piece's encoding never
    depends on which other pieces a batch happens to hold."""
    p = cached_map_pieces(m)
    key = ("neighbours", int(k), float(radius))
    if key not in p:
        p[key] = radius_neighbours(p["pose"][:, :2], p["tree"], len(p["pose"]), k, radius)
    return p[key]
