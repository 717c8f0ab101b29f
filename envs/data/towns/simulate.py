"""Seeded traffic for one town: fringe-to-fringe trips, one SUMO run, FCD parsed into integer tracks.

Frames and units: SUMO runs at 0.1 s steps; frame ``f`` of a recording is simulation time
``warmup_s + f * 0.1``. Track values are stored as fixed-point integers so that every later step
(windowing, CSV text, packing) is exact: positions in mm (SUMO network frame, x east, y north), velocities
in mm/s, heading in mrad (counter-clockwise from +x, in [-3141, 3141] so the 3-decimal text lies in
(-pi, pi]), vehicle length and width in mm (taken from the vType: FCD cannot output them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from envs.data.towns.networks import TownSpec
from envs.data.towns.sumo_tools import TownGenerationError, require_sumolib, run_tool

STEP_S = 0.1
"""Simulation step and dataset frame period (s)."""

LANE_CHANGE_DURATION_S = 3.0
"""Duration of a lane change (s); > 0 so vehicles move laterally over time instead of jumping a lane."""


@dataclass(frozen=True)
class VehicleType:
    """A SUMO vType; its size is the box written to the CSV (FCD has no length/width)."""

    id: str
    vclass: str
    length_m: float
    width_m: float
    probability: float


# A plausible urban mix: most vehicles are cars of three sizes, then vans, trucks and buses.
VEHICLE_TYPES: tuple[VehicleType, ...] = (
    VehicleType("car_small", "passenger", 4.10, 1.75, 0.25),
    VehicleType("car", "passenger", 4.60, 1.85, 0.33),
    VehicleType("car_large", "passenger", 5.00, 1.95, 0.18),
    VehicleType("van", "delivery", 5.60, 2.05, 0.12),
    VehicleType("truck", "truck", 8.50, 2.50, 0.07),
    VehicleType("bus", "bus", 12.00, 2.55, 0.05),
)


@dataclass(frozen=True)
class RunTracks:
    """All vehicle tracks of one recorded SUMO run, as fixed-point integers (see module docstring).

    Tracks are ordered by first frame, then by departure order, and each is contiguous in time
    (SUMO vehicles exist from insertion to arrival; teleports are disabled).

    Attributes:
        num_frames: number of recorded frames F.
        first_frame: (N,) int64, first recorded frame of each track.
        num_track_frames: (N,) int64, frames per track (>= 1).
        length_mm, width_mm: (N,) int64 vehicle box size.
        values: (R, 5) int64, rows of all tracks concatenated (track-major, then time):
            x_mm, y_mm (box centre), vx_mmps, vy_mmps, psi_mrad.
    """

    num_frames: int
    first_frame: np.ndarray
    num_track_frames: np.ndarray
    length_mm: np.ndarray
    width_mm: np.ndarray
    values: np.ndarray

    @property
    def num_tracks(self) -> int:
        return int(self.first_frame.shape[0])

    @property
    def offsets(self) -> np.ndarray:
        """(N + 1,) int64 row offsets of each track in ``values``."""
        return np.concatenate([[0], np.cumsum(self.num_track_frames)]).astype(np.int64)


def fringe_routes(net_path: Path) -> list[list[str]]:
    """Shortest routes (edge id lists) between every reachable (source, sink) pair of fringe edges.

    Sources are edges without incoming connections and sinks edges without outgoing ones; every such
    edge starts or ends at the network border (interior cul-de-sacs are pruned when the network is
    built), so vehicles appear and disappear at the map edge. Sorted, so the list is deterministic.
    """
    sumolib = require_sumolib()
    net = sumolib.net.readNet(str(net_path))
    edges = sorted(net.getEdges(), key=lambda e: e.getID())
    sources = [e for e in edges if not e.getIncoming() and e.allows("passenger")]
    sinks = [e for e in edges if not e.getOutgoing() and e.allows("passenger")]
    routes = []
    for src in sources:
        for dst in sinks:
            path, _cost = net.getShortestPath(src, dst)
            if path is not None and len(path) >= 2:
                routes.append([e.getID() for e in path])
    if not routes:
        raise TownGenerationError(f"Network {net_path} has no route between fringe edges.")
    return routes


def write_routes(path: Path, routes: list[list[str]], rng: np.random.Generator, demand_veh_per_s: float,
                 end_s: float) -> int:
    """Write a SUMO routes file of Poisson arrivals over ``[0, end_s)``; returns the vehicle count.

    Each vehicle draws a uniform random fringe route and a vType from :data:`VEHICLE_TYPES`; it enters
    at the start of its first lane (``departPos="base"``) at the highest safe speed, so it does not
    start from standstill at the border.
    """
    probs = np.array([t.probability for t in VEHICLE_TYPES])
    probs = probs / probs.sum()
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<routes>"]
    for t in VEHICLE_TYPES:
        # speedFactor spread gives drivers different desired speeds (SUMO draws it from --seed).
        lines.append(
            f'    <vType id="{t.id}" vClass="{t.vclass}" length="{t.length_m:.2f}" width="{t.width_m:.2f}" '
            f'speedFactor="normc(1.0,0.1,0.7,1.3)"/>'
        )
    t_s = 0.0
    count = 0
    while True:
        t_s += float(rng.exponential(1.0 / demand_veh_per_s))
        depart = round(t_s, 1)
        if depart >= end_s:
            break
        route = routes[int(rng.integers(len(routes)))]
        vtype = VEHICLE_TYPES[int(rng.choice(len(VEHICLE_TYPES), p=probs))]
        lines.append(
            f'    <vehicle id="{count}" type="{vtype.id}" depart="{depart:.1f}" departLane="best" '
            f'departPos="base" departSpeed="max"><route edges="{" ".join(route)}"/></vehicle>'
        )
        count += 1
    lines.append("</routes>")
    path.write_text("\n".join(lines) + "\n")
    return count


def run_sumo(net_path: Path, routes_path: Path, fcd_path: Path, sumo_seed: int, end_s: float) -> None:
    """Simulate ``[0, end_s)`` at 0.1 s and write FCD (front-bumper x, y, compass angle, speed) as CSV."""
    run_tool("sumo", [
        "--net-file", str(net_path), "--route-files", str(routes_path),
        "--begin", "0", "--end", f"{end_s:.1f}", "--step-length", f"{STEP_S}",
        "--seed", str(sumo_seed),
        # Vehicles must never vanish or jump: no teleports (jams just wait), collisions only logged.
        "--time-to-teleport", "-1", "--collision.action", "warn",
        "--lanechange.duration", f"{LANE_CHANGE_DURATION_S}",
        "--fcd-output", str(fcd_path), "--fcd-output.attributes", "id,x,y,angle,speed,type",
        "--precision", "4",
        "--no-step-log", "--no-warnings", "--duration-log.disable", "--xml-validation", "never",
    ], cwd=fcd_path.parent)


def sumo_heading(angle_deg: np.ndarray) -> np.ndarray:
    """SUMO angle (degrees clockwise from north) -> heading (rad, counter-clockwise from +x, in (-pi, pi])."""
    heading = math.pi / 2 - np.radians(angle_deg)
    return math.pi - np.mod(math.pi - heading, 2 * math.pi)


PURSUIT_SUBSTEPS = 8
"""Sub-steps per 0.1 s frame of the no-slip pursuit in :func:`front_path_to_box` (front interpolated linearly)."""


def front_path_to_box(front_x: np.ndarray, front_y: np.ndarray, track_start: np.ndarray,
                      initial_heading: np.ndarray, first_speed: np.ndarray, length: np.ndarray,
                      dt: float = STEP_S, substeps: int = PURSUIT_SUBSTEPS) -> tuple[np.ndarray, ...]:
    """Kinematically consistent box states from front-bumper paths: the centre is towed by the front.

    SUMO's FCD angle is the chord from the vehicle's back to its front position along its lanes (with
    SUMO 1.28 it agrees with "both bumpers on the driven path" to < 0.05 rad). Where a lane shape has a
    kink (a road bending inside a junction, a short junction-internal lane) the front path turns within
    one step, and a box derived from that chord slides sideways: its centre moves along the bisector of
    the two directions, not along the heading. Here the box obeys a no-slip constraint instead: the
    centre is a trailer axle towed by the front bumper at the fixed distance ``L / 2``, i.e. it moves
    towards the front at each instant (a tractrix), so its velocity always points along the heading::

        centre  <- front - (L/2) * unit(front - centre)   (per sub-step, front interpolated linearly)
        heading = direction centre -> front                (the box front stays on the front bumper)
        speed   = |centre(t) - centre(t-1)| / dt           (first row of a track: SUMO's speed)
        vx, vy  = speed * (cos heading, sin heading)

    Each track starts (its insertion, not a recording window) with the centre ``L / 2`` behind the front
    along ``initial_heading``. The speed is the backward difference because that is SUMO's own update (a
    position moves by ``speed(t) * dt`` from ``t - 1`` to ``t``), so ``centre(t) - centre(t-1)`` equals
    ``dt * (vx, vy)(t)`` up to the heading change within the step. A stopped front leaves the box where
    it is (heading kept). SUMO never reverses (speeds are >= 0, checked by :func:`parse_fcd`). This is
    the reference point of ``envs.dynamics.InvertibleBicycle`` (the centre moves along the heading).

    Args:
        front_x, front_y: (R,) front-bumper positions (m), rows grouped by track, in time order.
        track_start: (R,) bool, True at the first row of each track.
        initial_heading: (R,) heading (rad); read at track starts only.
        first_speed: (R,) speed (m/s); read at track starts only.
        length: (R,) vehicle length (m), constant along a track.
        dt: time step (s).
        substeps: pursuit sub-steps per row (>= 1).

    Returns:
        x, y (m, box centre), vx, vy (m/s), heading (rad, counter-clockwise from +x, in (-pi, pi]).
    """
    front_x = np.asarray(front_x, dtype=np.float64)
    front_y = np.asarray(front_y, dtype=np.float64)
    track_start = np.asarray(track_start, dtype=bool)
    n = len(front_x)
    if n == 0:
        empty = np.zeros(0)
        return empty, empty, empty, empty, empty
    if not track_start[0]:
        raise ValueError("The first row must start a track.")
    half = 0.5 * np.asarray(length, dtype=np.float64)
    first = np.flatnonzero(track_start)
    k = np.arange(n) - first[np.cumsum(track_start) - 1]  # row index within its track
    h0 = np.asarray(initial_heading, dtype=np.float64)
    cx = front_x - half * np.cos(h0)  # valid at track starts; later rows are overwritten below
    cy = front_y - half * np.sin(h0)
    # Time-major sweep, vectorised over the tracks that are this many rows old.
    order = np.argsort(k, kind="stable")
    bounds = np.searchsorted(k[order], np.arange(int(k.max()) + 2))
    for age in range(1, int(k.max()) + 1):
        rows = order[bounds[age]:bounds[age + 1]]
        px, py = cx[rows - 1], cy[rows - 1]
        ax, ay = front_x[rows - 1], front_y[rows - 1]
        bx, by = front_x[rows], front_y[rows]
        d = half[rows]
        for i in range(1, substeps + 1):
            w = i / substeps
            fx, fy = ax + w * (bx - ax), ay + w * (by - ay)
            ex, ey = fx - px, fy - py
            norm = np.hypot(ex, ey)  # = d unless the front moved; never 0 (the front is d ahead)
            px, py = fx - d * ex / norm, fy - d * ey / norm
        cx[rows], cy[rows] = px, py

    heading = np.arctan2(front_y - cy, front_x - cx)
    speed = np.concatenate([[0.0], np.hypot(np.diff(cx), np.diff(cy))]) / dt
    speed = np.where(track_start, np.asarray(first_speed, dtype=np.float64), speed)
    return cx, cy, speed * np.cos(heading), speed * np.sin(heading), heading


def parse_fcd(fcd_path: Path, warmup_s: float, num_frames: int) -> RunTracks:
    """Read a SUMO FCD CSV and keep frames ``[0, num_frames)`` after ``warmup_s`` as :class:`RunTracks`.

    Boxes are reconstructed by :func:`front_path_to_box` on each vehicle's whole track (from insertion,
    warm-up included) before frames are cut, so a box does not depend on where the recording starts.
    """
    import pandas as pd  # generation only; keeps `import envs.data.towns` light

    value_cols = ["vehicle_x", "vehicle_y", "vehicle_angle", "vehicle_speed"]
    # Everything is read as text: times and values are parsed exactly below, so the result does not
    # depend on the float parser of the installed pandas version.
    df = pd.read_csv(fcd_path, sep=";", dtype=str, keep_default_na=False)
    df = df[df["vehicle_id"] != ""]
    t_parts = df["timestep_time"].str.split(".", n=1, expand=True)
    frame = t_parts[0].astype(np.int64).to_numpy() * 10 + t_parts[1].str[0].astype(np.int64).to_numpy()
    frame = frame - round(warmup_s / STEP_S)
    fixed = {c: _parse_fixed4(df[c], fcd_path) for c in value_cols}
    vid = df["vehicle_id"].astype(np.int64).to_numpy()
    sizes = {t.id: (round(t.length_m * 1000), round(t.width_m * 1000)) for t in VEHICLE_TYPES}
    types = df["vehicle_type"].to_numpy()
    unknown = set(np.unique(types)) - set(sizes)
    if unknown:
        raise TownGenerationError(f"FCD {fcd_path} has unknown vehicle types {sorted(unknown)}.")
    length_mm = np.array([sizes[t][0] for t in types], dtype=np.int64)
    width_mm = np.array([sizes[t][1] for t in types], dtype=np.int64)

    # Whole tracks (insertion to arrival), grouped by vehicle, in time order.
    order = np.lexsort((frame, vid))
    vid, frame, length_mm, width_mm = vid[order], frame[order], length_mm[order], width_mm[order]
    fixed = {c: v[order] for c, v in fixed.items()}
    track_start = np.concatenate([[True], vid[1:] != vid[:-1]]) if len(vid) else np.zeros(0, dtype=bool)
    if np.any(np.diff(frame)[~track_start[1:]] != 1):
        raise TownGenerationError(f"FCD {fcd_path}: a vehicle track has missing frames (teleport?).")
    if np.any(fixed["vehicle_speed"] < 0):
        raise TownGenerationError(f"FCD {fcd_path}: negative speed (reversing is not modelled).")
    x, y, vx, vy, psi = front_path_to_box(
        fixed["vehicle_x"], fixed["vehicle_y"], track_start, sumo_heading(fixed["vehicle_angle"]),
        fixed["vehicle_speed"], length_mm / 1000.0,
    )
    values = np.stack([
        np.rint(x * 1000), np.rint(y * 1000), np.rint(vx * 1000), np.rint(vy * 1000),
        np.clip(np.rint(psi * 1000), -3141, 3141),
    ], axis=1).astype(np.int64)

    keep = (frame >= 0) & (frame < num_frames)
    vid, frame, values, length_mm, width_mm = vid[keep], frame[keep], values[keep], length_mm[keep], width_mm[keep]
    # Vehicles ordered by first recorded frame, then by departure order.
    starts = np.flatnonzero(np.concatenate([[True], vid[1:] != vid[:-1]]))
    counts = np.diff(np.concatenate([starts, [len(vid)]]))
    first = frame[starts]
    track_order = np.lexsort((vid[starts], first))
    rows = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in track_order]) if len(starts) else \
        np.zeros(0, dtype=np.int64)
    return RunTracks(
        num_frames=num_frames,
        first_frame=first[track_order].astype(np.int64),
        num_track_frames=counts[track_order].astype(np.int64),
        length_mm=length_mm[starts][track_order],
        width_mm=width_mm[starts][track_order],
        values=values[rows],
    )


def _parse_fixed4(col, fcd_path: Path) -> np.ndarray:
    """Parse SUMO's fixed 4-decimal text (``--precision 4``) exactly: "-12.3400" -> -12.34."""
    text = col.to_numpy(dtype=str)
    if len(text) and not np.all(np.char.find(text, ".") == np.char.str_len(text) - 5):
        raise TownGenerationError(f"FCD {fcd_path}: expected values with exactly 4 decimals (--precision 4).")
    return np.char.replace(text, ".", "").astype(np.int64) / 10000.0


def simulate_town(spec: TownSpec, net_path: Path, routes: list[list[str]], workdir: Path, seed: int,
                  warmup_s: float, num_frames: int) -> RunTracks:
    """Seeded trips + one SUMO run of ``warmup_s`` plus ``num_frames`` recorded frames.

    ``seed`` drives both the trip sampling (numpy) and SUMO's own RNG, so one seed gives one run.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    end_s = round(warmup_s + num_frames * STEP_S + 1.0, 1)
    rng = np.random.default_rng(seed)
    routes_path = workdir / "trips.rou.xml"
    fcd_path = workdir / "fcd.csv"
    write_routes(routes_path, routes, rng, spec.demand_veh_per_s, end_s)
    run_sumo(net_path, routes_path, fcd_path, sumo_seed=seed % (2**31 - 1), end_s=end_s)
    return parse_fcd(fcd_path, warmup_s, num_frames)
