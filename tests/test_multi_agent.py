"""The PettingZoo view of the sim-agents env."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pettingzoo", reason="PettingZoo is the optional 'marl' extra")


def test_parallel_api_test_passes(tiny_env_kwargs):
    from pettingzoo.test import parallel_api_test

    from envs.multi_agent import parallel_env

    parallel_api_test(parallel_env(**tiny_env_kwargs), num_cycles=100)


def test_agents_are_the_controlled_slots_and_leave_at_the_end(tiny_env_kwargs):
    from envs.multi_agent import parallel_env

    env = parallel_env(**tiny_env_kwargs)
    obs, infos = env.reset(options={"scene_index": 0})
    # Scene 0 of the fixture: tracks 1 and 2 are valid at step 10; track 3 (a pedestrian) enters at step 10.
    assert env.agents == ["agent_0", "agent_1", "agent_2"]
    assert set(obs) == set(env.agents)
    assert obs["agent_0"]["self"].shape == (5,)
    for _ in range(80):
        obs, rewards, terms, truncs, infos = env.step({a: np.zeros(2, np.float32) for a in env.agents})
    assert all(truncs.values())
    assert env.agents == []


def test_missing_actions_raise(tiny_env_kwargs):
    from envs.errors import InvalidActionError
    from envs.multi_agent import parallel_env

    env = parallel_env(**tiny_env_kwargs)
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match="No action for live agents"):
        env.step({})
    with pytest.raises(InvalidActionError, match="unknown agents"):
        env.step({**{a: np.zeros(2, np.float32) for a in env.agents}, "car_7": np.zeros(2)})


def test_step_and_reset_after_close_raise(tiny_env_kwargs):
    from envs.errors import EnvClosedError
    from envs.multi_agent import parallel_env

    env = parallel_env(**tiny_env_kwargs)
    env.reset(seed=0)
    actions = {a: np.zeros(2, np.float32) for a in env.agents}
    env.close()
    with pytest.raises(EnvClosedError, match=r"step\(\) on a closed env.*parallel_env"):
        env.step(actions)
    with pytest.raises(EnvClosedError, match=r"reset\(\) on a closed env"):
        env.reset(seed=0)
