"""The agent interface, the registry, checkpoints, the baselines, IDM, and mixed traffic in the env."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from agents.base import Agent, PlanningAgent
from agents.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from agents.registry import AGENTS, available_agents, make_agent, register_agent
from envs import sim
from envs.dynamics import DeltaLocal, StatePose
from envs.errors import CheckpointError, InvalidActionError, TrafficGymError, UnknownNameError
from envs.metrics import compute_step_metrics
from envs.types import Action
from tests.scenes import make_map, make_scene, straight_road


def _rollout(scenes, agent, steps=80, controlled="all"):
    state = sim.reset(scenes, start_step=10, controlled=controlled)
    agent.reset(state, state.controlled, seed=0)
    for _ in range(steps):
        state = sim.step(state, agent(state, state.controlled), agent.dynamics)
    return state


# ---- registry and checkpoints -----------------------------------------------------------------------------

def test_registry_lists_the_baselines_and_suggests_names():
    assert {"log_replay", "constant_velocity", "random", "idm"} <= set(available_agents())
    with pytest.raises(UnknownNameError, match="Did you mean 'idm'"):
        make_agent("imd")
    with pytest.raises(UnknownNameError, match="Did you mean 'accel_std'"):
        make_agent("random", acel_std=1.0)
    with pytest.raises(TrafficGymError, match="already registered"):
        register_agent("idm")(object)


def test_checkpoints_round_trip_and_reject_mismatches(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.layer = torch.nn.Linear(3, width)

    model = Tiny(4)
    path = save_checkpoint(tmp_path / "tiny.safetensors", "tiny", {"width": 4}, model.state_dict())
    config, tensors, _ = load_checkpoint(path, expected_agent="tiny")
    assert config == {"width": 4}
    other = Tiny(4)
    load_state_dict_strict(other, tensors, path)
    torch.testing.assert_close(other.layer.weight, model.layer.weight)
    with pytest.raises(CheckpointError, match="holds a 'tiny' checkpoint, not 'smart'"):
        load_checkpoint(path, expected_agent="smart")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_dict_strict(Tiny(5), tensors, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a trafficgym checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="has no weights"):
        make_agent("idm", checkpoint=path)


# ---- baselines on hand-built scenes -------------------------------------------------------------------------

def test_log_replay_reproduces_the_log_exactly():
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10), dict(x0=60, y0=-1.75, speed=5, steps=slice(0, 50))])
    state = _rollout([scene], make_agent("log_replay"))
    torch.testing.assert_close(state.traj, state.log)
    assert torch.equal(state.valid, state.log_valid)  # agent 1 leaves when its log does


def test_constant_velocity_keeps_velocity():
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10, accel=-1.0)])
    state = _rollout([scene], make_agent("constant_velocity"), steps=20)
    v_at_start = scene.trajectory[0, 10, 3]
    assert state.current[0, 0, 0].item() == pytest.approx(scene.trajectory[0, 10, 0] + 2.0 * v_at_start, abs=1e-3)


def test_random_agent_is_deterministic_given_the_seed():
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10), dict(x0=40, y0=-1.75, speed=8)])
    a, b = _rollout([scene], make_agent("random"), 30), _rollout([scene], make_agent("random"), 30)
    torch.testing.assert_close(a.traj, b.traj)
    assert not torch.allclose(a.traj[:, :, 40], a.log[:, :, 40])


def test_idm_follower_brakes_behind_a_stopped_car():
    # Leader stands at x = 60 (log replay: it never moves); follower at 10 m/s from x = 10 under IDM.
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10), dict(x0=60, y0=-1.75, speed=0)])
    state = sim.reset([scene], start_step=10, controlled=[np.array([True, False])])
    idm = make_agent("idm")
    idm.reset(state, state.controlled, seed=0)
    gaps = []
    for _ in range(80):
        state = sim.step(state, idm(state, state.controlled), idm.dynamics)
        gaps.append((state.current[0, 1, 0] - state.current[0, 0, 0]).item() - 4.5)
        assert not compute_step_metrics(state, ["collision"])["collision"].any()
    assert min(gaps) > 1.0  # stops short of the leader (IDM's s0 = 2 m minimum gap, minus braking overshoot)
    assert state.current[0, 0, 3:5].norm().item() < 0.1


def test_idm_free_road_reaches_desired_speed_and_follows_the_lane():
    road = straight_road(length=400)
    scene = make_scene([dict(x0=10, y0=-1.75, speed=5, accel=0.2)], map_data=road, num_steps=251)
    state = sim.reset([scene], start_step=10, controlled="all")  # logged speeds 5 -> 10 m/s
    idm = make_agent("idm", min_desired_speed=12.0)
    idm.reset(state, state.controlled, seed=0)
    for _ in range(240):
        state = sim.step(state, idm(state, state.controlled), idm.dynamics)
    assert state.current[0, 0, 3:5].norm().item() == pytest.approx(12.0, abs=0.3)
    assert abs(state.current[0, 0, 1].item() + 1.75) < 1e-3
    assert abs(state.current[0, 0, 2].item()) < 1e-6


@pytest.mark.parametrize(("name", "expect_collision"), [("idm", False), ("constant_velocity", True)])
def test_idm_yields_to_a_crossing_agent_that_arrives_first(name, expect_collision):
    # Agent 0 drives east along y = -1.75; agent 1 (log replay) crosses its path northbound at x = 60 about
    # 0.2 s before agent 0 gets there at constant speed. IDM yields (treats the crossing point as an
    # obstacle once agent 1 is within its 3 s yield horizon) and lets it pass; constant velocity hits it.
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10),
                        dict(x0=60, y0=-50, heading=math.pi / 2, speed=10)])
    state = sim.reset([scene], start_step=10, controlled=[np.array([True, False])])
    agent = make_agent(name)
    agent.reset(state, state.controlled, seed=0)
    collided, min_speed = False, 10.0
    for _ in range(80):
        state = sim.step(state, agent(state, state.controlled), agent.dynamics)
        collided |= bool(compute_step_metrics(state, ["collision"])["collision"].any())
        min_speed = min(min_speed, state.current[0, 0, 3:5].norm().item())
    assert collided == expect_collision
    if name == "idm":
        assert min_speed < 8.0  # it slowed down for the crossing agent ...
        assert state.current[0, 0, 0].item() > 65  # ... and crossed x = 60 after it had passed


def test_idm_continues_along_successor_lanes_past_the_log():
    # An L-shaped lane graph: east along y = 0 to x = 50, then a lane turning north. The log ends at x = 40.
    east = np.array([[0.0, 0.0], [50.0, 0.0]])
    arc = np.linspace(0.1, math.pi / 2, 8)
    turn = np.array([[50.0, 0.0]] + [[50 + 10 * math.sin(a), 10 - 10 * math.cos(a)] for a in arc])
    north = np.array([[60.0, 10.0], [60.0, 200.0]])
    from envs.types import PolylineType

    lanes = make_map([(east, PolylineType.LANE_CENTER), (turn, PolylineType.LANE_CENTER),
                      (north, PolylineType.LANE_CENTER)], successors=[(0, 1), (1, 2)])
    scene = make_scene([dict(x0=0, y0=0, speed=10, steps=slice(0, 41))], map_data=lanes)
    state = sim.reset([scene], start_step=10, controlled="all")
    idm = make_agent("idm")
    idm.reset(state, state.controlled, seed=0)
    for _ in range(80):
        state = sim.step(state, idm(state, state.controlled), idm.dynamics)
    x, y, heading = state.current[0, 0, :3].tolist()
    assert x == pytest.approx(60.0, abs=0.3)
    assert y > 20
    assert heading == pytest.approx(math.pi / 2, abs=0.05)

    # the continuation chains the straightest successors (precomputed per lane) and is memoised per map
    from agents.idm import _LaneIndex
    from envs.geometry import resample_polyline
    from envs.types import ROUTE_SPACING

    index = _LaneIndex.of(lanes)
    assert index.next_lane == {0: 1, 1: 2}
    base = np.array([[0.0, 0.0], [40.0, 0.0]], np.float32)
    standing = np.array([[60.0, 12.0]], np.float32)  # one point: the heading (north) gives the direction
    away = np.array([[200.0, 200.0], [201.0, 200.0]], np.float32)  # no lane within 3 m: left as it is
    first, still, lost, plain = index.paths([base, standing, away, base], 120.0, np.array([0.0, math.pi / 2, 0, 0]),
                                            [True, True, True, False])
    again = index.paths([base], 120.0, np.array([0.0]), [True])[0]
    assert again is first
    # the batched resampling rounds differently from np.interp in the last digit only
    grid = ROUTE_SPACING
    np.testing.assert_allclose(first, resample_polyline(index.extend(base, 120.0, 0.0), grid), rtol=0, atol=1e-5)
    np.testing.assert_allclose(still, resample_polyline(index.extend(standing, 120.0, math.pi / 2), grid), rtol=0,
                               atol=1e-5)
    np.testing.assert_allclose(lost, resample_polyline(away, ROUTE_SPACING), rtol=0, atol=1e-5)
    np.testing.assert_allclose(plain, resample_polyline(base, ROUTE_SPACING), rtol=0, atol=1e-5)
    assert first[-1, 0] == pytest.approx(60.0) and first[-1, 1] > 100  # up the northbound lane
    assert still[-1].tolist() == pytest.approx([60.0, 200.0], abs=ROUTE_SPACING)


# ---- planning agents and output checks ---------------------------------------------------------------------

class _Planner(PlanningAgent):
    dynamics = DeltaLocal()
    horizon = replan_every = 5

    def __init__(self):
        super().__init__()
        self.plans = 0

    def plan(self, state, mask):
        self.plans += 1
        steps = torch.arange(1, self.horizon + 1, dtype=torch.float32)  # 1, 2, ... m forward
        data = torch.zeros(state.batch_size, state.num_agents, self.horizon, 3)
        data[..., 0] = steps
        return data


def test_planning_agent_replans_at_its_own_rate():
    scene = make_scene([dict(x0=0, y0=-1.75, speed=0)])
    planner = _Planner()
    state = _rollout([scene], planner, steps=12)
    assert planner.plans == 3  # steps 0, 5, 10
    moved = np.diff(state.traj[0, 0, 10:23, 0].numpy())
    np.testing.assert_allclose(moved, [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2], atol=1e-5)


class _Broken(Agent):
    dynamics = StatePose()

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def act(self, state, mask):
        if self.kind == "shape":
            return Action(torch.zeros(state.batch_size, state.num_agents, 2), mask)
        data = torch.full((state.batch_size, state.num_agents, 3), float("nan"))
        return Action(data, mask)


@pytest.mark.parametrize(("kind", "message"), [("shape", "shape"), ("nan", "NaN or inf")])
def test_malformed_policy_output_is_named(tiny_env_kwargs, kind, message):
    env = gym.make("trafficgym/Ego-v0", traffic=_Broken(kind), **tiny_env_kwargs)
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match=message):
        env.step(np.zeros(2, np.float32))


# ---- reactive traffic in the ego env ---------------------------------------------------------------------

def _brake_test(traffic, tmp_path):
    """Ego at 12 m/s, an IDM/log follower 20 m behind at 12 m/s; the ego brakes hard from the start."""
    from tests.scenes import straight_road

    del tmp_path
    road = straight_road(length=400)
    scene = make_scene([dict(x0=60, y0=-1.75, speed=12), dict(x0=40, y0=-1.75, speed=12)], map_data=road)
    state = sim.reset([scene], start_step=10, controlled="ego")
    from envs.dynamics import InvertibleBicycle

    brake = Action(torch.tensor([[[-8.0, 0.0], [0.0, 0.0]]]), state.controlled.clone())
    agent = make_agent(traffic) if traffic != "log" else None
    if agent:
        agent.reset(state, ~state.controlled, seed=0)
    collided, follower_speed = False, []
    for _ in range(60):
        more = [(agent(state, ~state.controlled & state.agent_mask), agent.dynamics)] if agent else []
        state = sim.step(state, brake, InvertibleBicycle(), more)
        collided |= bool(compute_step_metrics(state, ["collision"])["collision"].any())
        follower_speed.append(state.current[0, 1, 3:5].norm().item())
    return collided, follower_speed


def test_idm_follower_reacts_to_a_braking_ego_while_log_replay_crashes(tmp_path):
    collided, speeds = _brake_test("idm", tmp_path)
    assert not collided
    assert speeds[-1] < 0.5
    collided, speeds = _brake_test("log", tmp_path)
    assert collided
    assert min(speeds) > 11.9


def test_env_traffic_rules_and_driven_by(tiny_env_kwargs):
    # Scene 0 at the start step: the ego (track 1) at (16, 0); track 2 at (25, 3.5), 9.7 m away; the pedestrian
    # (track 3) at (1, -3), 15.3 m away.
    env = gym.make("trafficgym/Ego-v0", traffic=[("idm", 12.0), ("constant_velocity", "vehicles")],
                   **tiny_env_kwargs)
    env.reset(options={"scene_index": 0})
    _, _, _, _, info = env.step(np.zeros(2, np.float32))
    assert info["driven_by"].tolist() == ["env", "idm", "log"]  # no rule matches the pedestrian
    env = gym.make("trafficgym/Ego-v0", traffic=[("constant_velocity", "non_vehicles"), ("idm", "all")],
                   **tiny_env_kwargs)
    env.reset(options={"scene_index": 0})
    _, _, _, _, info = env.step(np.zeros(2, np.float32))
    assert info["driven_by"].tolist() == ["env", "idm", "constant_velocity"]
    env = gym.make("trafficgym/Ego-v0", traffic="idm", **tiny_env_kwargs)
    env.reset(options={"scene_index": 0})
    _, _, _, _, info = env.step(np.zeros(2, np.float32))
    assert info["driven_by"].tolist() == ["env", "idm", "idm"]
    with pytest.raises(UnknownNameError, match="traffic selector"):
        gym.make("trafficgym/Ego-v0", traffic=[("idm", "cars")], **tiny_env_kwargs)
    with pytest.raises(UnknownNameError, match="Did you mean 'idm'"):
        gym.make("trafficgym/Ego-v0", traffic="imd", **tiny_env_kwargs)
    assert "idm" in AGENTS


def _braking_dataset(root):
    """Two cars 20 m apart in lane 0 of the fixture road at 12 m/s for 9.1 s (leader first: it is the ego)."""
    from tests import interaction_fixture as fx

    (root / "maps").mkdir(parents=True)
    fx.write_map(root / "maps" / f"DR_{fx.LOCATION}.osm")
    (root / "val").mkdir()
    rows = [fx.COLUMNS]
    for track, x0 in ((1, 40.0), (2, 20.0)):
        for f in range(1, 92):
            x = x0 + 12.0 * (f - 1) * 0.1
            rows.append(f"1,{track},{f},{f * 100},car,{x:.3f},0.000,12.000,0.000,0.000,4.500,1.800")
    (root / "val" / f"DR_{fx.LOCATION}_val.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize(("traffic", "expect_collision"), [("idm", False), ("log", True)])
def test_ego_env_brake_test_idm_follower_reacts(tmp_path, traffic, expect_collision):
    root = _braking_dataset(tmp_path / "brake")
    env = gym.make("trafficgym/Ego-v0", dataset="interaction_multi", data_dir=str(root), case_length=91,
                   split="val", cache_dir=str(tmp_path / "cache"), traffic=traffic, terminate_on_collision=False)
    env.reset(seed=0)
    assert env.unwrapped.state.ego.item() == 0
    collided, speeds = False, []
    for _ in range(60):
        _, _, _, _, info = env.step(np.array([-0.8, 0.0], np.float32))  # -8 m/s^2: hard braking
        collided |= bool(info["collided_with"])
        speeds.append(float(env.unwrapped.state.current[0, 1, 3:5].norm()))
    assert collided is expect_collision
    if traffic == "idm":
        assert speeds[-1] < 0.5
        assert info["driven_by"].tolist() == ["env", "idm"]
    else:
        assert min(speeds) > 11.9


def test_idm_leaves_torch_thread_count_as_it_was(tiny_root, tmp_path):
    # IDM's compiled step is a parallel numba kernel: a bare one reset a 1-thread process to all cores on its
    # first launch (16-env IDM traffic then ran 4x slower on a busy 2-core machine). Checked in a fresh process
    # whose first numba launch is IDM's (the map cache is built here, so the child builds no road-edge rasters).
    import os
    import subprocess
    import sys

    import gymnasium as gym

    gym.make("trafficgym/Ego-v0", dataset="interaction_multi", data_dir=str(tiny_root), case_length=91,
             split="val", cache_dir=str(tmp_path))

    code = ("import torch; torch.set_num_threads(1)\n"
            "import numpy as np, gymnasium as gym, envs\n"
            f"env = gym.make_vec('trafficgym/Ego-v0', 3, 'vector_entry_point', traffic='idm', "
            f"dataset='interaction_multi', data_dir={str(tiny_root)!r}, case_length=91, split='val', "
            f"cache_dir={str(tmp_path)!r})\n"
            "env.reset(seed=0)\n"
            "for _ in range(3): env.step(np.zeros((3, 2), np.float32))\n"
            "print(torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell has it
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "NUMBA_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "1"


def test_every_parallel_numba_kernel_goes_through_parallel_kernel():
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    bare = [f"{p.relative_to(root)}:{n}" for folder in ("envs", "agents", "training", "render")
            for p in (root / folder).rglob("*.py") if p.name != "parallel.py"
            for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"njit\(.*parallel\s*=\s*True", line)]
    assert bare == [], f"use envs.parallel.parallel_kernel for these kernels: {bare}"
