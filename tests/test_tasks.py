"""envs.tasks: the ego and sim-agents settings as task objects on the shared engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs import sim
from envs.config import EnvConfig
from envs.engine import TrafficEngine
from envs.errors import NoEgoError, UnknownNameError
from envs.tasks import EgoTask, SimAgentsTask, make_task
from tests.scenes import make_scene


def _state():
    return sim.reset([make_scene([dict(x0=0, y0=-1.75), dict(x0=20, y0=-1.75), dict(x0=40, y0=-1.75)])],
                     start_step=10, controlled="all")


def test_reward_reductions_and_action_placement_are_exact():
    st = _state()
    per_agent = torch.tensor([[1.0, 2.0, 6.0]])
    ego = EgoTask()
    assert ego.reward(per_agent, st).tolist() == [per_agent[0, int(st.ego[0])].item()]
    assert SimAgentsTask().reward(per_agent, st).tolist() == [3.0]  # mean over the 3 controlled agents
    out = ego.scatter(torch.tensor([[0.5, -0.5, 0.1]]), st, torch.zeros(1, 3, 3))
    assert out[0, int(st.ego[0])].tolist() == pytest.approx([0.5, -0.5, 0.1])
    assert out.abs().sum().item() == pytest.approx(1.1)  # nothing else written
    assert ego.action_shape(3, 2) == (2,)
    assert SimAgentsTask().action_shape(3, 2) == (3, 2)
    assert not SimAgentsTask().terminated({}, st, EnvConfig()).any()


def test_ego_task_keeps_scenes_with_an_ego_and_names_the_fix():
    cfg = EnvConfig()
    assert EgoTask().select_scenes([0, 1, 2], [4, -1, 0], cfg) == [0, 2]
    assert SimAgentsTask().select_scenes([0, 1, 2], [4, -1, 0], cfg) == [0, 1, 2]
    with pytest.raises(NoEgoError, match="SimAgents-v0"):
        EgoTask().select_scenes([0, 1], [-1, -1], cfg)


def test_tasks_by_name_and_instance():
    assert isinstance(make_task("ego"), EgoTask)
    task = SimAgentsTask()
    assert make_task(task) is task
    with pytest.raises(UnknownNameError, match="sim_agent"):
        make_task("sim_agent")


def test_engine_takes_a_task_object_and_exposes_who_drives():
    cfg = EnvConfig(scenes=None, traffic="idm")
    engine = TrafficEngine(cfg, num_slots=2, task=SimAgentsTask())
    assert engine.mode == "sim_agents"
    with pytest.raises(ValueError, match="task must be one of"):
        TrafficEngine(cfg, num_slots=1, task="egoo")
    engine.reset_slots(np.arange(2), np.arange(2), seed=0)
    names = engine.driven_by(0)
    assert engine.assignment.shape == engine.state.controlled.shape
    assert set(names[engine.state.agent_mask[0].numpy()]) <= {"env", "idm", "log"}
    assert "env" in set(names)
