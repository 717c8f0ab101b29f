"""Per-map structures for fast batched queries, built once per map and shared by every scene that uses it.

- A signed-distance field of the drivable area (m; > 0 off-road, < 0 on-road) on a regular grid, rasterised
  from the road-edge rings: off-road tests and distance-to-road-edge become one bilinear lookup per point
  instead of a search over thousands of edge segments.
- Fixed-length polyline chunks (lane centres, boundaries, road edges) for observations.
- The road edges the episode metrics measure against (``metric_road_edges``: opened where lanes cross the map
  border) with their candidate grid (``envs.road_edges.RoadEdges``): exact signed distances, as WOSAC defines them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from envs.geometry import split_polyline
from envs.road_edges import RoadEdges, build_road_edges
from envs.types import MapData, PolylineType

SDF_RESOLUTION = 0.25  # m per cell
SDF_MARGIN = 20.0  # m of grid around the map extent; beyond it distances are clamped at the border
CHUNK_POINTS = 10  # points per observation chunk (~18 m of a lane at the 2 m map spacing)
NO_ROAD_EDGE = -1e3  # SDF value of maps without road edges: nothing is ever off-road there


@dataclass(frozen=True, eq=False)
class MapIndex:
    """Precomputed per-map arrays (numpy; ``MapBatch`` stacks them as tensors).

    sdf: ``(H, W)`` float32 signed distance to the road edge at cell centres (m, > 0 outside the drivable area).
    origin: ``(2,)`` world x, y of the grid's lower-left corner. resolution: m per cell.
    chunks: ``(C, CHUNK_POINTS, 2)`` float32 world points; chunk_mask ``(C, CHUNK_POINTS)`` bool;
    chunk_type: ``(C,)`` int64 ``PolylineType``; chunk_polyline: ``(C,)`` int64 source polyline index.
    has_road_edges: whether off-road is defined on this map.
    road_edges: the metric road edges (``metric_road_edges``) and their query grid.
    """

    map_id: str
    sdf: np.ndarray
    origin: np.ndarray
    resolution: float
    chunks: np.ndarray
    chunk_mask: np.ndarray
    chunk_type: np.ndarray
    chunk_polyline: np.ndarray
    has_road_edges: bool
    road_edges: RoadEdges


def drivable_mask(m: MapData, origin: np.ndarray, shape: tuple[int, int], resolution: float) -> np.ndarray:
    """Rasterise the drivable area (``(H, W)`` bool, row = y) from the road-edge rings.

    Exterior rings run counter-clockwise and holes clockwise; each ring is filled (exterior) or cleared (hole)
    in order of decreasing area so nested rings come out right.
    """
    from PIL import Image, ImageDraw

    height, width = shape
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    rings = m.polylines_of(PolylineType.ROAD_EDGE)

    def signed_area(r: np.ndarray) -> float:
        return 0.5 * float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))

    for ring in sorted(rings, key=lambda r: -abs(signed_area(r))):
        pix = (ring - origin) / resolution  # pixel coordinates: cell (row j, col i) spans [i, i+1) x [j, j+1)
        draw.polygon([(float(px), float(py)) for px, py in pix], fill=255 if signed_area(ring) > 0 else 0)
    return np.asarray(img) > 0


def signed_distance_field(inside: np.ndarray, resolution: float) -> np.ndarray:
    """Signed distance (m) from each cell centre to the boundary of ``inside``: negative inside, positive out."""
    from scipy.ndimage import distance_transform_edt

    if inside.all():
        return np.full(inside.shape, NO_ROAD_EDGE, np.float32)
    if not inside.any():
        return np.full(inside.shape, -NO_ROAD_EDGE, np.float32)
    outside_dist = distance_transform_edt(~inside)  # distance of outside cells to the nearest inside cell
    inside_dist = distance_transform_edt(inside)
    # Half a cell puts the zero level on the boundary between an inside and an outside cell.
    sdf = np.where(inside, -(inside_dist - 0.5), outside_dist - 0.5) * resolution
    return sdf.astype(np.float32)


def chunk_polylines(m: MapData, kinds: tuple[PolylineType, ...] = (PolylineType.LANE_CENTER,
                    PolylineType.LANE_BOUNDARY, PolylineType.ROAD_EDGE, PolylineType.CROSSWALK),
                    points_per_chunk: int = CHUNK_POINTS) -> tuple[np.ndarray, ...]:
    """Cut every polyline of the given kinds into pieces of ``points_per_chunk`` points (consecutive pieces
    share an end point). Returns chunks ``(C, N, 2)``, mask ``(C, N)``, type ``(C,)``, polyline index ``(C,)``."""
    chunks, masks, types, sources = [], [], [], []
    for p in np.flatnonzero(np.isin(m.polyline_type, [int(k) for k in kinds])):
        for piece in split_polyline(m.polyline(p), points_per_chunk):
            chunk = np.zeros((points_per_chunk, 2), np.float32)
            chunk[:len(piece)] = piece
            mask = np.zeros(points_per_chunk, bool)
            mask[:len(piece)] = True
            chunks.append(chunk)
            masks.append(mask)
            types.append(int(m.polyline_type[p]))
            sources.append(int(p))
    if not chunks:
        return (np.zeros((0, points_per_chunk, 2), np.float32), np.zeros((0, points_per_chunk), bool),
                np.zeros((0,), np.int64), np.zeros((0,), np.int64))
    return np.stack(chunks), np.stack(masks), np.array(types, np.int64), np.array(sources, np.int64)


def build_map_index(m: MapData, resolution: float = SDF_RESOLUTION, margin: float = SDF_MARGIN) -> MapIndex:
    """Rasterise the SDF and chunk the polylines of one map."""
    x0, y0, x1, y1 = (float(v) for v in m.extent)
    origin = np.array([x0 - margin, y0 - margin], np.float64)
    width = int(np.ceil((x1 - x0 + 2 * margin) / resolution))
    height = int(np.ceil((y1 - y0 + 2 * margin) / resolution))
    has_edges = m.count(PolylineType.ROAD_EDGE) > 0
    if has_edges:
        sdf = signed_distance_field(drivable_mask(m, origin, (height, width), resolution), resolution)
    else:
        sdf = np.full((2, 2), NO_ROAD_EDGE, np.float32)
    chunks, mask, ctype, cpoly = chunk_polylines(m)
    return MapIndex(map_id=m.map_id, sdf=sdf, origin=origin.astype(np.float32), resolution=resolution,
                    chunks=chunks, chunk_mask=mask, chunk_type=ctype, chunk_polyline=cpoly,
                    has_road_edges=has_edges, road_edges=build_road_edges(metric_road_edges(m)))


INDEX_VERSION = 4  # 2: the metric road edges and their grid; 3: with cell bounds; 4: ordered candidates


def save_map_index(path, ix: MapIndex) -> None:
    """Write ``ix`` as a compressed npz (SDF as float16: 1 cm resolution near roads, ample for 0.25 m cells),
    atomically."""
    from envs.fileio import atomic_write

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, version=np.array(INDEX_VERSION), map_id=np.array(ix.map_id),
                            sdf=ix.sdf.astype(np.float16), origin=ix.origin, resolution=np.array(ix.resolution),
                            chunks=ix.chunks, chunk_mask=ix.chunk_mask, chunk_type=ix.chunk_type,
                            chunk_polyline=ix.chunk_polyline, has_road_edges=np.array(ix.has_road_edges),
                            **ix.road_edges.arrays())


def load_map_index(path, resolution: float = SDF_RESOLUTION) -> MapIndex:
    """Read a saved ``MapIndex``; ``CorruptDataError`` if unreadable or built with other settings."""
    import zipfile

    from envs.errors import CorruptDataError

    try:
        with np.load(path, allow_pickle=False) as d:
            data = {k: d[k] for k in d.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CorruptDataError(f"Map index {path} is unreadable ({type(e).__name__}: {e}).") from e
    if int(data.get("version", -1)) != INDEX_VERSION or float(data["resolution"]) != resolution or \
            data["chunks"].shape[1] != CHUNK_POINTS:
        raise CorruptDataError(f"Map index {path} was built with other settings.")
    return MapIndex(map_id=str(data["map_id"]), sdf=data["sdf"].astype(np.float32), origin=data["origin"],
                    resolution=float(data["resolution"]), chunks=data["chunks"], chunk_mask=data["chunk_mask"],
                    chunk_type=data["chunk_type"], chunk_polyline=data["chunk_polyline"],
                    has_road_edges=bool(data["has_road_edges"]), road_edges=RoadEdges.from_arrays(data))


@lru_cache(maxsize=64)
def map_index(m: MapData) -> MapIndex:
    """``build_map_index`` memoised per map object (maps are loaded once per dataset and shared)."""
    return build_map_index(m)


def sample_sdf(sdf: torch.Tensor, origin: torch.Tensor, resolution: float, map_idx: torch.Tensor,
               points: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of signed distances for points on different maps, without copying any grid.

    Args:
        sdf: ``(M, H, W)`` grids (padded to a common size with a large positive value).
        origin: ``(M, 2)`` world x, y of each grid's lower-left corner.
        map_idx: ``(B,)`` long, which grid each row of points reads.
        points: ``(B, P, 2)`` world points.
    Returns:
        ``(B, P)`` signed distances in m (clamped at the grid border).
    """
    _, h, w = sdf.shape
    uv = (points - origin[map_idx][:, None, :]) / resolution - 0.5  # continuous cell coordinates (col, row)
    u = uv[..., 0].clamp(0, w - 1 - 1e-4)
    v = uv[..., 1].clamp(0, h - 1 - 1e-4)
    u0, v0 = u.floor(), v.floor()
    fu, fv = u - u0, v - v0
    flat = sdf.reshape(-1)
    base = map_idx[:, None] * (h * w) + v0.long() * w + u0.long()  # (B, P)
    top = flat[base] * (1 - fu) + flat[base + 1] * fu
    bottom = flat[base + w] * (1 - fu) + flat[base + w + 1] * fu
    return top * (1 - fv) + bottom * fv


# ---- map exits ----------------------------------------------------------------------------------------------
# Where the lane graph ends (a lane centre without a successor) the map ends too: vehicles leave the scene there
# in the logs. Learned agents that drive through an exit are removed (``Action.remove``) like the logged ones.
EXIT_HALF_WIDTH = 3.0  # m either side of a dead-end lane's last point (about a lane)
EXIT_DEPTH = 30.0  # m beyond it


def lane_exits(m: MapData) -> np.ndarray:
    """``(E, 4)`` float32 x, y (m) of the last point of every lane centre without a successor and cos, sin of
    its last segment's direction."""
    return _open_lane_ends(m, last=True)


def _open_lane_ends(m: MapData, last: bool) -> np.ndarray:
    """``(E, 4)`` the ends of the lane graph: the last point of every lane without a successor (``last``) or the
    first point of every lane without a predecessor, with the unit direction pointing out of the lane there."""
    column = 0 if last else 1  # successor pairs are (from, to)
    linked = set(np.asarray(m.successors)[:, column].tolist()) if len(m.successors) else set()
    out = []
    for p in np.flatnonzero(m.polyline_type == PolylineType.LANE_CENTER):
        line = m.polyline(int(p))
        if int(p) in linked or len(line) < 2:
            continue
        end, inner = (line[-1], line[-2]) if last else (line[0], line[1])
        d = end - inner
        n = float(np.hypot(*d))
        if n > 1e-6:
            out.append((end[0], end[1], d[0] / n, d[1] / n))
    return np.asarray(out, np.float32).reshape(-1, 4)


def passed_exit(xy: torch.Tensor, exits: torch.Tensor, half_width: float = EXIT_HALF_WIDTH,
                depth: float = EXIT_DEPTH) -> torch.Tensor:
    """Whether points ``(..., 2)`` lie beyond one of ``exits`` ``(E, 4)`` (``lane_exits``): past its end point by
    at most ``depth`` m along its direction and within ``half_width`` m of its line."""
    if len(exits) == 0:
        return torch.zeros(xy.shape[:-1], dtype=torch.bool, device=xy.device)
    d = xy[..., None, :] - exits[:, :2]  # (..., E, 2)
    along = d[..., 0] * exits[:, 2] + d[..., 1] * exits[:, 3]
    across = d[..., 1] * exits[:, 2] - d[..., 0] * exits[:, 3]
    return ((along > 0) & (along <= depth) & (across.abs() <= half_width)).any(dim=-1)


# ---- the map border for the episode metrics -----------------------------------------------------------------
BORDER_STUB = 50.0  # m: how far the road continues straight past the map border, for metrics
_CAP_ALONG = 0.3  # m: ring points this close to the end line of a lane that crosses the border lie on its cap
_CAP_ACROSS = 2.5  # m either side of that lane's end point (about a lane and a half)


def lane_entries(m: MapData) -> np.ndarray:
    """``(E, 4)`` float32 x, y (m) of the first point of every lane centre without a predecessor and cos, sin of
    the direction pointing *out* of the lane there (against its first segment)."""
    return _open_lane_ends(m, last=False)


def metric_road_edges(m: MapData, stub: float = BORDER_STUB) -> list[np.ndarray]:
    """The road edges the episode metrics measure against: the map's road-edge polylines, except that a closed
    ring is opened where a lane crosses the map border (a lane without successor ends on the ring, or one without
    predecessor starts on it) and both sides continue straight outward for ``stub`` m. Logged vehicles leave the
    scene there, and under the WOSAC protocol a simulated vehicle that drives on is still on the road, as it would
    be on the real road beyond the mapped area. Open polylines (e.g. Waymo's road-edge pieces) are kept as given."""
    ends = np.concatenate([lane_exits(m), lane_entries(m)]).astype(np.float64)
    out = []
    for line in m.polylines_of(PolylineType.ROAD_EDGE):
        line = np.asarray(line, np.float64)
        closed = len(line) > 3 and float(np.hypot(*(line[0] - line[-1]))) < 1e-6
        if not closed or len(ends) == 0:
            out.append(line)
            continue
        rel = line[:, None, :] - ends[None, :, :2]  # (N, E, 2)
        along = rel[..., 0] * ends[:, 2] + rel[..., 1] * ends[:, 3]
        across = rel[..., 1] * ends[:, 2] - rel[..., 0] * ends[:, 3]
        on_cap = (np.abs(along) <= _CAP_ALONG) & (np.abs(across) <= _CAP_ACROSS)  # (N, E)
        flagged = on_cap.any(axis=1)
        outward = ends[on_cap.argmax(axis=1), 2:]  # (N, 2), meaningful where flagged
        n_seg = len(line) - 1
        removed = flagged[:-1] & flagged[1:]  # segments across a cap
        if not removed.any():
            out.append(line)
            continue
        first = int(np.flatnonzero(removed)[0])
        run: list[int] = []
        for k in range(1, n_seg + 1):  # segments after the first removed one, around the ring
            s = (first + k) % n_seg
            if not removed[s]:
                run.append(s)
            if (removed[s] or k == n_seg) and run:
                pts = [line[i] for i in run] + [line[run[-1] + 1]]
                a, b = run[0], run[-1] + 1
                pts = [line[a] + outward[a] * stub] + pts + [line[b] + outward[b % n_seg] * stub]
                out.append(np.asarray(pts))
                run = []
    return out
