"""The simulator core: pure-function ``reset`` and ``step`` over a batched ``SimState``. No gym here.

    state = reset(scenes, start_step=10, controlled="all")
    state = step(state, Action(data, valid), dynamics)

No Python loop runs over agents or scenes in ``step``; ``reset`` stacks scenes once (numpy, then one copy to
the device).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from envs.dynamics import Dynamics
from envs.errors import EmptySceneError, NoEgoError, StaleStateError
from envs.geometry import arc_length
from envs.map_index import MapIndex, map_index
from envs.types import ROUTE_SPACING, Action, MapBatch, MapData, Scene, SimState

CONTROL_MODES = ("ego", "all", "none")
ROUTE_WINDOW = (-4, 12)  # route points searched around the last position each step (1 m apart: 16 m of travel)
SDF_PAD = 1e3  # m: padding of SDF grids reads as far off-road


def stack_maps(maps: Sequence[MapData], device: torch.device | str = "cpu",
               indices: Sequence[MapIndex] | None = None) -> MapBatch:
    """Stack distinct maps into one ``MapBatch``. ``indices`` (e.g. ``SceneDataset.map_index``, cached on disk)
    skips building each map's ``MapIndex``; the ``MapData`` objects stay reachable as ``MapBatch.sources`` for
    policies that need the full lane graph."""
    indices = list(indices) if indices is not None else [map_index(m) for m in maps]
    if len(indices) != len(maps) or any(ix.map_id != m.map_id for ix, m in zip(indices, maps, strict=False)):
        raise ValueError("stack_maps: indices must match maps one to one.")
    resolutions = {ix.resolution for ix in indices}
    if len(resolutions) > 1:
        raise ValueError(f"Maps use different SDF resolutions {sorted(resolutions)}; build them with one.")
    m = len(indices)
    h = max(ix.sdf.shape[0] for ix in indices)
    w = max(ix.sdf.shape[1] for ix in indices)
    c = max(max(len(ix.chunks) for ix in indices), 1)
    n = indices[0].chunks.shape[1]
    sdf = np.full((m, h, w), SDF_PAD, np.float32)
    chunks = np.zeros((m, c, n, 2), np.float32)
    chunk_mask = np.zeros((m, c, n), bool)
    chunk_type = np.zeros((m, c), np.int64)
    chunk_valid = np.zeros((m, c), bool)
    for i, ix in enumerate(indices):
        sdf[i, :ix.sdf.shape[0], :ix.sdf.shape[1]] = ix.sdf
        k = len(ix.chunks)
        chunks[i, :k], chunk_mask[i, :k], chunk_type[i, :k], chunk_valid[i, :k] = (
            ix.chunks, ix.chunk_mask, ix.chunk_type, True)

    def t(a):
        return torch.as_tensor(a, device=device)

    return MapBatch(map_ids=tuple(ix.map_id for ix in indices), sources=tuple(maps), sdf=t(sdf),
                    sdf_origin=t(np.stack([ix.origin for ix in indices])), sdf_resolution=resolutions.pop(),
                    has_road_edges=t(np.array([ix.has_road_edges for ix in indices])), chunks=t(chunks),
                    chunk_mask=t(chunk_mask), chunk_type=t(chunk_type), chunk_valid=t(chunk_valid))


def resample_routes(log: np.ndarray, log_valid: np.ndarray, spacing: float = ROUTE_SPACING,
                    min_points: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Each agent's logged path (valid positions in time order) resampled every ``spacing`` m of arc length.

    ``log``: ``(B, A, T, 5)``, ``log_valid``: ``(B, A, T)``. Returns ``route_xy`` ``(B, A, P, 2)`` float32 (padding
    repeats the last point) and ``route_len`` ``(B, A)`` int64 (0 for agents never observed). A standing agent
    has a one-point route. Vectorised over all agents (one batched search, no Python loop).
    """
    b, a, t = log_valid.shape
    xy = log[..., :2].reshape(b * a, t, 2).astype(np.float64)
    valid = log_valid.reshape(b * a, t)
    steps = np.arange(t)
    # Fill gaps with the last valid position (leading gaps with the first), so gaps add no arc length.
    last = np.maximum.accumulate(np.where(valid, steps, -1), axis=1)
    last = np.where(last < 0, valid.argmax(axis=1)[:, None], last)
    filled = np.take_along_axis(xy, last[..., None], axis=1)
    arc = arc_length(filled)  # (N, T) non-decreasing
    observed = valid.any(axis=1)
    lengths = np.where(observed, np.floor(arc[:, -1] / spacing + 1e-9).astype(np.int64) + 1, 0)
    p_max = max(int(lengths.max(initial=0)), min_points)
    targets = np.minimum(np.arange(p_max) * spacing, arc[:, -1:])  # (N, P): padding repeats the end
    # One batched search and lerp for every agent rather than ``geometry.resample_polyline`` (np.interp) per
    # agent: the two round differently in the last digit, and these routes are what progress, the route
    # observation and IDM's paths have always been measured on.
    hi = torch.searchsorted(torch.from_numpy(arc), torch.from_numpy(targets)).numpy().clip(1, t - 1)
    lo = hi - 1
    a0, a1 = np.take_along_axis(arc, lo, 1), np.take_along_axis(arc, hi, 1)
    frac = np.clip((targets - a0) / np.maximum(a1 - a0, 1e-12), 0.0, 1.0)[..., None]
    p0 = np.take_along_axis(filled, lo[..., None], 1)
    p1 = np.take_along_axis(filled, hi[..., None], 1)
    route = (p0 + frac * (p1 - p0)).astype(np.float32)
    route[~observed] = 0.0
    return route.reshape(b, a, p_max, 2), lengths.reshape(b, a)


def controlled_mask(scene: Scene, mode: str | np.ndarray, start_step: int) -> np.ndarray:
    """``(A,)`` bool: who is controlled. ``"ego"``: the ego only; ``"all"``: every agent valid at
    ``start_step`` (the WOSAC sim-agents setting); ``"none"``: nobody; or an explicit boolean mask / index list."""
    a = scene.num_agents
    if isinstance(mode, str):
        if mode == "ego":
            mask = np.zeros(a, bool)
            mask[scene.ego_index] = True
            return mask
        if mode == "all":
            return scene.valid[:, start_step].copy()
        if mode == "none":
            return np.zeros(a, bool)
        from envs.errors import UnknownNameError

        raise UnknownNameError("control mode", mode, CONTROL_MODES, fix="Or pass a boolean mask / agent indices.")
    arr = np.asarray(mode)
    if arr.dtype == bool:
        if arr.shape != (a,):
            raise ValueError(f"Controlled mask has shape {arr.shape}; scene {scene.scene_id} has {a} agents.")
        return arr.copy()
    mask = np.zeros(a, bool)
    if arr.size and (arr.min() < 0 or arr.max() >= a):
        raise ValueError(f"Controlled agent indices {arr.tolist()} outside [0, {a}) for scene {scene.scene_id}.")
    mask[arr.astype(int)] = True
    return mask


def reset(scenes: Sequence[Scene], start_step: int = 10, controlled: str | Sequence = "ego",
          device: torch.device | str = "cpu", num_agents: int | None = None, num_steps: int | None = None,
          maps: MapBatch | None = None) -> SimState:
    """Stack scenes into a batched state at ``start_step`` (steps ``0..start_step`` are history from the log).

    Args:
        scenes: B scenes, each with its ``map`` attached.
        start_step: the current step at reset (WOSAC: 10, i.e. 1.1 s of history at 10 Hz).
        controlled: a control mode (``"ego"``, ``"all"``, ``"none"``) or one mask / index list per scene.
        num_agents / num_steps: pad to at least this many agents / steps (fixed shapes for vector envs).
        maps: an existing ``MapBatch`` holding every scene's map (reused, not rebuilt).
    """
    if len(scenes) == 0:
        raise EmptySceneError("reset() needs at least one scene.")
    a_max = max([s.num_agents for s in scenes] + [num_agents or 0])
    t_max = max([s.num_steps for s in scenes] + [num_steps or 0])
    b = len(scenes)
    log = np.zeros((b, a_max, t_max, 5), np.float32)
    log_valid = np.zeros((b, a_max, t_max), bool)
    agent_type = np.zeros((b, a_max), np.int64)
    extent = np.zeros((b, a_max, 2), np.float32)
    agent_mask = np.zeros((b, a_max), bool)
    ctrl = np.zeros((b, a_max), bool)
    ego = np.zeros(b, np.int64)
    end = np.zeros(b, np.int64)
    modes = [controlled] * b if isinstance(controlled, str) else list(controlled)
    if len(modes) != b:
        raise ValueError(f"Got {len(modes)} controlled masks for {b} scenes.")
    for i, s in enumerate(scenes):
        if s.num_agents == 0:
            raise EmptySceneError(f"Scene {s.scene_id} has no agents; it cannot be simulated. Pick another scene.")
        if not 0 <= start_step < s.num_steps - 1:
            raise ValueError(f"start_step {start_step} must lie in [0, {s.num_steps - 1}) for scene {s.scene_id} "
                             f"({s.num_steps} steps).")
        if s.ego_index < 0 or not s.valid[s.ego_index, start_step]:
            raise NoEgoError(f"Scene {s.scene_id} has no ego agent valid at step {start_step} (ego_index "
                             f"{s.ego_index}). Pick another scene, or use controlled='all' in the sim-agents env.")
        n, t = s.num_agents, s.num_steps
        log[i, :n, :t], log_valid[i, :n, :t] = s.trajectory, s.valid
        agent_type[i, :n], extent[i, :n], agent_mask[i, :n] = s.agent_type, s.extent, True
        ctrl[i, :n] = controlled_mask(s, modes[i], start_step) & s.valid[:, start_step]
        ego[i], end[i] = s.ego_index, t - 1
    if maps is None:
        unique: dict[str, MapData] = {}
        for s in scenes:
            if s.map is None:
                raise ValueError(f"Scene {s.scene_id} has no map attached; load it through envs.data.open_dataset.")
            unique.setdefault(s.map_id, s.map)
        maps = stack_maps(list(unique.values()), device)
    missing = [s.map_id for s in scenes if s.map_id not in maps.map_ids]
    if missing:
        raise ValueError(f"MapBatch lacks maps {sorted(set(missing))}.")
    map_idx = np.array([maps.map_ids.index(s.map_id) for s in scenes], np.int64)

    route_xy, route_len = resample_routes(log, log_valid)
    current_xy = log[:, :, start_step, :2]
    d2 = ((route_xy - current_xy[:, :, None]) ** 2).sum(-1)
    d2[np.arange(route_xy.shape[2])[None, None] >= route_len[..., None]] = np.inf
    route_pos = np.where(route_len > 0, d2.argmin(axis=-1), 0)

    traj = log.copy()
    traj[:, :, start_step + 1:] = 0.0
    valid = log_valid.copy()
    valid[:, :, start_step + 1:] = False

    def t(a):
        return torch.as_tensor(a, device=device)

    return SimState(
        log=t(log), log_valid=t(log_valid), route_xy=t(route_xy), route_len=t(route_len), route_pos=t(route_pos),
        agent_type=t(agent_type), extent=t(extent), agent_mask=t(agent_mask), controlled=t(ctrl), ego=t(ego),
        start=torch.full((b,), start_step, dtype=torch.long, device=device), end=t(end), map_idx=t(map_idx),
        maps=maps, traj=t(traj), valid=t(valid), t=torch.full((b,), start_step, dtype=torch.long, device=device),
        removed=torch.zeros((b, a_max), dtype=torch.bool, device=device),
        dt=float(scenes[0].dt), scene_ids=tuple(s.scene_id for s in scenes),
    )


def step(state: SimState, action: Action, dynamics: Dynamics,
         more: Sequence[tuple[Action, Dynamics]] = ()) -> SimState:
    """Advance every scene by one ``dt``.

    Agents with a valid ``action`` that are valid now move by ``dynamics``; ``more`` adds further
    (action, dynamics) pairs for agents driven by other policies (an agent must be driven by at most one).
    Every other agent follows its log, appearing and disappearing with its logged validity. Scenes already at
    their last step do not move. Returns the state at ``t + 1`` (see ``SimState`` on the in-place buffer).

    Each state object can be stepped once: the returned state shares (and owns the next row of) its trajectory
    buffer, so stepping ``state`` again raises ``StaleStateError``. To branch, step ``state.clone()`` instead.
    """
    if state in _STEPPED:
        raise StaleStateError(
            f"sim.step was given a state that was already stepped (scenes {list(state.scene_ids[:3])}"
            f"{'...' if state.batch_size > 3 else ''} at t={state.t.tolist()[:3]}): its trajectory buffer is shared "
            "with the state that step returned, which stepping it again would overwrite. Step the newest state, "
            "or call state.clone() before branching (step each branch's clone).")
    b = torch.arange(state.batch_size, device=state.device)
    can_step = state.t < state.end  # (B,)
    t_next = torch.where(can_step, state.t + 1, state.t)
    current, current_valid = state.current, state.current_valid  # (B, A, 5), (B, A)
    movable = current_valid & state.agent_mask & can_step[:, None]
    next_pose = state.log[b, :, t_next]  # (B, A, 5): log replay unless driven
    next_valid = state.log_valid[b, :, t_next].clone()
    taken = torch.zeros_like(movable)
    removed = state.removed.clone()
    for act, dyn in ((action, dynamics), *more):
        driven = act.valid & movable
        if (driven & taken).any():
            raise ValueError("An agent received actions from two controls in the same step.")
        taken |= driven
        moved = dyn.forward(current, act.data.to(current.dtype), state.dt)
        next_pose = torch.where(driven[..., None], moved, next_pose)
        next_valid |= driven
        if act.remove is not None:
            removed |= act.remove & driven
    next_valid &= ~removed
    keep = ~can_step  # scenes at their last step rewrite their current row unchanged
    next_pose = torch.where(keep[:, None, None], current, next_pose)
    next_valid = torch.where(keep[:, None], current_valid, next_valid)
    next_pose = torch.where(next_valid[..., None], next_pose, torch.zeros_like(next_pose))
    state.traj[b, :, t_next] = next_pose
    state.valid[b, :, t_next] = next_valid
    _STEPPED.add(state)
    return replace(state, t=t_next, route_pos=track_route(state, next_pose[..., :2]), removed=removed)


# States ``step`` has advanced (weakly held: an entry goes with its state). Each is stale from then on: the state
# step returned writes its next row into the buffer they share.
_STEPPED: weakref.WeakSet[SimState] = weakref.WeakSet()


def track_route(state: SimState, xy: torch.Tensor) -> torch.Tensor:
    """``(B, A)`` index of the route point nearest to ``xy`` ``(B, A, 2)``, searched in a window around
    ``state.route_pos`` (an agent moves at most a few metres per step)."""
    offsets = torch.arange(*ROUTE_WINDOW, device=xy.device)
    last = (state.route_len - 1).clamp(min=0)[..., None]
    idx = torch.minimum((state.route_pos[..., None] + offsets).clamp(min=0), last)  # (B, A, W)
    pts = state.route_xy.gather(2, idx[..., None].expand(*idx.shape, 2))  # (B, A, W, 2)
    d2 = ((pts - xy[:, :, None]) ** 2).sum(-1)
    return idx.gather(2, d2.argmin(-1, keepdim=True)).squeeze(-1)
