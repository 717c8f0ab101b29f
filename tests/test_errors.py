"""Error paths not covered elsewhere: each raises a typed, explanatory error."""

from __future__ import annotations

import numpy as np
import pytest

from envs import sim
from envs.config import EnvConfig
from envs.errors import UnknownNameError
from envs.observation import ObsConfig
from envs.rewards import RewardConfig
from tests.scenes import make_scene, straight_road


def test_config_validation():
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        EnvConfig(start_step=-1)
    with pytest.raises(ValueError, match="action_scale='normalized' does not apply to 'pose'"):
        EnvConfig(dynamics="pose", action_scale="normalized")
    with pytest.raises(UnknownNameError, match="action_scale"):
        EnvConfig(action_scale="unit")
    with pytest.raises(ValueError, match="sequence of scene ids"):
        EnvConfig(scenes="DR_USA_Town_Grid_val_0")
    with pytest.raises(ValueError, match="num_agents must be >= 1"):
        ObsConfig(num_agents=0)
    with pytest.raises(ValueError, match="must be > 0"):
        ObsConfig(radius=0.0)
    with pytest.raises(ValueError, match="finite number"):
        RewardConfig(collision=float("nan"))


def test_sim_reset_and_stack_maps_errors():
    scene = make_scene([dict(x0=10, y0=-1.75, speed=5)])
    with pytest.raises(ValueError, match="start_step 95 must lie in"):
        sim.reset([scene], start_step=95)
    with pytest.raises(ValueError, match="Controlled mask has shape"):
        sim.reset([scene], controlled=[np.array([True, False])])
    with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
        sim.reset([scene], controlled=[np.array([3])])
    with pytest.raises(ValueError, match="Got 2 controlled masks for 1 scenes"):
        sim.reset([scene], controlled=[np.array([True]), np.array([True])])
    road = straight_road()
    other = straight_road(map_id="test:other")
    from envs.map_index import map_index

    with pytest.raises(ValueError, match="indices must match maps"):
        sim.stack_maps([road], indices=[map_index(other)])
    with pytest.raises(ValueError, match="MapBatch lacks maps"):
        sim.reset([scene], maps=sim.stack_maps([other]))


def test_agent_and_traffic_argument_errors(tiny_env_kwargs):
    import gymnasium as gym

    from agents.registry import make_agent

    with pytest.raises(ValueError, match="Standard deviations must be >= 0"):
        make_agent("random", accel_std=-1.0)
    with pytest.raises(ValueError, match="IDM time_headway must be > 0"):
        make_agent("idm", time_headway=0.0)
    with pytest.raises(ValueError, match="IDM lookahead must be >= 2"):
        make_agent("idm", lookahead=1.5)
    with pytest.raises(ValueError, match="IDM yield_horizon must be >= 0"):
        make_agent("idm", yield_horizon=-1.0)
    with pytest.raises(ValueError, match="radius > 0 m"):
        gym.make("trafficgym/Ego-v0", traffic=[("idm", -5.0)], **tiny_env_kwargs)
    env = gym.make("trafficgym/Ego-v0", **tiny_env_kwargs)
    with pytest.raises(IndexError, match="scene_index 7 outside"):
        env.reset(options={"scene_index": 7})
    with pytest.raises(ValueError, match="max_agents=1 but the selected scenes hold up to 3 agents"):
        gym.make("trafficgym/SimAgents-v0", max_agents=1, **tiny_env_kwargs)


# ---- edge cases of the envs' public API ---------------------------------------------------------------------

def _make(env_id, vector, kwargs, **more):
    import gymnasium as gym

    import envs  # noqa: F401

    if vector:
        return gym.make_vec(env_id, num_envs=2, vectorization_mode="vector_entry_point", **kwargs, **more)
    return gym.make(env_id, **kwargs, **more)


@pytest.mark.parametrize("vector", [False, True], ids=["single", "vector"])
@pytest.mark.parametrize("env_id", ["trafficgym/Ego-v0", "trafficgym/SimAgents-v0"])
def test_step_and_reset_after_close_raise(tiny_env_kwargs, env_id, vector):
    from gymnasium.error import ClosedEnvironmentError

    from envs.errors import EnvClosedError

    env = _make(env_id, vector, tiny_env_kwargs)
    env.reset(seed=0)
    action = env.action_space.sample()
    env.step(action)
    env.close()
    env.close()  # closing twice stays allowed (Gymnasium's checker asks for it)
    with pytest.raises(EnvClosedError, match=r"step\(\) on a closed .*Make a new"):
        env.step(action)
    with pytest.raises(ClosedEnvironmentError, match=r"reset\(\) on a closed"):  # Gymnasium's class, too
        env.reset(seed=0)


@pytest.mark.parametrize("index", [1.5, 1.0, np.float32(1), True, np.True_, "1", None, [1]])
def test_scene_index_must_be_an_integer(tiny_env_kwargs, index):
    from envs.errors import InvalidOptionError

    env = _make("trafficgym/Ego-v0", False, tiny_env_kwargs)
    with pytest.raises(InvalidOptionError, match="scene_index must be an integer"):
        env.reset(options={"scene_index": index})


@pytest.mark.parametrize("index", [1, np.int32(1), np.int64(1), np.uint8(1), np.array(1)])
def test_scene_index_accepts_python_and_numpy_integers(tiny_env_kwargs, index):
    env = _make("trafficgym/Ego-v0", False, tiny_env_kwargs)
    _, info = env.reset(options={"scene_index": index})
    assert info["scene_id"] == env.unwrapped.scene_ids[1]


def test_vector_scene_index_checks_every_entry(tiny_env_kwargs):
    from envs.errors import InvalidOptionError, SceneIndexError

    venv = _make("trafficgym/Ego-v0", True, tiny_env_kwargs)
    ids = venv.unwrapped.engine.dataset.scene_ids
    _, info = venv.reset(options={"scene_index": np.array([2, 0], np.int32)})
    assert list(info["scene_id"]) == [ids[2], ids[0]]
    for bad in ([0, 1.5], [True, False], np.array([0.0, 1.0])):
        with pytest.raises(InvalidOptionError, match="scene_index must be an integer"):
            venv.reset(options={"scene_index": bad})
    with pytest.raises(InvalidOptionError, match="names 3 scenes for 2 envs"):
        venv.reset(options={"scene_index": [0, 1, 2]})
    with pytest.raises(SceneIndexError, match=r"scene_index 3 outside \[0, 3\)"):
        venv.reset(options={"scene_index": [0, 3]})


def test_vector_env_one_scene_id_means_that_scene_in_every_env(tiny_env_kwargs):
    from envs.errors import InvalidOptionError

    venv = _make("trafficgym/Ego-v0", True, tiny_env_kwargs)
    _, info = venv.reset(options={"scene_id": "DR_USA_Tiny_Road_val_1"})  # not read character by character
    assert list(info["scene_id"]) == ["DR_USA_Tiny_Road_val_1"] * 2
    _, info = venv.reset(options={"scene_index": 2})  # likewise one index
    assert list(info["scene_id"]) == ["DR_USA_Tiny_Road_val_2"] * 2
    _, info = venv.reset(options={"scene_id": ["DR_USA_Tiny_Road_val_2", "DR_USA_Tiny_Road_val_0"]})
    assert list(info["scene_id"]) == ["DR_USA_Tiny_Road_val_2", "DR_USA_Tiny_Road_val_0"]
    with pytest.raises(UnknownNameError, match="Unknown scene id .* 'DR_USA_Tiny_Road_val_9'"):
        venv.reset(options={"scene_id": "DR_USA_Tiny_Road_val_9"})
    with pytest.raises(InvalidOptionError, match="names 1 scenes for 2 envs"):
        venv.reset(options={"scene_id": ["DR_USA_Tiny_Road_val_1"]})
    with pytest.raises(InvalidOptionError, match="scene_id must be a string"):
        venv.reset(options={"scene_id": [0, 1]})


def test_unknown_scene_id_lists_the_nearest_few_and_the_count():
    ids = [f"DR_USA_Town_Spider_val_{i}" for i in range(128)]
    message = str(UnknownNameError("scene id in towns/val", "DR_USA_Town_Spidr_val_17", ids))
    assert "Did you mean 'DR_USA_Town_Spider_val_17'?" in message
    assert "Nearest of the 128 known: DR_USA_Town_Spider_val_17, " in message
    assert message.count("DR_USA_Town_Spider_val_") <= 6  # the suggestion and five nearest, not all 128
    message = str(UnknownNameError("scene id in towns/val", "zzz", ids))
    assert "128 known, e.g. DR_USA_Town_Spider_val_0, DR_USA_Town_Spider_val_1, " in message
    assert message.count("DR_USA_Town_Spider_val_") == 5
    short = str(UnknownNameError("dataset", "tonws", ["towns", "nusc_mini"]))
    assert "Known: nusc_mini, towns." in short  # short lists are still listed in full


def test_misspelt_split_gets_a_suggestion(tiny_env_kwargs):
    from envs.errors import SplitNotFoundError

    with pytest.raises(SplitNotFoundError, match="Did you mean 'val'\\? Available splits: train, val"):
        _make("trafficgym/Ego-v0", False, {**tiny_env_kwargs, "split": "vall"})


def test_nan_in_an_ignored_sim_agents_row_raises(tiny_env_kwargs):
    from envs.errors import InvalidActionError

    # max_agents=5: slots 3 and 4 are padding; with controlled="vehicles" slot 2 (the pedestrian) is not driven.
    env = _make("trafficgym/SimAgents-v0", False, tiny_env_kwargs, max_agents=5, controlled="vehicles")
    env.reset(options={"scene_index": 0})
    for row, value in ((4, np.nan), (2, np.nan), (3, np.inf)):
        action = np.zeros(env.action_space.shape, np.float32)
        action[row, 1] = value
        with pytest.raises(InvalidActionError, match=f"NaN or inf.* at index \\[{row}\\]"):
            env.step(action)
    action = np.zeros(env.action_space.shape, np.float32)
    action[4] = 5.0  # out of bounds in an ignored row: still ignored, as documented
    env.step(action)
