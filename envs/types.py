"""Typed data containers shared by the whole simulator.

Conventions: world frame, metres, radians (heading counter-clockwise from +x), seconds. Every per-agent
array has a boolean ``valid`` mask beside it; invalid entries hold zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: this module does not import torch at run time
    import torch


class AgentType(IntEnum):
    """Agent classes. Compare against these, never against bare integers."""

    VEHICLE = 0
    PEDESTRIAN = 1
    CYCLIST = 2
    OTHER = 3


class PolylineType(IntEnum):
    """Map polyline classes."""

    LANE_CENTER = 0  # driving direction = point order
    LANE_BOUNDARY = 1  # a lane's left or right border (markings); shared borders appear once
    ROAD_EDGE = 2  # border of the drivable area, oriented so that the drivable area is on its LEFT
    CROSSWALK = 3  # closed polygon ring
    WALKWAY = 4  # closed polygon ring


class TrafficLightState(IntEnum):
    """States of a traffic signal controlling a lane (trajdata's encoding, shifted so 0 = unknown)."""

    UNKNOWN = 0
    GREEN = 1
    RED = 2


ROUTE_SPACING = 1.0  # m between the points of SimState.route_xy
# Column order of ``Scene.trajectory``'s last axis.
TRAJECTORY_FIELDS: tuple[str, ...] = ("x", "y", "heading", "vx", "vy")


@dataclass(frozen=True, eq=False)
class MapData:
    """A static vector map: polylines in the world frame plus the lane graph.

    Polylines are stored ragged: polyline ``p`` is ``points[offsets[p]:offsets[p + 1]]``. Consecutive points
    are at most ``max_spacing`` metres apart (sparse source polylines are densified, so nearest-point
    queries are exact to that spacing). The lane graph's edges index polylines (of type ``LANE_CENTER``).

    Attributes:
        map_id: unique map name, e.g. ``"interaction_multi:USA_Town_Grid"``.
        points: ``(M, 2)`` float32, x, y in m.
        offsets: ``(P + 1,)`` int64, start of each polyline in ``points``; ``offsets[-1] == M``.
        polyline_type: ``(P,)`` int8 ``PolylineType``.
        source_id: ``(P,)`` str, the id of the source map element (lane id for lanes, "" for derived ones).
        successors: ``(E, 2)`` int32 pairs ``(from_lane, to_lane)`` of polyline indices.
        left_neighbors / right_neighbors: ``(E, 2)`` int32 pairs ``(lane, neighbour it may change into)``.
        max_spacing: upper bound on the distance between consecutive points, m.
    """

    map_id: str
    points: np.ndarray
    offsets: np.ndarray
    polyline_type: np.ndarray
    source_id: np.ndarray
    successors: np.ndarray
    left_neighbors: np.ndarray
    right_neighbors: np.ndarray
    max_spacing: float

    @property
    def num_polylines(self) -> int:
        return int(self.polyline_type.shape[0])

    def polyline(self, index: int) -> np.ndarray:
        """Points ``(N, 2)`` of polyline ``index``."""
        return self.points[self.offsets[index]:self.offsets[index + 1]]

    def polylines_of(self, kind: PolylineType) -> list[np.ndarray]:
        """Every polyline of one type, as a list of ``(N, 2)`` arrays."""
        return [self.polyline(i) for i in np.flatnonzero(self.polyline_type == kind)]

    def count(self, kind: PolylineType) -> int:
        return int(np.count_nonzero(self.polyline_type == kind))

    @property
    def extent(self) -> np.ndarray:
        """``(4,)`` float32 ``[min_x, min_y, max_x, max_y]`` of all points."""
        return np.concatenate([self.points.min(axis=0), self.points.max(axis=0)])


@dataclass(frozen=True, eq=False)
class Scene:
    """One logged scene: every agent's track over ``T`` steps of ``dt`` seconds, and its map.

    Attributes:
        scene_id: unique within the dataset split, e.g. ``"DR_USA_Town_Grid_val_12"``.
        dataset / split: where it came from (``"towns"``, ``"val"``).
        map_id: key of the scene's ``MapData``.
        dt: seconds between steps.
        agent_ids: ``(A,)`` str, the source dataset's agent names.
        agent_type: ``(A,)`` int8 ``AgentType``.
        extent: ``(A, 2)`` float32 box length and width, m (constant per agent).
        trajectory: ``(A, T, 5)`` float32 ``TRAJECTORY_FIELDS`` = x, y (box centre, m), heading (rad, wrapped
            to [-pi, pi)), vx, vy (m/s, world frame). Zero where invalid.
        valid: ``(A, T)`` bool, whether the agent was observed at each step.
        ego_index: index of the ego / self-driving car; -1 if the scene has no agent that qualifies.
        tl_lane: ``(K,)`` int32 polyline index of each signal-controlled lane (``K = 0`` without lights).
        tl_state: ``(K, T)`` int8 ``TrafficLightState``.
        map: the scene's map, attached by the loader (``None`` for datasets without maps).
    """

    scene_id: str
    dataset: str
    split: str
    map_id: str
    dt: float
    agent_ids: np.ndarray
    agent_type: np.ndarray
    extent: np.ndarray
    trajectory: np.ndarray
    valid: np.ndarray
    ego_index: int
    tl_lane: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    tl_state: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int8))
    map: MapData | None = None

    @property
    def num_agents(self) -> int:
        return int(self.agent_type.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.valid.shape[1])

    def validate(self) -> None:
        """Check shapes, dtypes and the zero-where-invalid / no-NaN conventions; raise ValueError if broken."""
        a, t = self.valid.shape
        expected = {
            "agent_ids": (a,), "agent_type": (a,), "extent": (a, 2), "trajectory": (a, t, len(TRAJECTORY_FIELDS)),
        }
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"Scene {self.scene_id}: {name} has shape {got}, expected {shape}.")
        k = self.tl_lane.shape[0]
        if k > 0 and self.tl_state.shape != (k, t):
            raise ValueError(f"Scene {self.scene_id}: tl_state shape {self.tl_state.shape} != (K={k}, T={t}).")
        if not np.isfinite(self.trajectory).all():
            raise ValueError(f"Scene {self.scene_id}: trajectory holds NaN/inf (mask missing values with valid).")
        if np.any(self.trajectory[~self.valid] != 0):
            raise ValueError(f"Scene {self.scene_id}: trajectory is non-zero where valid is False.")
        if not -1 <= self.ego_index < a:
            raise ValueError(f"Scene {self.scene_id}: ego_index {self.ego_index} outside [-1, {a}).")


# ----------------------------------------------------------------------------------------------------------
# Batched simulator state (torch)
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class MapBatch:
    """The maps a batch of scenes uses, stacked once (M maps); scenes point into it with ``SimState.map_idx``.

    sdf: ``(M, H, W)`` signed distance to the road edge (m, > 0 off-road), padded with a large positive value.
    sdf_origin: ``(M, 2)`` world x, y of each grid's lower-left corner; sdf_resolution: m per cell.
    has_road_edges: ``(M,)`` bool, whether off-road is defined on the map.
    chunks: ``(M, C, N, 2)`` polyline pieces in world coordinates; chunk_mask ``(M, C, N)`` bool point validity;
    chunk_type: ``(M, C)`` long ``PolylineType``; chunk_valid ``(M, C)`` bool (padding is False).
    sources: the ``MapData`` of each map (full polylines and lane graph, numpy), for policies that plan on it.
    """

    map_ids: tuple[str, ...]  # (M,) MapData.map_id of each map
    sources: tuple[MapData, ...]  # (M,)
    sdf: torch.Tensor  # (M, H, W) float32 m
    sdf_origin: torch.Tensor  # (M, 2) float32 m, world x, y of each grid's lower-left corner
    sdf_resolution: float  # m per cell
    has_road_edges: torch.Tensor  # (M,) bool
    chunks: torch.Tensor  # (M, C, N, 2) float32 m, world frame
    chunk_mask: torch.Tensor  # (M, C, N) bool
    chunk_type: torch.Tensor  # (M, C) int64 PolylineType
    chunk_valid: torch.Tensor  # (M, C) bool


@dataclass(frozen=True, eq=False)
class SimState:
    """Closed-loop state of B scenes with A (padded) agents over T (padded) steps. Torch tensors throughout.

    Static per episode:
        log: ``(B, A, T, 5)`` logged ``TRAJECTORY_FIELDS``; log_valid ``(B, A, T)`` bool.
        route_xy: ``(B, A, P, 2)`` each agent's logged path resampled every ``ROUTE_SPACING`` m of arc length
            (the route that progress is measured along); route_len ``(B, A)`` long, valid points per agent.
        agent_type ``(B, A)`` long ``AgentType``; extent ``(B, A, 2)`` length, width (m).
        agent_mask: ``(B, A)`` bool, False for padding.
        controlled: ``(B, A)`` bool, the agents the env expects actions for.
        ego: ``(B,)`` long index of the ego agent.
        start: ``(B,)`` long first simulated step; end ``(B,)`` long last step of the log.
        map_idx: ``(B,)`` long index into ``maps``.
    Dynamic:
        traj: ``(B, A, T, 5)`` simulated trajectory; steps ``<= start`` are the log (history).
        valid: ``(B, A, T)`` bool.
        t: ``(B,)`` long current step.
        route_pos: ``(B, A)`` long index of the route point nearest to each agent (tracked by ``sim.step``
            within a window, so the search costs O(window), not O(route)).
        removed: ``(B, A)`` bool, agents a policy took out of the scene (e.g. driving off the map at its
            border); they stay invalid for the rest of the episode, whatever their log says.

    ``sim.step`` writes step ``t + 1`` of ``traj``/``valid`` in place (an append-only buffer): an older state
    object still reads its own past correctly, but it cannot be stepped again (``StaleStateError``); to branch
    (step one state twice) step its ``clone()``.
    """

    # static per episode
    log: torch.Tensor  # (B, A, T, 5) float32 TRAJECTORY_FIELDS (m, rad, m/s), zero where invalid
    log_valid: torch.Tensor  # (B, A, T) bool
    route_xy: torch.Tensor  # (B, A, P, 2) float32 m, padding repeats each route's last point
    route_len: torch.Tensor  # (B, A) int64 valid route points (0: never observed)
    agent_type: torch.Tensor  # (B, A) int64 AgentType
    extent: torch.Tensor  # (B, A, 2) float32 length, width (m)
    agent_mask: torch.Tensor  # (B, A) bool, False for padding
    controlled: torch.Tensor  # (B, A) bool
    ego: torch.Tensor  # (B,) int64 agent index
    start: torch.Tensor  # (B,) int64 step
    end: torch.Tensor  # (B,) int64 step
    map_idx: torch.Tensor  # (B,) int64 index into maps
    maps: MapBatch
    # dynamic
    traj: torch.Tensor  # (B, A, T, 5) float32, shared with the states step() returns (written in place)
    valid: torch.Tensor  # (B, A, T) bool, shared like traj
    t: torch.Tensor  # (B,) int64 current step
    route_pos: torch.Tensor  # (B, A) int64 index into route_xy
    removed: torch.Tensor  # (B, A) bool
    dt: float  # s per step
    scene_ids: tuple[str, ...]  # (B,)

    @property
    def batch_size(self) -> int:
        return int(self.log.shape[0])

    @property
    def num_agents(self) -> int:
        return int(self.log.shape[1])

    @property
    def num_steps(self) -> int:
        return int(self.log.shape[2])

    @property
    def device(self):
        return self.log.device

    def at(self, tensor, step=None):
        """Gather ``tensor[b, :, step[b]]`` for ``(B, A, T, ...)`` tensors; ``step`` defaults to ``t``."""
        import torch

        step = self.t if step is None else step
        b = torch.arange(self.batch_size, device=self.device)
        return tensor[b, :, step]  # advanced indices split by a slice: (B, A, ...)

    @property
    def current(self):
        """``(B, A, 5)`` state at the current step."""
        return self.at(self.traj)

    @property
    def current_valid(self):
        """``(B, A)`` bool."""
        return self.at(self.valid)

    def clone(self) -> SimState:
        """A copy whose trajectory buffers are independent (for branching rollouts)."""
        from dataclasses import replace

        return replace(self, traj=self.traj.clone(), valid=self.valid.clone(), t=self.t.clone(),
                       route_pos=self.route_pos.clone(), removed=self.removed.clone())


@dataclass(frozen=True, eq=False)
class Action:
    """Actions for a batch: ``data`` ``(B, A, D)`` in the units of ``dynamics`` and ``valid`` ``(B, A)`` bool.

    Agents with ``valid`` False are not driven by an action: they follow their log. ``remove`` ``(B, A)`` bool
    (optional) takes driven agents out of the scene for the rest of the episode (they leave the map).
    """

    data: torch.Tensor  # (B, A, D) float32 in the dynamics' units
    valid: torch.Tensor  # (B, A) bool
    remove: torch.Tensor | None = None  # (B, A) bool
