"""Hand-built scenes and maps for simulator tests (no dataset, no trajdata)."""

from __future__ import annotations

import numpy as np

from envs.geometry import densify_polyline
from envs.types import AgentType, MapData, PolylineType, Scene


def make_map(polylines: list[tuple[np.ndarray, PolylineType]], map_id: str = "test:road",
             successors=(), spacing: float = 2.0) -> MapData:
    pts = [densify_polyline(np.asarray(p, np.float64), spacing) for p, _ in polylines]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pts])]).astype(np.int64)
    return MapData(map_id=map_id, points=np.concatenate(pts).astype(np.float32), offsets=offsets,
                   polyline_type=np.array([int(k) for _, k in polylines], np.int8),
                   source_id=np.array([str(i) for i in range(len(pts))]),
                   successors=np.array(successors, np.int32).reshape(-1, 2),
                   left_neighbors=np.zeros((0, 2), np.int32), right_neighbors=np.zeros((0, 2), np.int32),
                   max_spacing=spacing)


def straight_road(length: float = 200.0, half_width: float = 3.5, map_id: str = "test:road") -> MapData:
    """A straight road along +x from 0 to ``length``, ``2 * half_width`` wide, centred on y = 0, one lane each
    way (centres at y = -1.75 eastbound and y = +1.75 westbound)."""
    ring = np.array([[0, -half_width], [length, -half_width], [length, half_width], [0, half_width],
                     [0, -half_width]], np.float64)  # counter-clockwise: the road is on the left
    return make_map([
        (np.array([[0, -1.75], [length, -1.75]]), PolylineType.LANE_CENTER),
        (np.array([[length, 1.75], [0, 1.75]]), PolylineType.LANE_CENTER),
        (np.array([[0, 0.0], [length, 0.0]]), PolylineType.LANE_BOUNDARY),
        (ring, PolylineType.ROAD_EDGE),
    ], map_id=map_id)


def make_scene(tracks: list[dict], num_steps: int = 91, dt: float = 0.1, map_data: MapData | None = None,
               ego_index: int = 0, scene_id: str = "test_scene") -> Scene:
    """Each track: ``x0, y0, heading, speed`` (constant velocity along heading), optional ``accel``,
    ``length``, ``width``, ``type``, ``steps`` (slice of valid steps)."""
    a = len(tracks)
    traj = np.zeros((a, num_steps, 5), np.float32)
    valid = np.zeros((a, num_steps), bool)
    extent = np.zeros((a, 2), np.float32)
    types = np.zeros(a, np.int8)
    t = np.arange(num_steps) * dt
    for i, tr in enumerate(tracks):
        h, v0, acc = tr.get("heading", 0.0), tr.get("speed", 0.0), tr.get("accel", 0.0)
        v = np.maximum(v0 + acc * t, 0.0)
        s = np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] + v[:-1]) * dt)])
        rows = np.stack([tr["x0"] + s * np.cos(h), tr["y0"] + s * np.sin(h), np.full_like(t, h),
                         v * np.cos(h), v * np.sin(h)], axis=-1)
        steps = tr.get("steps", slice(0, num_steps))
        traj[i, steps] = rows[steps]
        valid[i, steps] = True
        extent[i] = tr.get("length", 4.5), tr.get("width", 2.0)
        types[i] = int(tr.get("type", AgentType.VEHICLE))
    return Scene(scene_id=scene_id, dataset="test", split="test", map_id=(map_data or straight_road()).map_id,
                 dt=dt, agent_ids=np.array([str(i) for i in range(a)]), agent_type=types, extent=extent,
                 trajectory=traj, valid=valid, ego_index=ego_index, map=map_data or straight_road())
