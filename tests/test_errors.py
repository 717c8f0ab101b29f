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
