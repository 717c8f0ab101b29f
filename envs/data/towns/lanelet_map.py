"""SUMO network -> Lanelet2 map (OSM), built so that Lanelet2's routing graph sees the SUMO topology.

One lanelet per SUMO lane, internal junction lanes included. Bounds are the lane centre shape offset by
+-width/2 (left/right of the driving direction), densified to <= 2 m point spacing because trajdata's
lane KD-tree indexes raw polyline points. Two properties make Lanelet2 derive the graph:

- lanes side by side on one edge share the *same* boundary LineString object (left/right neighbours);
- successive lanes (lane -> internal lane(s) -> lane, along SUMO's connection list, not geometric
  snapping) share their boundary *end-point* Point objects (successors). Endpoints are unified with a
  union-find; a union that would collapse a lanelet's width to zero at one end (e.g. two lanes merging
  into one) or its length to zero is skipped and counted.

Coordinates: SUMO network frame in metres, written with ``UtmProjector(Origin(0, 0))`` as trajdata
reads it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import lanelet2
import numpy as np
import shapely
from lanelet2.core import AttributeMap, Lanelet, LaneletMap, LineString3d, Point3d

from envs.data.towns.sumo_tools import TownGenerationError, require_sumolib

MAX_POINT_SPACING_M = 2.0
"""Maximum distance between consecutive boundary points (m)."""

_MAX_MITER = 2.0  # cap on the offset stretch at sharp corners, avoids spikes in tight junction curves


@dataclass
class _Boundary:
    """A boundary polyline before conversion to Lanelet2 (driving direction of its lanelets)."""

    xy: np.ndarray  # (P, 2) metres
    attrs: dict[str, str]


@dataclass
class _LaneletDraft:
    lane_id: str
    left: int  # boundary index
    right: int
    internal: bool
    successors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MapReport:
    """Summary of a built map (the routing check of the written file is :func:`check_map`).

    Attributes:
        num_lanelets: lanelets written (one per car-drivable SUMO lane).
        num_internal_lanelets: of which junction-internal lanes.
        skipped_joins: SUMO connections whose endpoint sharing was refused as degenerate.
    """

    num_lanelets: int
    num_internal_lanelets: int
    skipped_joins: int


def densify(shape: np.ndarray, max_spacing: float = MAX_POINT_SPACING_M) -> np.ndarray:
    """Insert evenly spaced points so that no segment of ``shape`` (P, 2) is longer than ``max_spacing``."""
    out = [shape[0]]
    for a, b in zip(shape[:-1], shape[1:], strict=True):
        seg = float(np.hypot(*(b - a)))
        n = max(1, math.ceil(seg / max_spacing - 1e-9))
        for k in range(1, n + 1):
            out.append(a + (b - a) * (k / n))
    return np.asarray(out)


def offset_polyline(shape: np.ndarray, distance: float) -> np.ndarray:
    """Offset polyline ``shape`` (P, 2) by ``distance`` metres to its left (negative: right).

    Vertex normals are the mitred average of the adjacent segment normals, so a straight offset keeps
    a constant distance through bends; the miter is capped to avoid spikes at sharp corners.
    """
    d = np.diff(shape, axis=0)
    seg_len = np.hypot(d[:, 0], d[:, 1])
    u = d / seg_len[:, None]
    n_seg = np.stack([-u[:, 1], u[:, 0]], axis=1)  # left normal of each segment
    normals = np.empty_like(shape)
    normals[0], normals[-1] = n_seg[0], n_seg[-1]
    if len(shape) > 2:
        bis = n_seg[:-1] + n_seg[1:]
        bis_len = np.hypot(bis[:, 0], bis[:, 1])
        bis = np.where(bis_len[:, None] > 1e-9, bis / np.maximum(bis_len, 1e-9)[:, None], n_seg[1:])
        cos_half = np.sum(bis * n_seg[1:], axis=1)
        scale = np.minimum(1.0 / np.maximum(cos_half, 1e-9), _MAX_MITER)
        normals[1:-1] = bis * scale[:, None]
    return shape + distance * normals


def remove_folds(xy: np.ndarray) -> np.ndarray:
    """Drop interior points of polyline ``xy`` (P, 2) where it turns back by more than 90 degrees.

    Offsetting a bend towards its inside by more than the local radius, or moving an endpoint onto
    a shared junction point, can fold the polyline back on itself; Lanelet2's loader would then read
    the bound as reversed (its orientation test looks at the nearest segment). Endpoints are kept.
    """
    pts = [p for p in xy]
    changed = True
    while changed and len(pts) > 2:
        changed = False
        for i in range(1, len(pts) - 1):
            a, b = pts[i] - pts[i - 1], pts[i + 1] - pts[i]
            if float(a @ b) <= 0.0:
                del pts[i]
                changed = True
                break
    return np.asarray(pts)


def _clean_shape(shape: list[tuple[float, float]]) -> np.ndarray:
    """Lane shape as (P, 2) without repeated points; at least two points."""
    pts = np.asarray(shape, dtype=np.float64)[:, :2]
    keep = np.concatenate([[True], np.hypot(*np.diff(pts, axis=0).T) > 1e-6])
    pts = pts[keep]
    if len(pts) < 2:
        raise TownGenerationError(f"Degenerate SUMO lane shape {shape}.")
    return pts


def _parallel(a: np.ndarray, b: np.ndarray, tol_m: float = 0.3) -> bool:
    """Whether polylines ``a`` and ``b`` (P, 2) lie within ``tol_m`` of each other (Hausdorff)."""
    return bool(shapely.hausdorff_distance(shapely.LineString(a), shapely.LineString(b)) <= tol_m)


def build_drafts(net_path: Path) -> tuple[list[_Boundary], list[_LaneletDraft], dict[str, int]]:
    """Read a SUMO net and lay out boundaries and lanelets (no endpoint joining yet).

    Returns boundaries, lanelet drafts (normal edges first, then internal, each in file order) and a
    map from SUMO lane id to lanelet index.
    """
    sumolib = require_sumolib()
    net = sumolib.net.readNet(str(net_path), withInternal=True)
    edges = [e for e in net.getEdges(withInternal=True) if e.getFunction() in ("", "normal", "internal")]
    # Normal edges first: union-find roots are the lowest slot, so road geometry (not the junction
    # interior) decides where shared endpoints sit.
    edges.sort(key=lambda e: e.getFunction() == "internal")
    boundaries: list[_Boundary] = []
    drafts: list[_LaneletDraft] = []
    lane_index: dict[str, int] = {}
    for edge in edges:
        internal = edge.getFunction() == "internal"
        lanes = [ln for ln in edge.getLanes() if ln.allows("passenger")]
        if not lanes:
            continue
        two_way = (not internal) and any(
            o.getToNode() == edge.getFromNode() for o in edge.getToNode().getOutgoing()
        )
        virtual = {"type": "virtual"}
        prev_left: int | None = None
        for k, lane in enumerate(lanes):  # index 0 is the rightmost lane
            centre = densify(_clean_shape(lane.getShape()))
            half = lane.getWidth() / 2.0
            right_xy = offset_polyline(centre, -half)
            if prev_left is not None and (not internal or _parallel(boundaries[prev_left].xy, right_xy)):
                right = prev_left  # same object as the left bound of the lane to the right
            else:
                # Lanes of a junction-internal edge can fan out (one lane feeding two); only lanes
                # that really run side by side share a boundary.
                right_attrs = virtual if internal else {"type": "road_border"}
                boundaries.append(_Boundary(right_xy, right_attrs))
                right = len(boundaries) - 1
            if internal:
                left_attrs = virtual
            elif k < len(lanes) - 1:
                left_attrs = {"type": "line_thin", "subtype": "dashed"}
            elif two_way:
                left_attrs = {"type": "line_thin", "subtype": "solid"}
            else:
                left_attrs = {"type": "road_border"}
            boundaries.append(_Boundary(offset_polyline(centre, half), left_attrs))
            left = len(boundaries) - 1
            prev_left = left
            draft = _LaneletDraft(lane.getID(), left, right, internal)
            for conn in lane.getOutgoing():
                via = conn.getViaLaneID()
                draft.successors.append(via if via else conn.getToLane().getID())
            lane_index[lane.getID()] = len(drafts)
            drafts.append(draft)
    return boundaries, drafts, lane_index


class _EndpointJoiner:
    """Union-find over boundary end slots (slot = 2 * boundary + end, end 0 = start, 1 = end)."""

    def __init__(self, num_boundaries: int, drafts: list[_LaneletDraft]):
        self.parent = list(range(2 * num_boundaries))
        self.members: dict[int, set[int]] = {s: {s} for s in self.parent}
        # For each slot, the (lanelet, end, side) uses, to refuse width- or length-collapsing unions.
        self.uses: dict[int, list[tuple[int, int, str]]] = {s: [] for s in self.parent}
        for i, d in enumerate(drafts):
            for end in (0, 1):
                self.uses[2 * d.left + end].append((i, end, "L"))
                self.uses[2 * d.right + end].append((i, end, "R"))

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def _ok(self, merged: set[int]) -> bool:
        seen_sides: dict[tuple[int, int], str] = {}
        seen_bounds: dict[int, int] = {}
        for slot in merged:
            b, end = divmod(slot, 2)
            if seen_bounds.setdefault(b, end) != end:
                return False  # both ends of one polyline in one point: zero length
            for ll, ll_end, side in self.uses[slot]:
                if seen_sides.setdefault((ll, ll_end), side) != side:
                    return False  # left and right bound meet: zero width
        return True

    def join_pairs(self, pairs: list[tuple[int, int]]) -> bool:
        """Unify every (slot_a, slot_b) pair, all or none; False when that would degenerate a lanelet."""
        # Merge groups connected by the pairs into tentative unions and check them.
        groups: list[set[int]] = []
        for a, b in pairs:
            ra, rb = self.find(a), self.find(b)
            hit = [g for g in groups if ra in g or rb in g]
            new = {ra, rb}.union(*hit)
            groups = [g for g in groups if g not in hit] + [new]
        for g in groups:
            if not self._ok(set().union(*(self.members[r] for r in g))):
                return False
        for g in groups:
            root = min(g)
            for r in g:
                if r != root:
                    self.parent[r] = root
                    self.members[root] |= self.members.pop(r)
        return True


def build_lanelet_map(net_path: Path, osm_path: Path) -> MapReport:
    """Convert the SUMO network at ``net_path`` into a Lanelet2 OSM map at ``osm_path``."""
    boundaries, drafts, lane_index = build_drafts(net_path)
    joiner = _EndpointJoiner(len(boundaries), drafts)
    skipped = 0
    for d in drafts:
        for succ_id in d.successors:
            if succ_id not in lane_index:
                continue  # successor lane not drivable by cars
            s = drafts[lane_index[succ_id]]
            ok = joiner.join_pairs([(2 * d.left + 1, 2 * s.left), (2 * d.right + 1, 2 * s.right)])
            skipped += not ok

    # Ids: shared endpoints first, then interior points, line strings and lanelets, in a fixed order.
    next_id = 1
    group_point: dict[int, Point3d] = {}
    for slot in range(2 * len(boundaries)):
        root = joiner.find(slot)
        if root not in group_point:
            b, end = divmod(root, 2)
            x, y = boundaries[b].xy[-1 if end else 0]
            group_point[root] = Point3d(next_id, float(x), float(y), 0.0)
            next_id += 1
    linestrings = []
    for b, bd in enumerate(boundaries):
        start, end = group_point[joiner.find(2 * b)], group_point[joiner.find(2 * b + 1)]
        xy = np.concatenate([[[start.x, start.y]], bd.xy[1:-1], [[end.x, end.y]]])
        pts = [start]
        # Densify again: the outer side of a bend is longer than the centre line it was offset from.
        for x, y in densify(remove_folds(xy))[1:-1]:
            pts.append(Point3d(next_id, float(x), float(y), 0.0))
            next_id += 1
        pts.append(end)
        linestrings.append(pts)
    ls_objs = []
    for b, pts in enumerate(linestrings):
        ls_objs.append(LineString3d(next_id, pts, AttributeMap(boundaries[b].attrs)))
        next_id += 1
    lmap = LaneletMap()
    for d in drafts:
        attrs = {
            "type": "lanelet", "subtype": "road", "location": "urban", "one_way": "yes",
            "sumo_lane_id": d.lane_id,
        }
        lmap.add(Lanelet(next_id, ls_objs[d.left], ls_objs[d.right], AttributeMap(attrs)))
        next_id += 1
    osm_path.parent.mkdir(parents=True, exist_ok=True)
    lanelet2.io.write(str(osm_path), lmap, lanelet2.projection.UtmProjector(lanelet2.io.Origin(0.0, 0.0)))
    return MapReport(
        num_lanelets=len(drafts),
        num_internal_lanelets=sum(d.internal for d in drafts),
        skipped_joins=skipped,
    )


def load_lanelet_map(osm_path: Path):
    """Load an OSM map exactly as trajdata does; returns (LaneletMap, RoutingGraph)."""
    projector = lanelet2.projection.UtmProjector(lanelet2.io.Origin(0.0, 0.0))
    lmap = lanelet2.io.load(str(osm_path), projector)
    rules = lanelet2.traffic_rules.create(
        lanelet2.traffic_rules.Locations.Germany, lanelet2.traffic_rules.Participants.Vehicle
    )
    return lmap, lanelet2.routing.RoutingGraph(lmap, rules)


def lanelets_without_successor(osm_path: Path) -> list[str]:
    """SUMO lane ids of lanelets with no routing-graph successor (only fringe lanes should be listed)."""
    lmap, graph = load_lanelet_map(osm_path)
    return sorted(ll.attributes["sumo_lane_id"] for ll in lmap.laneletLayer if not graph.following(ll))


def lanelet_polygons(osm_path: Path) -> list[np.ndarray]:
    """Each lanelet's outline (P, 2) in metres: left bound, then the right bound reversed."""
    lmap, _ = load_lanelet_map(osm_path)
    polys = []
    for ll in sorted(lmap.laneletLayer, key=lambda ll: ll.id):
        left = [(p.x, p.y) for p in ll.leftBound]
        right = [(p.x, p.y) for p in ll.rightBound]
        polys.append(np.asarray(left + right[::-1]))
    return polys


def fraction_inside(polygons: list[np.ndarray], xy: np.ndarray) -> float:
    """Fraction of points ``xy`` (K, 2) in metres lying inside at least one polygon (boundary counts)."""
    if len(xy) == 0:
        return 1.0
    tree = shapely.STRtree([shapely.Polygon(p).buffer(0) for p in polygons])
    pts = shapely.points(xy)
    hits = tree.query(pts, predicate="intersects")
    inside = np.zeros(len(xy), dtype=bool)
    inside[hits[0]] = True
    return float(inside.mean())


def check_map(osm_path: Path, net_path: Path) -> dict:
    """Topology check of a written map against its SUMO network, loaded the way trajdata loads it.

    Returns a dict with ``lanelets`` (count), ``without_successor`` (SUMO lane ids of lanelets with no
    routing-graph successor), ``non_fringe_without_successor`` (those whose SUMO lane does have an
    outgoing connection, which should never happen), ``missing_connections`` (SUMO connections not
    present as routing-graph successors) and ``inverted_bounds`` (bounds the loader had to flip).
    """
    sumolib = require_sumolib()
    net = sumolib.net.readNet(str(net_path), withInternal=True)
    lmap, graph = load_lanelet_map(osm_path)
    by_lane = {ll.attributes["sumo_lane_id"]: ll for ll in lmap.laneletLayer}
    without, non_fringe, missing, inverted = [], [], 0, 0
    for lane_id in sorted(by_lane):
        ll = by_lane[lane_id]
        inverted += int(ll.leftBound.inverted()) + int(ll.rightBound.inverted())
        following = {f.attributes["sumo_lane_id"] for f in graph.following(ll)}
        expected = {c.getViaLaneID() or c.getToLane().getID() for c in net.getLane(lane_id).getOutgoing()}
        expected &= set(by_lane)
        missing += len(expected - following)
        if not following:
            without.append(lane_id)
            if expected:
                non_fringe.append(lane_id)
    return {
        "lanelets": len(by_lane),
        "without_successor": without,
        "non_fringe_without_successor": non_fringe,
        "missing_connections": missing,
        "inverted_bounds": inverted,
    }
