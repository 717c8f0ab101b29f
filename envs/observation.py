"""Agent-centric vector observations for any subset of agents, batched.

For each observing agent (its own frame: x forward, y left, origin at its box centre):
    self    (5,)        speed m/s, acceleration m/s², yaw rate rad/s, length m, width m
    agents  (K, 12)     the K nearest other live agents within ``radius``: x, y, cos dh, sin dh, vx, vy (own
                        frame), length, width, one-hot AgentType (4); agents_mask (K,)
    map     (C, N, 2)   the C nearest map chunks (N points each) within ``radius``; map_mask (C, N);
                        map_type (C, 4) one-hot lane centre / lane boundary / road edge / crosswalk
    route   (R, 2)      points every ``route_spacing`` m ahead along the agent's logged path; route_mask (R,)
Masks are float 0/1. Everything is float32 and finite; masked entries are 0. Features are clamped to the
finite range of ``observation_space``: [-1000, 1000] (reached only by glitches in logged data).

Two options make the observation ready for generic RL code (``ObsConfig``):
    normalize   divide every feature by a fixed, documented scale (``SCALES``: lengths by 20 m, velocities by
                10 m/s, ...) so typical values are O(1); cosines, sines, one-hots and masks are left as they are.
                The space's bounds are the clamp range divided by the same scales. Fixed scales, not running
                statistics: the same observation means the same thing in every run and in every process.
    flat        (ego env) one ``Box (F,)`` vector instead of the ``Dict``: the Dict's entries flattened and
                concatenated in the Dict's key order, exactly ``gymnasium.spaces.flatten(dict_space, obs)``, so
                ``gymnasium.spaces.unflatten(dict_observation_space(...), x)`` gives the Dict back.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces

from envs.geometry import rotate_to_local, to_local, wrap_angle
from envs.types import ROUTE_SPACING, AgentType, PolylineType, SimState

MAP_TYPES = (PolylineType.LANE_CENTER, PolylineType.LANE_BOUNDARY, PolylineType.ROAD_EDGE, PolylineType.CROSSWALK)
SELF_FEATURES = ("speed", "acceleration", "yaw_rate", "length", "width")
AGENT_FEATURES = ("x", "y", "cos_dheading", "sin_dheading", "vx", "vy", "length", "width",
                  *(f"is_{t.name.lower()}" for t in AgentType))


FEATURE_LIMIT = 1000.0  # every feature lies in [-FEATURE_LIMIT, FEATURE_LIMIT] (observe() clamps)

LENGTH_SCALE = 20.0  # m: positions of agents, map points and route points
SPEED_SCALE = 10.0  # m/s: speeds and velocities
# Per-feature divisors of ``ObsConfig(normalize=True)`` (1 where a feature is already O(1)); the last axis of each
# key. self: speed 10 m/s, acceleration 3 m/s², yaw rate 0.5 rad/s, length 5 m, width 2 m. agents: x, y 20 m,
# cos/sin 1, vx, vy 10 m/s, length 5 m, width 2 m, type one-hot 1. map and route: 20 m. Masks and map types: 1.
SCALES: dict[str, tuple[float, ...]] = {
    "self": (SPEED_SCALE, 3.0, 0.5, 5.0, 2.0),
    "agents": (LENGTH_SCALE, LENGTH_SCALE, 1.0, 1.0, SPEED_SCALE, SPEED_SCALE, 5.0, 2.0,
               *(1.0 for _ in AgentType)),
    "map": (LENGTH_SCALE, LENGTH_SCALE),
    "route": (LENGTH_SCALE, LENGTH_SCALE),
}


@dataclass(frozen=True)
class ObsConfig:
    """Observation sizes. ``radius`` (m) bounds what an agent sees."""

    num_agents: int = 16
    num_map_chunks: int = 48
    route_points: int = 10
    route_spacing: float = 2.0
    radius: float = 80.0
    normalize: bool = False
    flat: bool = False

    def __post_init__(self):
        for name in ("num_agents", "num_map_chunks", "route_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"ObsConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("normalize", "flat"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(f"ObsConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.route_spacing <= 0 or self.radius <= 0:
            raise ValueError(f"ObsConfig.route_spacing and radius must be > 0, got {self.route_spacing}, "
                             f"{self.radius}.")


def observation_space(cfg: ObsConfig, chunk_points: int, prefix: tuple[int, ...] = ()) -> spaces.Dict:
    """The Dict space of one observer (``prefix=()``) or of ``prefix`` observers stacked in front (``cfg.flat``
    is the task's business: ``flat_space`` of this)."""

    def box(key, *shape):
        shape = (*prefix, *shape)
        if key not in SCALES:  # masks and one-hot map types
            return spaces.Box(0.0, 1.0, shape=shape, dtype=np.float32)
        bound = FEATURE_LIMIT / (np.asarray(SCALES[key], np.float32) if cfg.normalize else np.float32(1.0))
        high = np.broadcast_to(bound, shape).astype(np.float32)
        return spaces.Box(-high, high, dtype=np.float32)

    return spaces.Dict({
        "self": box("self", len(SELF_FEATURES)),
        "agents": box("agents", cfg.num_agents, len(AGENT_FEATURES)),
        "agents_mask": box("agents_mask", cfg.num_agents),
        "map": box("map", cfg.num_map_chunks, chunk_points, 2),
        "map_mask": box("map_mask", cfg.num_map_chunks, chunk_points),
        "map_type": box("map_type", cfg.num_map_chunks, len(MAP_TYPES)),
        "route": box("route", cfg.route_points, 2),
        "route_mask": box("route_mask", cfg.route_points),
    })


def flat_space(space: spaces.Dict) -> spaces.Box:
    """The ``Box (F,)`` of ``ObsConfig(flat=True)``: ``gymnasium.spaces.flatten_space`` of the Dict."""
    return spaces.flatten_space(space)


# The Dict space's key order (gymnasium sorts a plain dict's keys), which the flat layout follows.
FLAT_KEYS = ("agents", "agents_mask", "map", "map_mask", "map_type", "route", "route_mask", "self")


def flatten(obs: dict[str, torch.Tensor], batch_dims: int = 1) -> torch.Tensor:
    """Batched ``gymnasium.spaces.flatten`` of ``observation_space``'s Dict: the entries of ``obs`` (leading
    ``batch_dims`` axes, then the space's shapes) concatenated in ``FLAT_KEYS`` order -> ``(*batch, F)``."""
    parts = [obs[k].reshape(*obs[k].shape[:batch_dims], -1) for k in FLAT_KEYS]
    return torch.cat(parts, dim=-1)


def _take(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x[b, a]`` for ``(B, A, ...)`` tensors and ``(B, O)`` observer indices -> ``(B, O, ...)``."""
    return x[b[:, None], a]


def observe(state: SimState, observers: torch.Tensor, cfg: ObsConfig) -> dict[str, torch.Tensor]:
    """Observations of ``observers`` ``(B, O)`` long agent indices -> dict of ``(B, O, ...)`` float32 tensors."""
    dev = state.device
    bsz, o = observers.shape
    b = torch.arange(bsz, device=dev)
    cur = state.current  # (B, A, 5)
    live = state.current_valid & state.agent_mask  # (B, A)
    me = _take(cur, b, observers)  # (B, O, 5)
    my_xy, my_h = me[..., :2], me[..., 2]

    # ---- self ------------------------------------------------------------------------------------------
    prev = state.at(state.traj, (state.t - 1).clamp(min=0))
    speed = cur[..., 3:5].norm(dim=-1)
    accel = (speed - prev[..., 3:5].norm(dim=-1)) / state.dt
    accel = torch.where(state.t[:, None] >= 1, accel, torch.zeros_like(accel))
    yaw_rate = wrap_angle(cur[..., 2] - prev[..., 2]) / state.dt
    yaw_rate = torch.where(state.t[:, None] >= 1, yaw_rate, torch.zeros_like(yaw_rate))
    self_feat = torch.stack([speed, accel, yaw_rate, state.extent[..., 0], state.extent[..., 1]], dim=-1)
    self_feat = _take(self_feat, b, observers)  # (B, O, 5)

    # ---- nearest agents --------------------------------------------------------------------------------
    k = min(cfg.num_agents, max(state.num_agents - 1, 1))
    d = (cur[:, None, :, :2] - my_xy[:, :, None, :]).norm(dim=-1)  # (B, O, A)
    visible = live[:, None, :] & (d <= cfg.radius)
    visible &= observers[..., None] != torch.arange(state.num_agents, device=dev)  # not oneself
    d = torch.where(visible, d, torch.full_like(d, float("inf")))
    near_d, near = d.topk(k, dim=-1, largest=False)  # (B, O, k)
    near_ok = torch.isfinite(near_d)
    other = cur[b[:, None, None], near]  # (B, O, k, 5)
    rel_xy = to_local(other[..., :2], my_xy, my_h)  # (B, O, k, 2)
    dh = other[..., 2] - my_h[..., None]
    rel_v = rotate_to_local(other[..., 3:5], my_h)
    ext = state.extent[b[:, None, None], near]
    onehot = torch.nn.functional.one_hot(state.agent_type[b[:, None, None], near], len(AgentType)).float()
    agents = torch.cat([rel_xy, torch.cos(dh)[..., None], torch.sin(dh)[..., None], rel_v, ext, onehot], dim=-1)
    agents = agents * near_ok[..., None]
    agents_out = torch.zeros(bsz, o, cfg.num_agents, len(AGENT_FEATURES), device=dev)
    agents_mask = torch.zeros(bsz, o, cfg.num_agents, device=dev)
    agents_out[:, :, :k], agents_mask[:, :, :k] = agents, near_ok.float()

    # ---- nearest map chunks ----------------------------------------------------------------------------
    maps = state.maps
    mi = state.map_idx  # (B,)
    chunk_count = maps.chunks.shape[1]
    centres = _chunk_centres(maps)[mi]  # (B, C, 2)
    cd = (centres[:, None] - my_xy[:, :, None]).norm(dim=-1)  # (B, O, C)
    cd = torch.where(maps.chunk_valid[mi][:, None] & (cd <= cfg.radius), cd, torch.full_like(cd, float("inf")))
    kc = min(cfg.num_map_chunks, chunk_count)
    chunk_d, chunk_idx = cd.topk(kc, dim=-1, largest=False)  # (B, O, kc)
    chunk_ok = torch.isfinite(chunk_d)
    flat = mi[:, None, None] * chunk_count + chunk_idx
    pts = maps.chunks.reshape(-1, *maps.chunks.shape[2:])[flat]  # (B, O, kc, N, 2)
    pmask = maps.chunk_mask.reshape(-1, maps.chunk_mask.shape[-1])[flat] & chunk_ok[..., None]
    local = to_local(pts.reshape(bsz, o, -1, 2), my_xy, my_h).reshape(pts.shape) * pmask[..., None]
    ctype = maps.chunk_type.reshape(-1)[flat]  # (B, O, kc)
    type_onehot = torch.stack([ctype == int(t) for t in MAP_TYPES], dim=-1).float() * chunk_ok[..., None]
    n = maps.chunks.shape[2]
    map_out = torch.zeros(bsz, o, cfg.num_map_chunks, n, 2, device=dev)
    map_mask = torch.zeros(bsz, o, cfg.num_map_chunks, n, device=dev)
    map_type = torch.zeros(bsz, o, cfg.num_map_chunks, len(MAP_TYPES), device=dev)
    map_out[:, :, :kc], map_mask[:, :, :kc], map_type[:, :, :kc] = local, pmask.float(), type_onehot

    # ---- route along the logged path ------------------------------------------------------------------
    route, route_mask = _route(state, observers, cfg, my_xy, my_h)

    out = {"self": self_feat, "agents": agents_out, "agents_mask": agents_mask, "map": map_out,
           "map_mask": map_mask, "map_type": map_type, "route": route, "route_mask": route_mask}
    out = {k: v.clamp(-FEATURE_LIMIT, FEATURE_LIMIT) for k, v in out.items()}
    if cfg.normalize:
        out = {k: v / v.new_tensor(SCALES[k]) if k in SCALES else v for k, v in out.items()}
    return out


# MapBatch map ids -> (weak reference to the chunks tensor the centres were computed from, the centres). Keyed by
# the map ids, never by id(): a dead tensor's id can be reused by another map's. The reference check serves an
# entry only to the very tensor it was computed from (two batches of equally named maps never share one).
_CENTRE_CACHE: dict[tuple[str, ...], tuple[weakref.ref, torch.Tensor]] = {}


def _chunk_centres(maps) -> torch.Tensor:
    """``(M, C, 2)`` mean of each chunk's valid points (cached per MapBatch)."""
    key = tuple(maps.map_ids)
    hit = _CENTRE_CACHE.get(key)
    if hit is None or hit[0]() is not maps.chunks:
        w = maps.chunk_mask.float()[..., None]
        _CENTRE_CACHE.clear()  # one live MapBatch at a time is the common case; keep memory bounded
        hit = _CENTRE_CACHE[key] = (weakref.ref(maps.chunks), (maps.chunks * w).sum(-2) / w.sum(-2).clamp(min=1))
    return hit[1]


def _route(state: SimState, observers: torch.Tensor, cfg: ObsConfig, my_xy, my_h):
    """Points every ``route_spacing`` m ahead of the observer's tracked position on its logged path."""
    bsz, _ = observers.shape
    b = torch.arange(bsz, device=state.device)[:, None]
    stride = max(1, round(cfg.route_spacing / ROUTE_SPACING))
    ahead = torch.arange(1, cfg.route_points + 1, device=state.device) * stride
    idx = state.route_pos[b, observers][..., None] + ahead  # (B, O, R)
    length = state.route_len[b, observers][..., None]
    ok = idx < length
    routes = state.route_xy[b, observers]  # (B, O, P, 2)
    idx = torch.minimum(idx, (length - 1).clamp(min=0))
    world = routes.gather(2, idx[..., None].expand(*idx.shape, 2))
    local = to_local(world, my_xy, my_h) * ok[..., None]
    return local, ok.float()


def take_slot(obs, index):
    """One slot (or a selection of slots) of a batched observation: a dict of arrays or one flat array."""
    return {k: v[index] for k, v in obs.items()} if isinstance(obs, dict) else obs[index]


def to_numpy(obs: dict[str, torch.Tensor], index=None) -> dict[str, np.ndarray]:
    """Tensors -> float32 numpy arrays (optionally indexing the leading axes first)."""
    return {k: (v if index is None else v[index]).detach().cpu().numpy().astype(np.float32, copy=False)
            for k, v in obs.items()}
