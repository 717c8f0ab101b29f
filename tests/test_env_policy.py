"""AgentPolicy: a registered agent choosing a trafficgym env's actions (through the env dynamics' inverse)."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import envs  # noqa: F401  (registers the env ids)
from agents.env_policy import AgentPolicy
from agents.registry import make_agent
from envs.errors import InvalidOptionError, ResetNeededError


def _episode(env, policy) -> torch.Tensor:
    env.reset(seed=0)
    while True:
        _, _, terminated, truncated, _ = env.step(policy(None))
        if terminated or truncated:
            break
    st = env.unwrapped.engine.state
    return st


def test_log_replay_through_the_delta_dynamics_reproduces_the_logged_track(tiny_env_kwargs):
    # forward(inverse(log step)) is exact for the delta dynamics: the ego drives its log to the last step
    env = gym.make("trafficgym/Ego-v0", dynamics="delta_local", **tiny_env_kwargs)
    st = _episode(env, AgentPolicy(env, "log_replay"))
    b, e = 0, int(st.ego[0])
    ok = st.valid[b, e, 11:]
    assert ok.sum() > 50
    torch.testing.assert_close(st.traj[b, e, 11:, :3][ok], st.log[b, e, 11:, :3][ok], atol=1e-4, rtol=0)


def test_a_bicycle_agent_drives_the_bicycle_env_exactly_as_in_the_simulator(tiny_env_kwargs):
    # the env's actions (normalised) from a bicycle agent are that agent's own actions: the env's episode equals
    # the simulator's rollout of the agent on the same scene
    from envs import sim
    from training.rollouts import drive

    env = gym.make("trafficgym/Ego-v0", terminate_on_collision=False, terminate_on_offroad=False, **tiny_env_kwargs)
    agent = make_agent("random")
    st = _episode(env, AgentPolicy(env, agent, seed=3))
    scene = env.unwrapped.engine.dataset[env.unwrapped.engine.scene_indices[int(env.unwrapped.engine.slot_scene[0])]]
    ref = drive(sim.reset([scene], start_step=10, controlled="ego"), make_agent("random"), seed=3)
    e = int(st.ego[0])
    n = int(st.t[0]) + 1
    assert n == 91
    torch.testing.assert_close(st.traj[0, e, :n, :3], ref.traj[0, e, :n, :3], atol=1e-3, rtol=0)


def test_vector_env_slots_restart_the_agent_after_autoreset(tiny_env_kwargs):
    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=2, vectorization_mode="vector_entry_point",
                        dynamics="delta_local", **tiny_env_kwargs)
    policy = AgentPolicy(venv, "log_replay")
    venv.reset(seed=0)
    for _ in range(85):  # one episode, the autoreset, a few steps of the next
        venv.step(policy(None))
    st = venv.unwrapped.engine.state
    t = int(st.t[0])
    b = torch.arange(2)
    torch.testing.assert_close(st.traj[b, st.ego, 11:t, :2], st.log[b, st.ego, 11:t, :2], atol=1e-4, rtol=0)


def test_errors_name_the_problem(tiny_env_kwargs):
    env = gym.make("trafficgym/Ego-v0", **tiny_env_kwargs)
    policy = AgentPolicy(env, "log_replay")
    with pytest.raises(ResetNeededError, match="Reset the env"):
        policy(None)
    with pytest.raises(InvalidOptionError, match="not a trafficgym env"):
        AgentPolicy(gym.make("CartPole-v1"), "log_replay")
    env.reset(seed=0)
    assert env.action_space.contains(policy(None))  # the single env's shape, dtype and (normalised) bounds


def test_a_learned_agent_restarts_one_slot_of_a_vector_env(tiny_env_kwargs):
    # a slot whose episode ended early restarts while the others drive on: the agent's per-episode tensors (made
    # under inference mode while acting) are reset in place, which must also run under inference mode
    import numpy as np

    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=2, vectorization_mode="vector_entry_point", **tiny_env_kwargs)
    policy = AgentPolicy(venv, make_agent("smart", checkpoint="towns-nano"))
    venv.reset(seed=0)
    for _ in range(3):
        venv.step(policy(None))
    engine = venv.unwrapped.engine
    engine.reset_slots(np.array([1]), np.array([0]))  # as an autoreset of env 1 alone
    action = policy(None)
    assert action.shape == (2, 2) and np.isfinite(action).all()
