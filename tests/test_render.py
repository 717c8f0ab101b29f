"""The renderer (render/renderer.py), videos (render/video.py), the envs' render modes, and bad input."""

from __future__ import annotations

import warnings
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from envs import sim
from envs.errors import NoDisplayError, RenderError, UnknownNameError, VideoWriteError
from envs.types import AgentType, TrafficLightState
from render.renderer import (
    COLLISION_RGB,
    EGO_RGB,
    LIGHT_RGB,
    MAP_CACHE,
    OFFROAD_RGB,
    TYPE_RGB,
    RenderConfig,
    render_frame,
)
from render.video import rollout_frames, side_by_side_frame, write_video
from tests.scenes import make_scene, straight_road

# A 200x200 px window on x in [40, 60], y in [-10, 10] m: exactly 10 px/m, world (50, 0) at pixel (100, 100).
WINDOW = RenderConfig(width=200, height=200, camera="window", window=(40.0, -10.0, 60.0, 10.0), trail_steps=0,
                      show_metrics=False, show_scale_bar=False)


def _state(tracks, **kwargs):
    road = straight_road()
    return sim.reset([make_scene(tracks, map_data=road, **kwargs)], controlled="all"), road


def _count(frame: np.ndarray, rgb) -> int:
    return int(np.all(frame == np.asarray(rgb, np.uint8), axis=-1).sum())


def test_frame_shape_and_dtype():
    st, road = _state([dict(x0=50, y0=-1.75, speed=5)])
    for config in (RenderConfig(width=320, height=240), RenderConfig(width=321, height=199, camera="scene",
                                                                     show_ids=True)):
        frame = render_frame(st, road, config=config)
        assert frame.shape == (config.height, config.width, 3)
        assert frame.dtype == np.uint8
        assert frame.flags.writeable
        assert frame.std() > 0  # something was drawn


def test_agent_box_lands_on_known_pixels_in_its_colour():
    # Ego far to the left (x = 10); a vehicle centred at (50, -1.75) heading +x, 4.5 x 2 m, and a pedestrian.
    st, road = _state([dict(x0=10, y0=1.75), dict(x0=50, y0=-1.75, length=4.5, width=2.0),
                       dict(x0=45, y0=5.0, length=1.0, width=1.0, type=AgentType.PEDESTRIAN)])
    frame = render_frame(st, road, config=WINDOW)
    # Box: x 47.75..52.25 m -> columns 77.5..122.5; y -2.75..-0.75 m -> rows 107.5..127.5 (row = 100 - 10 y).
    vehicle = TYPE_RGB[AgentType.VEHICLE]
    body = frame[111:125, 81:100]  # inside the box, clear of its outline and of the heading mark
    assert np.all(body == vehicle), np.unique(body.reshape(-1, 3), axis=0)
    assert np.all(frame[117, 118] == (0.55 * vehicle).astype(np.uint8))  # heading mark at the front (+x)
    assert np.all(frame[117, 82] != frame[117, 118])  # ...and not at the back
    for row, col in ((117, 74), (117, 126), (104, 100), (131, 100)):  # just outside each side
        assert not np.all(frame[row, col] == vehicle)
    # Pedestrian: x 44.5..45.5, y 4.5..5.5 -> columns 45..55, rows 45..55.
    assert np.all(frame[50, 47] == TYPE_RGB[AgentType.PEDESTRIAN])
    assert _count(frame, EGO_RGB) == 0  # the ego is outside the window
    ego_view = render_frame(st, road, config=RenderConfig(width=200, height=200, px_per_m=10, trail_steps=0,
                                                          show_metrics=False, show_scale_bar=False))
    assert np.all(ego_view[97:104, 80:95] == EGO_RGB)  # the ego camera centres the ego (pixel 100, 100)


def test_collision_highlight_only_when_colliding():
    apart, road = _state([dict(x0=45, y0=-1.75), dict(x0=55, y0=-1.75)])
    overlap, _ = _state([dict(x0=48, y0=-1.75), dict(x0=51, y0=-1.75)])
    assert _count(render_frame(apart, road, config=WINDOW), COLLISION_RGB) == 0
    assert _count(render_frame(overlap, road, config=WINDOW), COLLISION_RGB) > 50
    # Passed-in metrics win over the computed ones.
    none = {"collision": np.zeros(2, bool), "offroad": np.zeros(2, bool)}
    assert _count(render_frame(overlap, road, config=WINDOW, metrics=none), COLLISION_RGB) == 0
    offroad, _ = _state([dict(x0=10, y0=1.75), dict(x0=50, y0=6.0)])  # a vehicle beyond the road edge (y 3.5)
    frame = render_frame(offroad, road, config=WINDOW)
    assert _count(frame, OFFROAD_RGB) > 50
    assert _count(frame, COLLISION_RGB) == 0


def test_traffic_lights_only_when_given():
    st, road = _state([dict(x0=10, y0=-1.75)])
    config = RenderConfig(width=200, height=200, camera="window", window=(-10.0, -10.0, 10.0, 10.0),
                          show_metrics=False)
    red = LIGHT_RGB[TrafficLightState.RED]
    assert _count(render_frame(st, road, config=config), red) == 0
    lit = render_frame(st, road, config=config, traffic_lights=(np.array([0]), np.array([TrafficLightState.RED])))
    assert _count(lit, red) > 20


def test_map_is_drawn_once_then_blitted():
    st, road = _state([dict(x0=50, y0=-1.75, speed=5)])
    config = RenderConfig(width=256, height=256, px_per_m=7.5)
    render_frame(st, road, config=config)
    drawn = MAP_CACHE.tiles_drawn
    for _ in range(3):
        render_frame(st, road, config=config)
    assert MAP_CACHE.tiles_drawn == drawn


def test_side_by_side_and_video_round_trip(tmp_path):
    st, road = _state([dict(x0=48, y0=-1.75, speed=5), dict(x0=60, y0=1.75, heading=np.pi, speed=4)])
    config = RenderConfig(width=96, height=64, px_per_m=4)
    pair = side_by_side_frame(st, road, config=config)
    assert pair.shape == (64, 2 * 96 + 4, 3)
    assert pair.dtype == np.uint8
    # Distinct frames (GIF writers merge identical consecutive ones): the 7 history steps 4..10 of the state.
    frames = [render_frame(replace(st, t=torch.full_like(st.t, t)), road, config=config) for t in range(4, 11)]
    import imageio.v2 as imageio

    mp4 = write_video(frames, tmp_path / "a" / "clip.mp4", fps=10)
    with imageio.get_reader(mp4) as reader:
        assert reader.count_frames() == 7
    gif = write_video(iter(frames), tmp_path / "clip.gif", fps=10)
    decoded = imageio.mimread(gif)
    assert len(decoded) == 7
    assert decoded[0].shape[:2] == (64, 96)


def test_bad_input_is_reported_clearly(tmp_path, tiny_env_kwargs):
    st, road = _state([dict(x0=50, y0=-1.75)])
    frames = [render_frame(st, road, config=WINDOW)]
    with pytest.raises(UnknownNameError, match=r"\.avi.*\.mp4"):
        write_video(frames, tmp_path / "clip.avi", fps=10)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(VideoWriteError, match="Cannot create the folder"):
        write_video(frames, tmp_path / "file" / "clip.mp4", fps=10)
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(VideoWriteError, match="is a directory"):
        write_video(frames, tmp_path / "dir.mp4", fps=10)
    # The path is checked before the episode runs: the env is never even reset.
    from render.video import record_episode

    env = gym.make("trafficgym/Ego-v0", **tiny_env_kwargs)
    with pytest.raises(VideoWriteError):
        record_episode(env, tmp_path / "file" / "ep.mp4")
    assert env.unwrapped.engine.state is None
    with pytest.raises(UnknownNameError, match="no_such_scene"):
        rollout_frames(env, scene_id="no_such_scene", max_steps=1)
    with pytest.raises(RenderError, match="batch_index 3"):
        render_frame(st, road, batch_index=3)
    with pytest.raises(RenderError, match="uses 'test:road'"):
        render_frame(st, straight_road(map_id="test:other"))
    with pytest.raises(RenderError, match="camera"):
        RenderConfig(camera="drone")
    with pytest.raises(RenderError, match="driven_by"):
        render_frame(st, road, driven_by=np.zeros(5))


def test_human_mode_without_display_says_so(monkeypatch, tiny_env_kwargs):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    with pytest.raises(NoDisplayError, match="rgb_array"):
        gym.make("trafficgym/Ego-v0", render_mode="human", **tiny_env_kwargs)
    env = gym.make("trafficgym/Ego-v0", render_mode="rgb_array", **tiny_env_kwargs)
    assert env.unwrapped.metadata["render_modes"] == ["rgb_array"]  # only what can work on this machine


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_env_rgb_array_frames_and_checker(env_id, tiny_env_kwargs):
    env = gym.make(env_id, render_mode="rgb_array", render_config=RenderConfig(width=128, height=96),
                   **tiny_env_kwargs)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (96, 128, 3)
    assert frame.dtype == np.uint8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught if "gymnasium" in w.filename] == []


def test_gymnasium_record_video_wrapper(tmp_path, tiny_env_kwargs):
    pytest.importorskip("moviepy")
    from gymnasium.wrappers import RecordVideo

    env = gym.make("trafficgym/Ego-v0", render_mode="rgb_array", render_config=RenderConfig(width=64, height=64),
                   **tiny_env_kwargs)
    env = RecordVideo(env, str(tmp_path / "videos"), episode_trigger=lambda episode: True, disable_logger=True)
    env.reset(seed=0)
    steps = 0
    while steps < 12:
        *_, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape, np.float32))
        steps += 1
        if terminated or truncated:
            break
    env.close()
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 1
    import imageio.v2 as imageio

    with imageio.get_reader(videos[0]) as reader:
        assert reader.count_frames() == steps + 1


def test_vector_env_renders_one_frame_per_env(tiny_env_kwargs):
    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=2, vectorization_mode="vector_entry_point",
                        render_mode="rgb_array", render_config=RenderConfig(width=64, height=48), **tiny_env_kwargs)
    venv.reset(seed=0)
    frames = venv.render()
    assert len(frames) == 2
    assert all(f.shape == (48, 64, 3) for f in frames)


def test_rollout_frames_one_per_step(tiny_env_kwargs):
    env = gym.make("trafficgym/SimAgents-v0", **tiny_env_kwargs)
    frames = rollout_frames(env, max_steps=4, side_by_side=True, config=RenderConfig(width=64, height=64))
    assert len(frames) == 5
    assert frames[0].shape == (64, 132, 3)
