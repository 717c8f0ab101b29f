"""The static map layer of the pygame renderer: map geometry prepared once per map, drawn into cached tiles.

The map is cut into square tiles of ``TILE_PX`` pixels at a given scale (pixels per metre). A tile is drawn the
first time a camera sees it (supersampled ``SUPERSAMPLE`` times and smooth-scaled down, which anti-aliases every
line and edge for free) and then only blitted: a moving ego camera costs a handful of blits per frame, never a
polyline redraw, and memory stays bounded for maps of any size (least recently used tiles are dropped).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pygame

from envs.geometry import densify_polyline
from envs.types import MapData, PolylineType

TILE_PX = 256  # tile side, px: a 512x512 frame touches at most 9 tiles
SUPERSAMPLE = 2  # tiles are drawn at 2x and smooth-scaled down (anti-aliasing)
MAX_TILES = 384  # LRU bound: 384 tiles of 256x256x4 B = 96 MiB

BACKGROUND = (238, 240, 235)  # off-road
ROAD = (217, 217, 217)  # drivable area (render/map_figure.py: #d9d9d9)
ROAD_EDGE = (51, 51, 51)  # #333333
LANE_BOUNDARY = (255, 255, 255)
LANE_CENTER = (160, 160, 160)  # #a0a0a0
CROSSWALK_FILL = (242, 242, 242)  # #f2f2f2
CROSSWALK_EDGE = (119, 119, 119)  # #777777
WALKWAY_FILL = (228, 226, 218)

CENTER_DASH = (1.0, 3.0)  # on, off (m): lane centres are a faint dotted guide, as in map_figure
BOUNDARY_DASH = (3.0, 6.0)  # on, off (m): lane-change-permitted markings
LANE_SEARCH_RADIUS = 2.8  # m from a boundary point to the lane centres on either side of it


def _closed(ring: np.ndarray) -> bool:
    return len(ring) >= 4 and bool(np.allclose(ring[0], ring[-1], atol=1e-3))


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _tangents(points: np.ndarray) -> np.ndarray:
    """Unit tangents ``(N, 2)`` of a polyline (central differences; ends one-sided)."""
    d = np.gradient(points.astype(np.float64), axis=0) if len(points) > 1 else np.zeros_like(points, np.float64)
    n = np.linalg.norm(d, axis=1, keepdims=True)
    return d / np.maximum(n, 1e-9)


def _dashes(points: np.ndarray, on: float, off: float) -> np.ndarray:
    """Dash segments ``(D, 2, 2)`` (start, end points, m) along a polyline: ``on`` m drawn, ``off`` m skipped.

    Dashes are a few metres long, so a straight segment between their end points follows the line closely.
    """
    if len(points) < 2:
        return np.zeros((0, 2, 2))
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    starts = np.arange(0.0, s[-1], on + off)
    ends = np.minimum(starts + on, s[-1])
    keep = ends - starts > 0.2 * on
    starts, ends = starts[keep], ends[keep]
    xy0 = np.stack([np.interp(starts, s, points[:, 0]), np.interp(starts, s, points[:, 1])], -1)
    xy1 = np.stack([np.interp(ends, s, points[:, 0]), np.interp(ends, s, points[:, 1])], -1)
    return np.stack([xy0, xy1], axis=1)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of the True runs of a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _dashed_boundary_mask(boundaries: list[np.ndarray], centres: list[np.ndarray]) -> list[np.ndarray]:
    """Per boundary point, whether the marking is dashed (bool arrays, one per boundary).

    ``MapData`` carries no marking types, so they are inferred the way a driver reads them: a boundary with a
    lane on each side running the same way separates lanes one may change between (dashed); one with opposing
    traffic across it, or no lane on one side (the kerb), is solid.
    """
    if not boundaries or not centres:
        return [np.zeros(len(b), bool) for b in boundaries]
    from scipy.spatial import cKDTree

    lane_pts = np.concatenate(centres).astype(np.float64)
    lane_dir = np.concatenate([_tangents(c) for c in centres])
    tree = cKDTree(lane_pts)
    pts = np.concatenate(boundaries).astype(np.float64)
    tan = np.concatenate([_tangents(b) for b in boundaries])
    dist, idx = tree.query(pts, k=8, distance_upper_bound=LANE_SEARCH_RADIUS)  # (N, 8); misses: inf, len(pts)
    found = np.isfinite(dist)
    idx = np.where(found, idx, 0)
    offset = lane_pts[idx] - pts[:, None]  # (N, 8, 2)
    side = tan[:, None, 0] * offset[..., 1] - tan[:, None, 1] * offset[..., 0]  # > 0: lane to the left
    # A lane centre straight across the boundary, not one merely further along it.
    across = np.abs(side) > 0.5 * np.linalg.norm(offset, axis=-1)
    n = len(pts)
    rows = np.arange(n)
    left_d = np.where(found & across & (side > 0), dist, np.inf)
    right_d = np.where(found & across & (side < 0), dist, np.inf)
    li, ri = left_d.argmin(1), right_d.argmin(1)
    has_both = np.isfinite(left_d[rows, li]) & np.isfinite(right_d[rows, ri])
    same_way = (lane_dir[idx[rows, li]] * lane_dir[idx[rows, ri]]).sum(-1) > 0.5
    dashed = has_both & same_way
    # Majority vote over 5 neighbouring points, so one odd point does not break a marking into pieces.
    out, start = [], 0
    for b in boundaries:
        m = dashed[start:start + len(b)].astype(np.float64)
        start += len(b)
        if len(m) >= 5:
            m = np.convolve(np.pad(m, 2, mode="edge"), np.ones(5) / 5, mode="valid")
        out.append(m > 0.5)
    return out


@dataclass
class MapGeometry:
    """A map's drawing primitives in world coordinates (m), each with its bounding box for tile culling.

    fills: ``(points (N, 2), colour)`` filled polygons in drawing order (largest road ring first, holes after
    the ring around them, so nested rings need no polygon clipping); lines: ``(points, colour, width_m,
    min_px)``; dashes: ``(D, 2, 2)`` segments with one colour/width per group.
    """

    fills: list
    fill_boxes: np.ndarray  # (F, 4) min_x, min_y, max_x, max_y
    lines: list
    line_boxes: np.ndarray  # (L, 4)
    dash_groups: list  # [(segments (D, 2, 2), boxes (D, 4), colour, width_m, min_px)]
    thick_lanes: list  # lane centres drawn wide as the drivable area on maps without road-edge rings
    thick_boxes: np.ndarray
    lane_width: float = 3.6  # m, only for thick_lanes


def _boxes(polys: list[np.ndarray]) -> np.ndarray:
    if not polys:
        return np.zeros((0, 4))
    return np.array([[*p.min(0), *p.max(0)] for p in polys], np.float64)


def prepare_map(map_data: MapData) -> MapGeometry:
    """Turn a ``MapData`` into drawing primitives (once per map; a few hundred ms for a town)."""
    kinds = map_data.polyline_type
    polys = [map_data.polyline(i).astype(np.float64) for i in range(map_data.num_polylines)]

    def of(kind: PolylineType) -> list[np.ndarray]:
        return [p for p, k in zip(polys, kinds, strict=True) if k == kind and len(p) >= 2]

    edges = of(PolylineType.ROAD_EDGE)
    rings = [r for r in edges if _closed(r)]
    # Road-edge rings run counter-clockwise around the drivable area and clockwise around holes: fill in order
    # of decreasing area, road colour for exteriors and background for holes.
    rings.sort(key=lambda r: -abs(_signed_area(r)))
    fills = [(r, ROAD if _signed_area(r) > 0 else BACKGROUND) for r in rings]
    for kind, fill in ((PolylineType.WALKWAY, WALKWAY_FILL), (PolylineType.CROSSWALK, CROSSWALK_FILL)):
        fills += [(r, fill) for r in of(kind) if len(r) >= 3]

    lines: list = []
    for kind, edge in ((PolylineType.WALKWAY, CROSSWALK_EDGE), (PolylineType.CROSSWALK, CROSSWALK_EDGE)):
        lines += [(r, edge, 0.1, 1) for r in of(kind)]
    centres = of(PolylineType.LANE_CENTER)
    boundaries = [densify_polyline(b, 1.0) for b in of(PolylineType.LANE_BOUNDARY)]
    dashed_masks = _dashed_boundary_mask(boundaries, centres)
    boundary_dashes = []
    for b, mask in zip(boundaries, dashed_masks, strict=True):
        for i0, i1 in _runs(~mask):
            # Include the next point so solid and dashed runs meet without a gap.
            lines.append((b[i0:min(i1 + 1, len(b))], LANE_BOUNDARY, 0.15, 1))
        for i0, i1 in _runs(mask):
            boundary_dashes.append(_dashes(b[i0:min(i1 + 1, len(b))], *BOUNDARY_DASH))
    lines += [(e, ROAD_EDGE, 0.25, 2) for e in edges]

    dash_groups = []
    for segs, colour, width, min_px in (
        ([_dashes(c, *CENTER_DASH) for c in centres], LANE_CENTER, 0.12, 1),
        (boundary_dashes, LANE_BOUNDARY, 0.15, 1),
    ):
        seg = np.concatenate(segs) if segs else np.zeros((0, 2, 2))
        boxes = np.concatenate([seg.min(1), seg.max(1)], axis=1) if len(seg) else np.zeros((0, 4))
        dash_groups.append((seg, boxes, colour, width, min_px))

    thick = centres if not rings else []
    return MapGeometry(fills=fills, fill_boxes=_boxes([f[0] for f in fills]), lines=lines,
                       line_boxes=_boxes([ln[0] for ln in lines]), dash_groups=dash_groups, thick_lanes=thick,
                       thick_boxes=_boxes(thick))


def _hits(boxes: np.ndarray, x0: float, y0: float, x1: float, y1: float, pad: float) -> np.ndarray:
    """Indices of boxes ``(K, 4)`` overlapping the rectangle grown by ``pad`` (m)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero((boxes[:, 0] <= x1 + pad) & (boxes[:, 2] >= x0 - pad) & (boxes[:, 1] <= y1 + pad)
                          & (boxes[:, 3] >= y0 - pad))


def _width_px(width_m: float, ppm: float, min_px: int) -> int:
    """Line width in (supersampled) pixels: scales with zoom, never thinner than ``min_px`` nor wider than 6."""
    return int(round(SUPERSAMPLE * min(6.0, max(float(min_px), width_m * ppm))))


def draw_tile(geom: MapGeometry, ppm: float, ix: int, iy: int) -> pygame.Surface:
    """Tile ``(ix, iy)`` at ``ppm`` px/m: world x in ``[ix, ix + 1) * TILE_PX / ppm``, y likewise (y up)."""
    size = TILE_PX * SUPERSAMPLE
    surf = pygame.Surface((size, size), depth=32)
    surf.fill(BACKGROUND)
    span = TILE_PX / ppm
    x0, y0 = ix * span, iy * span
    x1, y1 = x0 + span, y0 + span
    scale = ppm * SUPERSAMPLE

    def px(points: np.ndarray) -> list:
        return np.stack([(points[..., 0] - x0) * scale, (y1 - points[..., 1]) * scale], -1).tolist()

    pad = 2.0  # m: line widths reach past their geometry's bounding box
    if geom.thick_lanes:
        w = max(1, int(round(geom.lane_width * scale)))
        for i in _hits(geom.thick_boxes, x0, y0, x1, y1, geom.lane_width):
            pts = px(geom.thick_lanes[i])
            pygame.draw.lines(surf, ROAD, False, pts, w)
            for p in pts:  # round joints: wide pygame lines leave notches where segments meet
                pygame.draw.circle(surf, ROAD, p, w / 2)
    for i in _hits(geom.fill_boxes, x0, y0, x1, y1, pad):
        points, colour = geom.fills[i]
        pygame.draw.polygon(surf, colour, px(points))
    for segs, boxes, colour, width, min_px in geom.dash_groups:
        w = _width_px(width, ppm, min_px)
        for a, b in px(segs[_hits(boxes, x0, y0, x1, y1, pad)]):
            pygame.draw.line(surf, colour, a, b, w)
    for i in _hits(geom.line_boxes, x0, y0, x1, y1, pad):
        points, colour, width, min_px = geom.lines[i]
        pygame.draw.lines(surf, colour, False, px(points), _width_px(width, ppm, min_px))
    return pygame.transform.smoothscale(surf, (TILE_PX, TILE_PX)) if SUPERSAMPLE > 1 else surf


class MapLayerCache:
    """Prepared geometry per map id and drawn tiles per (map id, scale, tile index), least recently used out."""

    def __init__(self, max_tiles: int = MAX_TILES):
        self.max_tiles = max_tiles
        self._geometry: dict[str, MapGeometry] = {}
        self._tiles: OrderedDict = OrderedDict()
        self.tiles_drawn = 0  # for tests and benchmarks: how often a tile had to be drawn

    def geometry(self, map_data: MapData) -> MapGeometry:
        if map_data.map_id not in self._geometry:
            self._geometry[map_data.map_id] = prepare_map(map_data)
        return self._geometry[map_data.map_id]

    def tile(self, map_data: MapData, ppm: float, ix: int, iy: int) -> pygame.Surface:
        key = (map_data.map_id, round(ppm, 6), ix, iy)
        surf = self._tiles.get(key)
        if surf is None:
            surf = draw_tile(self.geometry(map_data), ppm, ix, iy)
            self.tiles_drawn += 1
            self._tiles[key] = surf
            if len(self._tiles) > self.max_tiles:
                self._tiles.popitem(last=False)
        else:
            self._tiles.move_to_end(key)
        return surf

    def blit_map(self, target: pygame.Surface, map_data: MapData, ppm: float, origin_px: tuple[int, int]) -> None:
        """Blit the map under a camera whose top-left pixel is world ``(ox / ppm, oy / ppm)``, y up."""
        ox, oy = origin_px
        w, h = target.get_size()
        # World pixel column u maps to frame column u - ox; world pixel row (counted upward) r to oy - r.
        for ix in range(ox // TILE_PX, (ox + w - 1) // TILE_PX + 1):
            for iy in range((oy - h + 1) // TILE_PX, oy // TILE_PX + 1):
                target.blit(self.tile(map_data, ppm, ix, iy), (ix * TILE_PX - ox, oy - (iy + 1) * TILE_PX))

    def clear(self) -> None:
        self._geometry.clear()
        self._tiles.clear()
