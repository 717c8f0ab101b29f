"""Videos of scenes and episodes: frames from ``render/renderer.py``, written with imageio (+ffmpeg for mp4).

    frames = rollout_frames(env, policy)                    # an env episode, one frame per step
    write_video(frames, "out/episode.mp4", fps=10)          # mp4 or gif, by extension
    record_log_replay(ds, "DR_USA_Town_Grid_val_0", "docs/rollout.gif")

The output path is checked (extension, writability) before anything is rendered, so a typo fails in
milliseconds, not after a long rollout. Gymnasium's own ``RecordVideo`` wrapper works on the envs too (they
offer ``render_mode="rgb_array"`` and ``metadata["render_fps"]``; it needs ``moviepy``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from envs.errors import RenderError, UnknownNameError, VideoWriteError
from envs.types import MapData, SimState
from render.renderer import RenderConfig, render_engine, render_frame, resolve_view

VIDEO_FORMATS = (".gif", ".mp4")


def check_video_path(path: str | Path) -> Path:
    """Validate an output video path: a known extension and a writable location (parents are created).

    Raises ``UnknownNameError`` for another extension and ``VideoWriteError`` for a path that cannot be written.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_FORMATS:
        raise UnknownNameError("video extension", ext or "(none)", VIDEO_FORMATS,
                               fix=f"Name the file e.g. {path.with_suffix('.mp4').name!r}.")
    if path.is_dir():
        raise VideoWriteError(f"Video path {str(path)!r} is a directory; give a file name such as "
                              f"{str(path / ('video' + ext))!r}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VideoWriteError(f"Cannot create the folder {str(path.parent)!r} for video {str(path)!r}: {e}. "
                              f"Write to a folder you own.") from e
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise VideoWriteError(f"Video path {str(path)!r} is not writable (permissions). Write to a folder you own.")
    return path


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even height/width by repeating the last row/column (H.264 in yuv420p needs even sizes)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_video(frames: Iterable[np.ndarray], path: str | Path, fps: float) -> Path:
    """Write ``uint8 (H, W, 3)`` frames to ``path``: ``.mp4`` (H.264 via ffmpeg, streamed) or ``.gif`` (looping).

    ``fps``: frames per second of playback (the scene's real-time rate is ``1 / dt``). Returns the path.
    """
    path = check_video_path(path)
    if not fps > 0:
        raise RenderError(f"fps must be > 0, got {fps}.")
    import imageio.v2 as imageio

    count = 0
    if path.suffix.lower() == ".gif":
        # GIF delays are whole centiseconds; Pillow quantises each frame to an adaptive 256-colour palette.
        frames = [np.asarray(f, np.uint8) for f in frames]
        if not frames:
            raise RenderError("write_video got no frames.")
        imageio.mimsave(path, frames, format="GIF", duration=1000.0 / fps, loop=0)
        return path
    try:
        writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=7,
                                    pixelformat="yuv420p", macro_block_size=1)
    except OSError as e:
        raise VideoWriteError(f"Cannot open {str(path)!r} for writing: {e}") from e
    with writer:
        for frame in frames:
            writer.append_data(_even(np.asarray(frame, np.uint8)))
            count += 1
    if count == 0:
        path.unlink(missing_ok=True)
        raise RenderError("write_video got no frames.")
    return path


def log_state(state: SimState) -> SimState:
    """The same scenes with the logged trajectory as their simulated one (what the data recorded)."""
    return replace(state, traj=state.log, valid=state.log_valid & state.agent_mask[..., None])


def side_by_side_frame(state: SimState, map_data: MapData | None = None, batch_index: int = 0,
                       config: RenderConfig = RenderConfig(), **kwargs) -> np.ndarray:  # noqa: B008 (frozen)
    """The logged scene (left) and the simulated one (right) at the current step, under one camera (the
    simulated scene's), as ``uint8 (H, 2 W + 4, 3)`` with a 4 px divider. ``kwargs`` go to the simulated half."""
    view = resolve_view(state, batch_index, config)
    log_kwargs = {k: v for k, v in kwargs.items() if k == "traffic_lights"}
    left = render_frame(log_state(state), map_data, batch_index, config, view=view,
                        driven_by=np.full(state.num_agents, -1), title="log", **log_kwargs)
    right = render_frame(state, map_data, batch_index, config, view=view, title="simulated",
                         **{k: v for k, v in kwargs.items() if k != "title"})
    divider = np.full((config.height, 4, 3), 40, np.uint8)
    return np.concatenate([left, divider, right], axis=1)


def rollout_frames(env, policy: Callable[[object], np.ndarray] | None = None, *, scene_id: str | None = None,
                   seed: int | None = None, max_steps: int | None = None, side_by_side: bool = False,
                   config: RenderConfig | None = None) -> list[np.ndarray]:
    """Run one episode of a trafficgym env (``gym.make`` result or unwrapped) and return its frames.

    Args:
        policy: ``obs -> action``; default: zero action (the dynamics' "keep going", e.g. constant speed).
        scene_id: the scene to play (an unknown id raises ``UnknownNameError`` listing the known ones).
        side_by_side: frames of ``side_by_side_frame`` (log | simulated) instead of the simulated scene alone.
        config: the look; default the env's ``render_config``.
    Returns ``len = steps + 1`` frames (the reset state, then one per step). The env need not have a
    ``render_mode``: frames come from the renderer directly.
    """
    inner = env.unwrapped
    config = config or getattr(inner, "render_config", None) or RenderConfig()
    obs, _ = env.reset(seed=seed, options={"scene_id": scene_id} if scene_id is not None else None)

    def frame() -> np.ndarray:
        if side_by_side:
            st = inner.engine.state
            map_data = inner.engine.dataset.map(st.maps.map_ids[int(st.map_idx[0])])
            from render.renderer import driven_by_of

            return side_by_side_frame(st, map_data, 0, config, driven_by=driven_by_of(inner.engine, 0))
        return render_engine(inner.engine, 0, config)

    frames = [frame()]
    steps = 0
    while max_steps is None or steps < max_steps:
        action = policy(obs) if policy is not None else np.zeros(env.action_space.shape, env.action_space.dtype)
        obs, _, terminated, truncated, _ = env.step(action)
        frames.append(frame())
        steps += 1
        if terminated or truncated:
            break
    return frames


def record_episode(env, path: str | Path, policy: Callable[[object], np.ndarray] | None = None,
                   fps: float | None = None, **rollout_kwargs) -> Path:
    """``rollout_frames`` written to ``path`` at ``fps`` (default: real time, ``env.metadata["render_fps"]``).

    The path is checked before the episode runs."""
    path = check_video_path(path)
    frames = rollout_frames(env, policy, **rollout_kwargs)
    return write_video(frames, path, fps or env.unwrapped.metadata["render_fps"])


def record_log_replay(dataset, scene_id: str, path: str | Path, config: RenderConfig | None = None,
                      fps: float | None = None, start_step: int = 0, every: int = 1) -> Path:
    """Render a dataset scene's log (every agent replaying its track) to ``path``.

    Args:
        dataset: an ``envs.data`` ``SceneDataset``; ``scene_id`` one of its ids (``UnknownNameError`` otherwise).
        fps: playback rate; default real time (``1 / (dt * every)``).
        every: keep every ``every``-th step (smaller files; real-time playback is kept by the default fps).
    """
    import torch

    from envs import sim

    path = check_video_path(path)  # before any work
    scene = dataset[dataset.index_of(scene_id)]
    config = config or RenderConfig()
    if scene.ego_index < 0 or not scene.valid[scene.ego_index, start_step]:  # any live agent centres the camera
        live = np.flatnonzero(scene.valid[:, start_step])
        if len(live) == 0:
            raise RenderError(f"Scene {scene_id!r} has no agent at step {start_step}.")
        scene = replace(scene, ego_index=int(live[0]))
    state = log_state(sim.reset([scene], start_step=start_step, controlled="none"))
    frames = []
    for t in range(start_step, scene.num_steps, every):
        st = replace(state, t=torch.full_like(state.t, t))
        frames.append(render_frame(st, scene.map, 0, config))
    return write_video(frames, path, fps or 1.0 / (scene.dt * every))
