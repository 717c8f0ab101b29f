"""Fast offscreen frames of a batched ``SimState``: ``render_frame(state, map_data) -> uint8 (H, W, 3)``.

Drawn with pygame on an offscreen surface (no window, no display: set ``SDL_VIDEODRIVER=dummy`` on headless
machines). The static map is drawn once per map and scale into cached tiles (``render/map_layer.py``); a frame
blits the tiles its camera sees and draws the dynamic layer on top: agents as oriented boxes with a heading mark,
filled by type (the ego in red, as in ``render/map_figure.py``) and outlined by the policy that drives them, short
trails, collision / off-road rings, traffic lights, optional ids, a scale bar and a HUD with the sim time and a
few live metrics.

World frame: x right, y up, metres. Frame pixels: column ``u = x * ppm - ox``, row ``v = oy - y * ppm`` for a
``View`` with scale ``ppm`` (px/m) and integer origin ``(ox, oy)``; whole pixels, so map tiles and agents align.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pygame
import torch

from envs.errors import RenderError, ResetNeededError
from envs.geometry import box_corners
from envs.types import AgentType, MapData, SimState, TrafficLightState
from render.map_figure import EGO_COLOR, TYPE_COLORS
from render.map_layer import BACKGROUND, MapLayerCache

CAMERAS = ("ego", "scene", "window")


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


# Fill colour per AgentType (rows indexed by the type value), consistent with the matplotlib still pictures.
TYPE_RGB = np.array([_rgb(TYPE_COLORS[t]) for t in sorted(AgentType)], np.int64)  # (4, 3)
EGO_RGB = _rgb(EGO_COLOR)
LOG_OUTLINE = (70, 70, 70)  # agents replaying their log: thin dark outline
# Outline colour per driving policy (``driven_by`` value k >= 0 uses entry k mod len); 0 = the env's caller.
POLICY_RGB = ((20, 20, 20), (148, 103, 189), (23, 190, 207), (188, 189, 34), (227, 119, 194), (140, 86, 75))
COLLISION_RGB = (255, 23, 68)  # rings are drawn without anti-aliasing, so tests can find this exact colour
OFFROAD_RGB = (255, 145, 0)
LIGHT_RGB = {TrafficLightState.UNKNOWN: (150, 150, 150), TrafficLightState.GREEN: (40, 180, 70),
             TrafficLightState.RED: (220, 40, 40)}
TEXT_RGB = (25, 25, 25)
NICE_LENGTHS_M = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass(frozen=True)
class RenderConfig:
    """How frames look.

    Attributes:
        width / height: frame size, px.
        px_per_m: scale of the ``"ego"`` camera, px/m (the others fit their window into the frame).
        camera: ``"ego"`` (centred on the ego, north up), ``"scene"`` (fits every logged position of the scene,
            fixed for the whole episode) or ``"window"`` (the fixed world rectangle ``window``).
        window: ``(min_x, min_y, max_x, max_y)`` in m, for ``camera="window"``.
        scene_margin_m: margin around the logged positions for ``camera="scene"``, m.
        trail_steps: steps of recent motion drawn behind each agent (0: none).
        show_ids / show_metrics / show_scale_bar: agent slot indices, the HUD, the scale bar.
        highlight_collisions / highlight_offroad: rings around colliding / off-road agents.
    """

    width: int = 512
    height: int = 512
    px_per_m: float = 6.0
    camera: str = "ego"
    window: tuple[float, float, float, float] | None = None
    scene_margin_m: float = 8.0
    trail_steps: int = 10
    show_ids: bool = False
    show_metrics: bool = True
    show_scale_bar: bool = True
    highlight_collisions: bool = True
    highlight_offroad: bool = True

    def __post_init__(self):
        if not (16 <= self.width <= 8192 and 16 <= self.height <= 8192):
            raise RenderError(f"Frame size {self.width}x{self.height} px outside [16, 8192]; pick e.g. 512x512.")
        if not self.px_per_m > 0:
            raise RenderError(f"px_per_m must be > 0, got {self.px_per_m}.")
        if self.camera not in CAMERAS:
            raise RenderError(f"Unknown camera {self.camera!r}; expected one of {CAMERAS}.")
        if self.camera == "window":
            if self.window is None or len(self.window) != 4:
                raise RenderError("camera='window' needs window=(min_x, min_y, max_x, max_y) in metres.")
            x0, y0, x1, y1 = self.window
            if not (x1 > x0 and y1 > y0):
                raise RenderError(f"window {self.window} must have max_x > min_x and max_y > min_y.")
        if self.trail_steps < 0:
            raise RenderError(f"trail_steps must be >= 0, got {self.trail_steps}.")


@dataclass(frozen=True)
class View:
    """A resolved camera: ``ppm`` px/m and the integer world-pixel origin ``(ox, oy)`` of the frame's top-left."""

    ppm: float
    origin_px: tuple[int, int]

    def to_px(self, xy: np.ndarray) -> np.ndarray:
        """World points ``(..., 2)`` (m) to frame pixels ``(..., 2)`` (float, column, row)."""
        ox, oy = self.origin_px
        return np.stack([xy[..., 0] * self.ppm - ox, oy - xy[..., 1] * self.ppm], axis=-1)


def view_centred(centre_xy: tuple[float, float], ppm: float, width: int, height: int) -> View:
    return View(float(ppm), (int(round(centre_xy[0] * ppm - width / 2)), int(round(centre_xy[1] * ppm + height / 2))))


def view_fitting(bounds: tuple[float, float, float, float], width: int, height: int) -> View:
    """The largest scale that shows the world rectangle ``bounds`` whole, centred in the frame."""
    x0, y0, x1, y1 = bounds
    ppm = min(width / max(x1 - x0, 1e-3), height / max(y1 - y0, 1e-3))
    return view_centred(((x0 + x1) / 2, (y0 + y1) / 2), ppm, width, height)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def resolve_view(state: SimState, batch_index: int, config: RenderConfig) -> View:
    """The camera of ``config`` on scene ``batch_index`` at its current step."""
    b = batch_index
    w, h = config.width, config.height
    if config.camera == "window":
        return view_fitting(config.window, w, h)
    if config.camera == "scene":
        pts = _np(state.log[b, :, :, :2])[_np(state.log_valid[b] & state.agent_mask[b][:, None])]
        if len(pts) == 0:
            pts = np.zeros((1, 2))
        m = config.scene_margin_m
        return view_fitting((pts[:, 0].min() - m, pts[:, 1].min() - m, pts[:, 0].max() + m, pts[:, 1].max() + m),
                            w, h)
    t, ego = int(state.t[b]), int(state.ego[b])
    valid = _np(state.valid[b, ego, : t + 1])
    if valid.any():  # the ego's latest pose (it may have been removed since)
        last = int(np.flatnonzero(valid)[-1])
        centre = _np(state.traj[b, ego, last, :2])
    else:
        centre = _np(state.log[b, ego, :, :2])[_np(state.log_valid[b, ego])].mean(0)
    return view_centred((float(centre[0]), float(centre[1])), config.px_per_m, w, h)


# ---- module caches: the map tiles, text surfaces and frame surfaces outlive one call --------------------------
MAP_CACHE = MapLayerCache()
_FONTS: dict[int, pygame.font.Font] = {}
_TEXT: dict[tuple[str, int, tuple], pygame.Surface] = {}
_SURFACES: dict[tuple[int, int], pygame.Surface] = {}


def _font(size: int) -> pygame.font.Font:
    if size not in _FONTS:
        if not pygame.font.get_init():
            pygame.font.init()
        _FONTS[size] = pygame.font.Font(None, size)  # pygame's bundled font: no system fonts needed
    return _FONTS[size]


def _text(s: str, size: int, colour: tuple = TEXT_RGB) -> pygame.Surface:
    key = (s, size, colour)
    surf = _TEXT.get(key)
    if surf is None:
        if len(_TEXT) > 4096:  # sim times and metric values keep changing: bound the cache
            _TEXT.clear()
        surf = _TEXT[key] = _font(size).render(s, True, colour)
    return surf


def _surface(width: int, height: int) -> pygame.Surface:
    if (width, height) not in _SURFACES:
        _SURFACES[(width, height)] = pygame.Surface((width, height), depth=32)
    return _SURFACES[(width, height)]


def _to_array(surf: pygame.Surface) -> np.ndarray:
    w, h = surf.get_size()
    return np.frombuffer(pygame.image.tobytes(surf, "RGB"), np.uint8).reshape(h, w, 3).copy()


def _map_for(state: SimState, b: int, map_data: MapData | None) -> MapData:
    map_id = state.maps.map_ids[int(state.map_idx[b])]
    if map_data is None:
        sources = getattr(state.maps, "sources", None)
        if not sources:
            raise RenderError(f"Scene {state.scene_ids[b]!r} needs its MapData; pass map_data "
                              f"(dataset.map({map_id!r})).")
        map_data = sources[int(state.map_idx[b])]
    if map_data.map_id != map_id:
        raise RenderError(f"map_data is {map_data.map_id!r} but scene {state.scene_ids[b]!r} (batch row {b}) uses "
                          f"{map_id!r}; pass dataset.map({map_id!r}).")
    return map_data


def _per_agent(value, b: int, num_agents: int, name: str) -> np.ndarray:
    """A ``(B, A)`` or ``(A,)`` array/tensor reduced to row ``b``, shape-checked."""
    arr = _np(value)
    if arr.ndim == 2:
        arr = arr[b]
    if arr.shape != (num_agents,):
        raise RenderError(f"{name} has shape {_np(value).shape}; expected (A,) = ({num_agents},) or (B, A).")
    return arr


def render_frame(state: SimState, map_data: MapData | None = None, batch_index: int = 0,
                 config: RenderConfig = RenderConfig(), driven_by: np.ndarray | None = None,  # noqa: B008 (frozen)
                 metrics: Mapping | None = None, traffic_lights: tuple[np.ndarray, np.ndarray] | None = None,
                 hud: Mapping[str, object] | None = None, view: View | None = None,
                 title: str | None = None) -> np.ndarray:
    """Draw scene ``batch_index`` of ``state`` at its current step: ``uint8 (config.height, config.width, 3)``.

    Args:
        state: batched ``SimState`` (torch, any device; read only).
        map_data: the scene's full ``MapData`` (``SimState`` only carries the SDF and chunks); default: the
            ``MapBatch``'s own copy when it has one. Its static drawing is cached per map id and scale.
        driven_by: ``(A,)`` small ints: which policy drives each agent (-1: log replay, 0: the env's caller,
            k >= 1: traffic policy k); sets the outline colour. Default: 0 for ``state.controlled``, else -1.
        metrics: ``(B, A)`` or ``(A,)`` bool ``"collision"`` / ``"offroad"`` (e.g. the step's own metrics);
            default: computed with ``envs.metrics.compute_step_metrics``.
        traffic_lights: ``(lane polyline indices (K,), TrafficLightState (K,))`` at this step, drawn as a bar
            across the start of each signal-controlled lane (its stop line). ``SimState`` has no light tensors
            yet (the towns data has none), so nothing is drawn unless this is given.
        hud: extra HUD lines, ``{label: value}`` (floats shown to 3 significant digits).
        view: an explicit camera (``resolve_view``), overriding ``config.camera`` (side-by-side videos share one).
        title: HUD heading; default the scene id.

    Not thread-safe (the module caches a pygame surface per frame size); the returned array is a fresh copy.
    """
    if not 0 <= batch_index < state.batch_size:
        raise RenderError(f"batch_index {batch_index} outside [0, {state.batch_size}) (the state holds "
                          f"{state.batch_size} scenes).")
    b = batch_index
    map_data = _map_for(state, b, map_data)
    view = view or resolve_view(state, b, config)
    surf = _surface(config.width, config.height)
    MAP_CACHE.blit_map(surf, map_data, view.ppm, view.origin_px)

    a_count = state.num_agents
    t = int(state.t[b])
    ego = int(state.ego[b])
    live = _np(state.valid[b, :, t] & state.agent_mask[b])  # (A,)
    if driven_by is None:
        driven_by = np.where(_np(state.controlled[b]), 0, -1)
    driven_by = _per_agent(driven_by, b, a_count, "driven_by").astype(np.int64)
    if metrics is None or "collision" not in metrics or "offroad" not in metrics:
        from envs.metrics import compute_step_metrics

        with torch.inference_mode():
            metrics = {**(metrics or {}), **compute_step_metrics(state, ["collision", "offroad"])}
    collided = _per_agent(metrics["collision"], b, a_count, "metrics['collision']").astype(bool) & live
    offroad = _per_agent(metrics["offroad"], b, a_count, "metrics['offroad']").astype(bool) & live

    if traffic_lights is not None:
        _draw_lights(surf, view, map_data, traffic_lights)
    cur = _np(state.traj[b, :, t])  # (A, 5)
    extent = _np(state.extent[b])  # (A, 2)
    kind = np.clip(_np(state.agent_type[b]), 0, len(TYPE_RGB) - 1)
    fill = TYPE_RGB[kind].copy()  # (A, 3)
    fill[ego] = EGO_RGB
    if config.trail_steps > 0 and t > 0:
        t0 = max(0, t - config.trail_steps)
        trail_px = view.to_px(_np(state.traj[b, :, t0:t + 1, :2]))  # (A, k + 1, 2)
        trail_ok = _np(state.valid[b, :, t0:t + 1]) & live[:, None]
        trail_rgb = (0.45 * fill + 0.55 * np.array(BACKGROUND)).astype(np.int64)  # faded agent colour
        width = max(1, int(round(0.5 * view.ppm)))
        for i in np.flatnonzero(trail_ok.sum(1) >= 2):
            pygame.draw.lines(surf, trail_rgb[i].tolist(), False, trail_px[i][trail_ok[i]].tolist(), width)

    corners = view.to_px(box_corners(cur[:, 0], cur[:, 1], cur[:, 2], extent[:, 0], extent[:, 1]))  # (A, 4, 2)
    centre = corners.mean(1)  # (A, 2)
    lo, hi = corners.min(1), corners.max(1)
    on_screen = live & (hi[:, 0] >= 0) & (lo[:, 0] < config.width) & (hi[:, 1] >= 0) & (lo[:, 1] < config.height)
    # Heading mark: a darker arrow head from 40 % of the box length back to the middle of the front edge.
    # Corner order (box_corners): front-left, rear-left, rear-right, front-right.
    front_mid = 0.5 * (corners[:, 0] + corners[:, 3])
    nose = np.stack([corners[:, 0] + 0.4 * (corners[:, 1] - corners[:, 0]), front_mid,
                     corners[:, 3] + 0.4 * (corners[:, 2] - corners[:, 3])], 1)  # (A, 3, 2)
    dark = (0.55 * fill).astype(np.int64)
    order = np.flatnonzero(on_screen & (np.arange(a_count) != ego))
    if on_screen[ego]:
        order = np.append(order, ego)  # ego on top
    corner_list, nose_list = corners.tolist(), nose.tolist()
    fill_list, dark_list = fill.tolist(), dark.tolist()
    for i in order:
        pygame.draw.polygon(surf, fill_list[i], corner_list[i])
        pygame.draw.polygon(surf, dark_list[i], nose_list[i])
        k = driven_by[i]
        if k < 0:
            pygame.draw.polygon(surf, LOG_OUTLINE, corner_list[i], 1)
        else:
            pygame.draw.polygon(surf, POLICY_RGB[k % len(POLICY_RGB)], corner_list[i], 2)

    radius = 0.5 * np.hypot(extent[:, 0], extent[:, 1]) * view.ppm + 4  # px
    for flags, colour, on in ((offroad, OFFROAD_RGB, config.highlight_offroad),
                              (collided, COLLISION_RGB, config.highlight_collisions)):
        if on:
            for i in np.flatnonzero(flags & on_screen):
                pygame.draw.circle(surf, colour, centre[i].tolist(), float(radius[i]), 3)

    small = max(11, config.height // 40)
    if config.show_ids:
        for i in order:
            label = _text(str(i), small)
            surf.blit(label, (int(hi[i, 0]) + 1, int(lo[i, 1]) - small // 2))
    if config.show_scale_bar:
        _draw_scale_bar(surf, view.ppm, small)
    if config.show_metrics:
        lines = [title if title is not None else str(state.scene_ids[b]),
                 f"t = {t * state.dt:5.1f} s   step {t}/{int(state.end[b])}"]
        if live[ego]:
            lines.append(f"ego {float(np.hypot(cur[ego, 3], cur[ego, 4])):4.1f} m/s")
        lines.append(f"agents {int(live.sum())}   collisions {int(collided.sum())}   off-road {int(offroad.sum())}")
        for key, value in (hud or {}).items():
            lines.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
        _draw_hud(surf, lines, max(12, config.height // 32))
    return _to_array(surf)


def _draw_lights(surf: pygame.Surface, view: View, map_data: MapData,
                 traffic_lights: tuple[np.ndarray, np.ndarray]) -> None:
    lanes, states = (np.asarray(v).reshape(-1) for v in traffic_lights)
    if lanes.shape != states.shape:
        raise RenderError(f"traffic_lights: {lanes.shape[0]} lanes but {states.shape[0]} states.")
    width = max(3, int(round(0.6 * view.ppm)))
    for lane, light in zip(lanes.tolist(), states.tolist(), strict=True):
        if not 0 <= lane < map_data.num_polylines:
            raise RenderError(f"traffic_lights: lane {lane} is not a polyline of map {map_data.map_id!r}.")
        pts = map_data.polyline(lane).astype(np.float64)
        if len(pts) < 2:
            continue
        d = pts[1] - pts[0]
        normal = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-9)
        ends = view.to_px(np.stack([pts[0] + 1.6 * normal, pts[0] - 1.6 * normal]))
        colour = LIGHT_RGB.get(TrafficLightState(light), LIGHT_RGB[TrafficLightState.UNKNOWN])
        pygame.draw.line(surf, colour, ends[0].tolist(), ends[1].tolist(), width)


def _draw_scale_bar(surf: pygame.Surface, ppm: float, font_px: int) -> None:
    w, h = surf.get_size()
    target = 0.18 * w  # px: the bar is about a fifth of the frame
    length = min(NICE_LENGTHS_M, key=lambda m: abs(m * ppm - target))
    px = max(1, int(round(length * ppm)))
    x0, y = 12, h - 14
    pygame.draw.line(surf, TEXT_RGB, (x0, y), (x0 + px, y), 3)
    for x in (x0, x0 + px):
        pygame.draw.line(surf, TEXT_RGB, (x, y - 5), (x, y + 4), 2)
    label = _text(f"{length} m", font_px)
    surf.blit(label, (x0 + (px - label.get_width()) // 2, y - 6 - label.get_height()))


_PANELS: dict[tuple[int, int], pygame.Surface] = {}


def _draw_hud(surf: pygame.Surface, lines: list[str], font_px: int) -> None:
    texts = [_text(s, font_px) for s in lines]
    pad = 6
    w = max(t.get_width() for t in texts) + 2 * pad
    line_h = font_px - 2
    h = line_h * len(texts) + 2 * pad
    size = (min(w, surf.get_width()), min(h, surf.get_height()))
    panel = _PANELS.get(size)
    if panel is None:  # translucent white backing, so text stays readable over any map
        panel = _PANELS[size] = pygame.Surface(size, pygame.SRCALPHA, 32)
        panel.fill((255, 255, 255, 200))
    surf.blit(panel, (6, 6))
    for i, text in enumerate(texts):
        surf.blit(text, (6 + pad, 6 + pad + i * line_h))


# ---- envs ---------------------------------------------------------------------------------------------------
def driven_by_of(engine, batch_index: int) -> np.ndarray:
    """``(A,)`` ``driven_by`` codes of an engine's scene: 0 for the caller's agents, k + 1 for traffic rule k,
    -1 for log replay and padding."""
    st = engine.state
    b = batch_index
    out = np.where(_np(st.controlled[b]), 0, -1)
    assignment = engine.assignment  # (B, A) traffic rule index, -1 for none
    if assignment is not None:
        rule = _np(assignment[b])
        out = np.where(rule >= 0, rule + 1, out)
    return out


def render_engine(engine, batch_index: int = 0,
                  config: RenderConfig = RenderConfig(), **kwargs) -> np.ndarray:  # noqa: B008 (frozen)
    """``render_frame`` of scene ``batch_index`` of a ``TrafficEngine`` (the envs' ``render()``)."""
    st = engine.state
    if st is None:
        raise ResetNeededError("Call reset() before render().")
    map_id = st.maps.map_ids[int(st.map_idx[batch_index])]
    return render_frame(st, engine.dataset.map(map_id), batch_index, config,
                        driven_by=driven_by_of(engine, batch_index), **kwargs)
