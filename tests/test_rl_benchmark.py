"""The ego env as an RL benchmark: normalised and flat observations, the horizon in the spec, episode
statistics, the SB3 adapter's episode info / images / wrapper queries, small pickles and fork-safe async envs."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import envs  # noqa: F401  (registers the ids)
from envs.errors import InvalidOptionError
from envs.observation import SCALES, ObsConfig
from envs.rewards import RewardConfig


def _vec(kwargs, n=3, **more):
    return gym.make_vec("trafficgym/Ego-v0", num_envs=n, vectorization_mode="vector_entry_point", **kwargs, **more)


# ---- observations ---------------------------------------------------------------------------------------------

def test_normalized_observation_is_the_raw_one_divided_by_the_documented_scales(tiny_env_kwargs):
    raw_env = gym.make("trafficgym/Ego-v0", **tiny_env_kwargs)
    norm_env = gym.make("trafficgym/Ego-v0", obs=ObsConfig(normalize=True), **tiny_env_kwargs)
    raw, _ = raw_env.reset(options={"scene_index": 1})
    norm, _ = norm_env.reset(options={"scene_index": 1})
    for _ in range(5):
        raw, *_ = raw_env.step(np.array([0.2, 0.0], np.float32))
        norm, *_ = norm_env.step(np.array([0.2, 0.0], np.float32))
    assert raw["self"][0] > 1.0  # moving: the speed feature is not trivially 0
    for key in raw:
        scale = np.asarray(SCALES.get(key, 1.0), np.float32)
        np.testing.assert_allclose(norm[key], raw[key] / scale, rtol=1e-6, atol=1e-7)
    assert norm_env.observation_space.contains(norm)
    np.testing.assert_allclose(norm_env.observation_space["self"].high, 1000.0 / np.asarray(SCALES["self"]))
    assert norm_env.observation_space["agents_mask"].high.max() == 1.0


def test_flat_observation_is_gymnasiums_flatten_of_the_dict(tiny_env_kwargs):
    dict_env = gym.make("trafficgym/Ego-v0", obs=ObsConfig(normalize=True), **tiny_env_kwargs)
    flat_env = gym.make("trafficgym/Ego-v0", obs={"normalize": True, "flat": True}, **tiny_env_kwargs)
    d, _ = dict_env.reset(options={"scene_index": 2})
    f, _ = flat_env.reset(options={"scene_index": 2})
    space = flat_env.unwrapped.dict_observation_space
    assert space == dict_env.observation_space
    from envs.observation import FLAT_KEYS

    assert tuple(space.spaces) == FLAT_KEYS  # the order the batched flatten follows
    assert flat_env.observation_space.shape == (spaces.flatdim(space),)
    np.testing.assert_array_equal(f, spaces.flatten(space, d))
    back = spaces.unflatten(space, f)
    for key in d:
        np.testing.assert_array_equal(back[key], d[key])
    assert flat_env.observation_space.contains(f)

    venv = _vec(tiny_env_kwargs, obs={"normalize": True, "flat": True}, autoreset_mode="SameStep")
    obs, _ = venv.reset(options={"scene_index": [2, 0, 1]})
    assert obs.shape == (3, spaces.flatdim(space))
    np.testing.assert_array_equal(obs[0], f)
    for _ in range(80):  # through an episode end: final_obs is a flat vector too
        obs, _, term, trunc, info = venv.step(np.zeros((3, 2), np.float32))
        if (term | trunc).any():
            i = int(np.flatnonzero(term | trunc)[0])
            assert info["final_obs"][i].shape == f.shape
            break
    else:
        pytest.fail("no episode ended")


def test_flat_observations_pass_sb3s_env_checker(tiny_env_kwargs):
    from stable_baselines3.common.env_checker import check_env

    check_env(gym.make("trafficgym/Ego-v0", obs=ObsConfig(flat=True, normalize=True), **tiny_env_kwargs))


def test_flat_and_normalize_bad_input(tiny_env_kwargs):
    with pytest.raises(InvalidOptionError, match="ego env's layout"):
        gym.make("trafficgym/SimAgents-v0", obs=ObsConfig(flat=True), **tiny_env_kwargs)
    with pytest.raises(ValueError, match="normalize must be True or False"):
        ObsConfig(normalize="yes")
    with pytest.raises(ValueError, match="flat must be True or False"):
        ObsConfig(flat=1)
    from envs.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="normalise"):
        gym.make("trafficgym/Ego-v0", obs={"normalise": True}, **tiny_env_kwargs)


# ---- horizon and episode statistics ---------------------------------------------------------------------------

def test_spec_max_episode_steps_is_the_real_horizon(tiny_env_kwargs):
    env = gym.make("trafficgym/Ego-v0", **tiny_env_kwargs)
    assert env.spec.max_episode_steps == 80  # 91 frames, control from step 10
    env.reset(options={"scene_index": 0})
    steps, done = 0, False
    while not done:
        _, _, term, trunc, _ = env.step(np.zeros(2, np.float32))
        steps, done = steps + 1, term or trunc
    assert trunc and steps == env.spec.max_episode_steps
    later = gym.make("trafficgym/Ego-v0", start_step=30, **tiny_env_kwargs)
    assert later.spec.max_episode_steps == 60
    assert _vec(tiny_env_kwargs).spec.max_episode_steps == 80
    assert not isinstance(env, gym.wrappers.TimeLimit)  # the env truncates itself; no wrapper is added


def test_episode_stats_sum_the_episode(tiny_env_kwargs):
    # Reward = metres of progress only, so the episode's return must equal its progress.
    reward = RewardConfig(progress=1.0, collision=0.0, offroad=0.0, jerk=0.0, infeasible=0.0)
    venv = _vec(tiny_env_kwargs, reward=reward, autoreset_mode="SameStep")
    venv.reset(options={"scene_index": [0, 1, 2]})
    rewards = [[] for _ in range(3)]
    seen = {}
    actions = np.array([[0.0, 0.0], [0.3, 0.0], [0.5, 0.08]], np.float32)  # the last one crashes (see test_envs)
    for _ in range(80):
        _, r, term, trunc, info = venv.step(actions)
        for i in range(3):
            if i not in seen:
                rewards[i].append(r[i])
        for i in np.flatnonzero(term | trunc):
            if int(i) not in seen:
                assert info["_episode_stats"][i]
                seen[int(i)] = {k: info["episode_stats"][k][i] for k in ("return", "length", "collision",
                                                                          "offroad", "progress")}
        if len(seen) == 3:
            break
    assert len(seen) == 3
    for i, stats in seen.items():
        assert stats["length"] == len(rewards[i])
        assert stats["return"] == pytest.approx(sum(rewards[i]), abs=1e-6)
        assert stats["progress"] == pytest.approx(stats["return"], abs=1e-4)
    assert seen[0]["length"] == 80 and seen[0]["collision"] == 0.0
    assert seen[2]["length"] < 80 and max(seen[2]["collision"], seen[2]["offroad"]) == 1.0
    assert seen[1]["progress"] > seen[0]["progress"] > 0  # accelerating covers more of the route


# ---- the SB3 adapter ------------------------------------------------------------------------------------------

def test_sb3_adapter_reports_episodes_as_monitor_does(tiny_env_kwargs):
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import VecNormalize

    from envs.vector_env import SB3VecEnv

    venv = SB3VecEnv(_vec(tiny_env_kwargs, autoreset_mode="SameStep"))
    venv.seed(0)
    venv.reset()
    total, steps = np.zeros(3), np.zeros(3, int)
    episodes = []
    for _ in range(100):
        _, r, done, infos = venv.step(np.full((3, 2), 0.1, np.float32))
        total += r
        steps += 1
        for i in np.flatnonzero(done):
            ep = infos[i]["episode"]
            assert ep["r"] == pytest.approx(total[i], abs=1e-4) and ep["l"] == steps[i]
            assert {"t", "collision", "offroad", "progress"} <= set(ep)
            episodes.append(ep)
            total[i], steps[i] = 0.0, 0
        for i in np.flatnonzero(~done):
            assert "episode" not in infos[i]
    assert len(episodes) >= 3
    assert venv.env_is_wrapped(Monitor) == [True] * 3
    assert venv.env_is_wrapped(VecNormalize) == [False] * 3
    assert venv.env_is_wrapped(gym.wrappers.vector.RecordEpisodeStatistics) == [False] * 3
    wrapped = SB3VecEnv(gym.wrappers.vector.RecordEpisodeStatistics(_vec(tiny_env_kwargs,
                                                                          autoreset_mode="SameStep")))
    assert wrapped.env_is_wrapped(gym.wrappers.vector.RecordEpisodeStatistics) == [True] * 3


def test_sb3_adapter_get_images_needs_rgb_array(tiny_env_kwargs):
    from envs.vector_env import SB3VecEnv

    plain = SB3VecEnv(_vec(tiny_env_kwargs, n=2, autoreset_mode="SameStep"))
    plain.reset()
    with pytest.raises(InvalidOptionError, match="render_mode='rgb_array'"):
        plain.get_images()
    from render.renderer import RenderConfig

    drawn = SB3VecEnv(_vec(tiny_env_kwargs, n=2, autoreset_mode="SameStep", render_mode="rgb_array",
                           render_config=RenderConfig(width=64, height=48)))
    drawn.reset()
    frames = drawn.get_images()
    assert len(frames) == 2 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    with pytest.raises(InvalidOptionError, match="trafficgym vector env"):
        SB3VecEnv(gym.make("trafficgym/Ego-v0", **tiny_env_kwargs))


# ---- processes ------------------------------------------------------------------------------------------------

def test_pickled_env_leaves_the_dataset_and_maps_behind(tiny_env_kwargs):
    env = gym.make("trafficgym/Ego-v0", **tiny_env_kwargs)
    env.reset(seed=0)
    engine = env.unwrapped.engine
    state = engine.__getstate__()
    assert "dataset" not in state and "maps" not in state and state["state"].maps is None
    clone = pickle.loads(pickle.dumps(env))
    assert clone.unwrapped.engine.state.maps is clone.unwrapped.engine.maps
    assert len(pickle.dumps(env)) < len(pickle.dumps(engine.maps))


ASYNC_AFTER_USE = textwrap.dedent("""
    import numpy as np, torch, gymnasium as gym
    import envs
    torch.set_num_threads(2)  # the parent's OpenMP pool is live before the fork
    kwargs = dict(dataset="interaction_multi", data_dir={root!r}, case_length=91, split="val", cache_dir={cache!r})
    env = gym.make("trafficgym/Ego-v0", **kwargs)
    env.reset(seed=0)
    for _ in range(3):
        env.step(np.zeros(2, np.float32))
    torch.ones(512, 512) @ torch.ones(512, 512)
    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=2, vectorization_mode="async", **kwargs)
    venv.reset(seed=0)
    for _ in range(3):
        venv.step(np.zeros((2, 2), np.float32))
    venv.close()
    print("ok")
""")


def test_async_vector_env_after_the_parent_used_an_env(tiny_env_kwargs):
    """Forked workers used to wait forever on the parent's OpenMP pool (envs/parallel.py)."""
    code = ASYNC_AFTER_USE.format(root=tiny_env_kwargs["data_dir"], cache=tiny_env_kwargs["cache_dir"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
