"""The four SUMO road networks of the towns dataset, each built deterministically from a fixed config.

A town's network is part of its identity (its location id and Lanelet2 map), so it does not depend on
the dataset seed: only the traffic does. All junctions are unsignalised (priority or roundabout) because
the INTERACTION format has no traffic-light channel, and U-turns are disabled (``--no-turnarounds``)
because turnaround lanes lose their successors in the Lanelet2 conversion.

Coordinates are SUMO network coordinates in metres (x east, y north), normalised by SUMO so that the
network's bounding box starts at (0, 0); FCD positions use the same frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from envs.data.towns.sumo_tools import require_sumolib, run_tool

# Options shared by every network: unsignalised priority junctions, no U-turns, smooth junction
# corners (5 points per turn curve), 50 km/h default speed.
_COMMON_NET_ARGS: tuple[str, ...] = (
    "--no-turnarounds",
    "--default.junctions.type", "priority",
    "--junctions.corner-detail", "5",
    "--default.junctions.radius", "8",
    "--default.speed", "13.89",
)


@dataclass(frozen=True)
class TownSpec:
    """Static description of one town.

    Attributes:
        name: location id as written after ``DR_`` in file names (three underscore-separated tokens).
        kind: network builder, one of ``grid``, ``spider``, ``random``, ``roundabout``.
        demand_veh_per_s: mean rate of the Poisson vehicle arrivals across all fringe entries (1/s).
        net_seed: seed of the network generator (only the random town uses it).
    """

    name: str
    kind: str
    demand_veh_per_s: float
    net_seed: int = 0

    def __post_init__(self) -> None:
        tokens = self.name.split("_")
        if len(tokens) != 3 or tokens[0] != "USA":
            raise ValueError(f"Town name {self.name!r} must be 'USA_<A>_<B>' (three tokens, no extra '_').")
        if self.kind not in _BUILDERS:
            raise ValueError(f"Unknown network kind {self.kind!r}; expected one of {sorted(_BUILDERS)}.")
        if not self.demand_veh_per_s > 0:
            raise ValueError(f"demand_veh_per_s must be > 0, got {self.demand_veh_per_s}.")


def build_network(spec: TownSpec, workdir: Path) -> Path:
    """Build the SUMO network of ``spec`` inside ``workdir``; returns the ``.net.xml`` path."""
    workdir.mkdir(parents=True, exist_ok=True)
    net_path = workdir / f"{spec.name}.net.xml"
    _BUILDERS[spec.kind](spec, workdir, net_path)
    return net_path


def _build_grid(spec: TownSpec, workdir: Path, net_path: Path) -> None:
    # 4 x 4 junctions 100 m apart with 60 m stubs to the border: 420 m x 420 m, two lanes each way.
    run_tool("netgenerate", [
        "--grid", "--grid.number", "4", "--grid.length", "100", "--grid.attach-length", "60",
        "--default.lanenumber", "2", *_COMMON_NET_ARGS, "--seed", str(spec.net_seed),
        "--output-file", str(net_path),
    ], cwd=workdir)


def _build_spider(spec: TownSpec, workdir: Path, net_path: Path) -> None:
    # Built from plain XML because netgenerate's --spider.attach-length leaves 0.2 m stubs: vehicles
    # would enter with their body outside the map.
    nodes, edges = _spider_plain_xml()
    _netconvert_plain(spec, workdir, net_path, nodes, edges)


def _spider_plain_xml() -> tuple[str, str]:
    """Six radial arms at 60 degree steps crossing three rings 65 m apart (no centre node), plus 50 m
    single-lane stubs to the border: about 490 m across. Every road is one lane each way."""
    arms, rings, spacing, stub = 6, 3, 65.0, 50.0

    def polar(radius: float, k: int) -> tuple[float, float]:
        ang = math.radians(60.0 * k)
        return radius * math.cos(ang), radius * math.sin(ang)

    nodes = {f"A{k}R{r}": polar(spacing * r, k) for k in range(arms) for r in range(1, rings + 1)}
    nodes.update({f"A{k}End": polar(spacing * rings + stub, k) for k in range(arms)})
    roads = []
    for k in range(arms):
        for r in range(1, rings):
            roads.append((f"A{k}R{r}", f"A{k}R{r + 1}"))
        roads.append((f"A{k}R{rings}", f"A{k}End"))
        for r in range(1, rings + 1):
            roads.append((f"A{k}R{r}", f"A{(k + 1) % arms}R{r}"))
    lines = []
    for a, b in roads:
        for frm, to in ((a, b), (b, a)):
            lines.append(f'    <edge id="{frm}_{to}" from="{frm}" to="{to}" numLanes="1" speed="13.89" priority="2"/>')
    return _nodes_xml(nodes), "<edges>\n" + "\n".join(lines) + "\n</edges>\n"


def _nodes_xml(nodes: dict[str, tuple[float, float]]) -> str:
    lines = [f'    <node id="{k}" x="{x:.3f}" y="{y:.3f}"/>' for k, (x, y) in nodes.items()]
    return "<nodes>\n" + "\n".join(lines) + "\n</nodes>\n"


def _netconvert_plain(spec: TownSpec, workdir: Path, net_path: Path, nodes: str, edges: str,
                      extra: tuple[str, ...] = ()) -> None:
    nod_path = workdir / f"{spec.name}.nod.xml"
    edg_path = workdir / f"{spec.name}.edg.xml"
    nod_path.write_text(nodes)
    edg_path.write_text(edges)
    run_tool("netconvert", [
        "--node-files", str(nod_path), "--edge-files", str(edg_path), *_COMMON_NET_ARGS, *extra,
        "--output-file", str(net_path),
    ], cwd=workdir)


def _build_random(spec: TownSpec, workdir: Path, net_path: Path) -> None:
    raw_path = workdir / f"{spec.name}.raw.net.xml"
    run_tool("netgenerate", [
        "--rand", "--rand.iterations", "45", "--rand.max-distance", "95", "--rand.min-distance", "45",
        "--rand.min-angle", "50", "--rand.neighbor-dist1", "0", "--rand.neighbor-dist2", "1",
        "--rand.neighbor-dist3", "4", "--rand.neighbor-dist4", "3",
        "--default.lanenumber", "1", *_COMMON_NET_ARGS, "--seed", str(spec.net_seed),
        "--output-file", str(raw_path),
    ], cwd=workdir)
    # Dead ends inside the town would make vehicles appear and vanish mid-map (and leave lanelets
    # without successors away from the border), so cul-de-sacs not on the outer hull are pruned.
    removed = interior_dead_end_edges(raw_path, border_margin_m=15.0)
    args = ["--sumo-net-file", str(raw_path), *_COMMON_NET_ARGS, "--geometry.remove", "--output-file", str(net_path)]
    if removed:
        args += ["--remove-edges.explicit", ",".join(removed)]
    run_tool("netconvert", args, cwd=workdir)


def interior_dead_end_edges(net_path: Path, border_margin_m: float) -> list[str]:
    """Edges to remove so that every dead-end node lies within ``border_margin_m`` of the convex hull.

    Removal is iterated (pruning a cul-de-sac can leave its parent road dead-ended). Returns sorted
    edge ids so the result is deterministic.
    """
    import shapely  # generation only; keeps `import envs.data.towns` light

    sumolib = require_sumolib()
    net = sumolib.net.readNet(str(net_path))
    coords = {n.getID(): n.getCoord() for n in net.getNodes()}
    hull = shapely.MultiPoint(list(coords.values())).convex_hull.exterior
    edges = {e.getID(): (e.getFromNode().getID(), e.getToNode().getID()) for e in net.getEdges()}
    removed: set[str] = set()
    while True:
        neighbours: dict[str, set[str]] = {n: set() for n in coords}
        for eid, (a, b) in edges.items():
            if eid not in removed:
                neighbours[a].add(b)
                neighbours[b].add(a)
        doomed = sorted(
            n for n, nb in neighbours.items()
            if len(nb) == 1 and hull.distance(shapely.Point(coords[n])) > border_margin_m
        )
        if not doomed:
            return sorted(removed)
        for eid, (a, b) in edges.items():
            if a in doomed or b in doomed:
                removed.add(eid)


def _build_roundabout(spec: TownSpec, workdir: Path, net_path: Path) -> None:
    nodes, edges = _roundabout_plain_xml()
    _netconvert_plain(spec, workdir, net_path, nodes, edges, extra=("--roundabouts.guess", "true"))


def _roundabout_plain_xml() -> tuple[str, str]:
    """Plain-XML nodes and edges of the roundabout town (metres, centre of the ring at the origin).

    Layout: a two-lane ring of 24 m radius; an east-west arterial (two lanes each way, 50 km/h) with a
    T-junction on each side (a side street north on the east, south on the west); single-lane north
    and south arms. About 460 m x 400 m.
    """
    radius = 24.0
    ring = {"RE": 0.0, "RN": 90.0, "RW": 180.0, "RS": 270.0}
    nodes = {
        **{k: (radius * math.cos(math.radians(a)), radius * math.sin(math.radians(a))) for k, a in ring.items()},
        "WEnd": (-230.0, 0.0), "WT": (-115.0, 0.0), "WSide": (-115.0, -190.0),
        "EEnd": (230.0, 0.0), "ET": (115.0, 0.0), "ESide": (115.0, 190.0),
        "NEnd": (0.0, 200.0), "SEnd": (0.0, -200.0),
    }
    # (id, from, to, lanes, speed m/s, priority); each road is two one-way edges.
    roads = [
        ("W1", "WEnd", "WT", 2, 13.89, 3), ("W2", "WT", "RW", 2, 13.89, 3),
        ("E1", "EEnd", "ET", 2, 13.89, 3), ("E2", "ET", "RE", 2, 13.89, 3),
        ("WS", "WSide", "WT", 1, 11.11, 1), ("ES", "ESide", "ET", 1, 11.11, 1),
        ("N", "NEnd", "RN", 1, 13.89, 2), ("S", "SEnd", "RS", 1, 13.89, 2),
    ]
    edge_lines = []
    for rid, a, b, lanes, speed, prio in roads:
        for suffix, frm, to in (("in", a, b), ("out", b, a)):
            edge_lines.append(
                f'    <edge id="{rid}{suffix}" from="{frm}" to="{to}" numLanes="{lanes}" speed="{speed}" '
                f'priority="{prio}"/>'
            )
    # Counter-clockwise ring (right-hand traffic), arcs sampled every 10 degrees.
    ring_ids = ["RE", "RN", "RW", "RS"]
    ring_edges = []
    for i, a in enumerate(ring_ids):
        b = ring_ids[(i + 1) % 4]
        a0 = ring[a]
        pts = []
        for k in range(1, 9):  # interior points; netconvert adds the node positions
            ang = math.radians(a0 + 90.0 * k / 9.0)
            pts.append(f"{radius * math.cos(ang):.3f},{radius * math.sin(ang):.3f}")
        eid = f"Ring{a}{b}"
        ring_edges.append(eid)
        edge_lines.append(
            f'    <edge id="{eid}" from="{a}" to="{b}" numLanes="2" speed="8.33" priority="4" '
            f'shape="{" ".join(pts)}"/>'
        )
    nod = _nodes_xml(nodes)
    edg = (
        "<edges>\n" + "\n".join(edge_lines)
        + f'\n    <roundabout nodes="{" ".join(ring_ids)}" edges="{" ".join(ring_edges)}"/>\n</edges>\n'
    )
    return nod, edg


_BUILDERS = {
    "grid": _build_grid,
    "spider": _build_spider,
    "random": _build_random,
    "roundabout": _build_roundabout,
}
