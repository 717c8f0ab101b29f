"""Closed-loop rollouts for evaluation: R samples of one scene at once, their ``Rollouts`` container, and the
stable npz format ``trafficgym eval --save-rollouts`` writes.

Settings (WOSAC protocol by default: 1.1 s of logged history, then the rest of the scene at 10 Hz):
- ``sim_agents``: the agent drives every agent valid at the start step; they are the evaluated agents.
  Agents that enter later replay their log and are interaction context (identical in every rollout).
  Every evaluated agent is present at every future step, as WOSAC requires (``complete_rollouts``): an agent
  that leaves the scene during a rollout — its log ends under log replay, or a policy takes it out at a map
  exit — continues at constant velocity from its last state (the map's metric road edges continue past the
  border, so driving on there is not leaving the road).
- ``ego``: the agent drives the ego; ``traffic`` (a registered agent name or ``"log"``) drives the others.
  Every agent of the scene is evaluated (traffic differs between rollouts when it is reactive), and the ego
  planning metrics read ``ego_index``.

npz format (version 2), one file per scene, ``<scene_id>.npz``, plain arrays (``np.load(allow_pickle=False)``):
    format_version ()           2
    scene_id ()                 str
    agent_ids (A,)              str, the dataset's agent names, in the order of every per-agent array
    agent_type (A,)             int, envs.types.AgentType (0 vehicle, 1 pedestrian, 2 cyclist, 3 other)
    length, width (A,)          m
    x, y, z, heading (R, A, T)  simulated world-frame box centre (m; z is 0: the simulator is planar) and
                                heading (rad, counter-clockwise from +x); steps < history_steps are the log
    valid (R, A, T)             bool
    log_x, log_y, log_z, log_heading (A, T), log_valid (A, T)   the logged states
    dt ()                       s per step;  history_steps ()  logged steps before the simulation starts
    ego_index ()                index of the ego among the agents, -1 if none
    road_edge_xy (M, 2), road_edge_offsets (P + 1,)   the road edges the metrics measure against (polyline p
                                is road_edge_xy[offsets[p]:offsets[p + 1]], road on its left; rings end on their
                                first point); empty without road edges
    tl_lane_segments (S, 4), tl_segment_lane (S,), tl_signal_lane (K,), tl_stop_point (K, 2), tl_red (K, T)
                                the lane-centre segments (x0, y0, x1, y1) with their lane index, the
                                signal-controlled lanes, their stop points and red states (S = K = 0 without lights)
Official WOSAC tooling expects 80 future steps of (x, y, z, heading) for 32 rollouts per evaluated object:
``x[:, :, history_steps:]`` etc. are exactly that on the towns data (91 steps, history 11), and
``benchmarks/wosac_crosscheck.py`` builds the official Scenario and submission protos from these files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from envs.errors import UnknownNameError

SETTINGS = ("sim_agents", "ego")
NPZ_VERSION = 2


def drive(state, agent, traffic=None, seed: int = 0, on_step=None):
    """Run ``state`` to the end of its log: ``agent`` drives the controlled agents, ``traffic`` (an agent, or None
    for log replay) every other one. ``on_step(state)`` is called after reset and after every step."""
    from envs import sim

    mine = state.controlled.clone()
    rest = state.agent_mask & ~mine
    agent.reset(state, mine, seed=seed)
    if traffic is not None:
        traffic.reset(state, rest, seed=seed + 1)
    if on_step is not None:
        on_step(state)
    while int((state.end - state.t).max()) > 0:
        more = [(traffic(state, rest), traffic.dynamics)] if traffic is not None else []
        state = sim.step(state, agent(state, mine), agent.dynamics, more)
        if on_step is not None:
            on_step(state)
    return state


def complete_rollouts(traj: torch.Tensor, valid: torch.Tensor, start: int, dt: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The WOSAC protocol's full rollouts: every agent valid at step ``start`` becomes valid at every later step;
    where it was not, it moves on at constant velocity (heading and velocity of its latest valid state).

    traj ``(R, A, T, 5)`` x, y, heading, vx, vy; valid ``(R, A, T)``. Returns new tensors (the inputs are not
    changed). Agents invalid at ``start`` are left as they are."""
    traj, valid = traj.clone(), valid.clone()
    r, a, t = valid.shape
    steps = torch.arange(t, device=valid.device)
    last = torch.where(valid, steps, torch.full_like(steps, -1)).cummax(dim=-1).values  # (R, A, T)
    fill = ~valid & valid[..., start:start + 1] & (steps >= start)
    if fill.any():
        src = traj.gather(2, last.clamp(min=0)[..., None].expand(r, a, t, 5))  # the latest valid state
        ahead = (steps - last).to(traj.dtype) * dt  # s since then
        moved = src.clone()
        moved[..., 0] += src[..., 3] * ahead
        moved[..., 1] += src[..., 4] * ahead
        traj = torch.where(fill[..., None], moved, traj)
        valid = valid | fill
    return traj, valid


@torch.inference_mode()
def simulate_scene(agent, ds, scene_index: int, num_rollouts: int, setting: str = "sim_agents",
                   traffic=None, start_step: int = 10, seed: int = 0):
    """``num_rollouts`` closed-loop samples of scene ``scene_index`` of ``ds`` as an ``envs.metrics.episode.Rollouts``.

    ``agent`` / ``traffic``: ``agents.base.Agent`` objects (``traffic`` None: log replay). The rollouts run as one
    batch of R copies of the scene; stochastic agents draw different samples per row; ``seed`` makes the whole
    call reproducible. In the ``sim_agents`` setting the rollouts are completed to the WOSAC protocol
    (``complete_rollouts``). In the ``ego`` setting every agent is evaluated (the others as the ego's simulated
    interaction partners) and the ego alone is scored (``Rollouts.scored``): realism is the ego's, minADE the ego's.
    """
    from envs import sim as simulator
    from envs.metrics.episode import Rollouts
    from envs.metrics.traffic_lights import TrafficLights

    if setting not in SETTINGS:
        raise UnknownNameError("setting", setting, SETTINGS)
    scene = ds[scene_index]
    maps = simulator.stack_maps([scene.map], indices=[ds.map_index(scene.map_id)])
    state = simulator.reset([scene] * num_rollouts, start_step=start_step,
                      controlled="all" if setting == "sim_agents" else "ego", maps=maps)
    controlled = state.controlled[0, :scene.num_agents].cpu().numpy()
    state = drive(state, agent, traffic, seed)
    a = scene.num_agents
    if setting == "sim_agents":
        evaluated = controlled
    else:
        evaluated = np.ones(a, bool)
    idx = torch.as_tensor(np.flatnonzero(evaluated))
    others = torch.as_tensor(np.flatnonzero(~evaluated))
    log = torch.as_tensor(scene.trajectory)
    log_valid = torch.as_tensor(scene.valid)
    ego = int(np.flatnonzero(idx.numpy() == scene.ego_index)[0]) if scene.ego_index in idx.tolist() else -1
    has_context = setting == "sim_agents" and len(others) > 0
    sim, sim_valid = state.traj[:, idx].clone(), state.valid[:, idx].clone()
    if setting == "sim_agents":
        sim, sim_valid = complete_rollouts(sim, sim_valid, start_step, scene.dt)
    return Rollouts(
        scene_id=scene.scene_id, agent_ids=scene.agent_ids[idx.numpy()],
        agent_type=torch.as_tensor(scene.agent_type[idx.numpy()]).long(), extent=torch.as_tensor(scene.extent)[idx],
        sim=sim, sim_valid=sim_valid, log=log[idx], log_valid=log_valid[idx],
        history_steps=start_step + 1, dt=scene.dt, map_index=ds.map_index(scene.map_id), ego_index=ego,
        context=log[others] if has_context else None, context_valid=log_valid[others] if has_context else None,
        context_extent=torch.as_tensor(scene.extent)[others] if has_context else None,
        traffic_lights=TrafficLights.from_scene(scene),
        scored=None if setting == "sim_agents" else torch.as_tensor(np.arange(len(idx)) == ego),
    )


def save_rollouts(rollouts, directory: str | Path) -> Path:
    """Write one scene's rollouts in the npz format of the module docstring (atomic)."""
    from envs.fileio import atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_safe(rollouts.scene_id)}.npz"
    sim = rollouts.sim.cpu().numpy()
    log = rollouts.log.cpu().numpy()
    arrays = {
        "format_version": np.array(NPZ_VERSION), "scene_id": np.array(rollouts.scene_id),
        "agent_ids": np.asarray(rollouts.agent_ids).astype(str),
        "agent_type": rollouts.agent_type.cpu().numpy().astype(np.int8),
        "length": rollouts.extent[:, 0].cpu().numpy(), "width": rollouts.extent[:, 1].cpu().numpy(),
        "x": sim[..., 0], "y": sim[..., 1], "z": np.zeros_like(sim[..., 0]), "heading": sim[..., 2],
        "valid": rollouts.sim_valid.cpu().numpy(),
        "log_x": log[..., 0], "log_y": log[..., 1], "log_z": np.zeros_like(log[..., 0]), "log_heading": log[..., 2],
        "log_valid": rollouts.log_valid.cpu().numpy(), "dt": np.array(rollouts.dt),
        "history_steps": np.array(rollouts.history_steps), "ego_index": np.array(rollouts.ego_index),
        **_map_arrays(rollouts),
    }
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def _map_arrays(rollouts) -> dict[str, np.ndarray]:
    """The scene's metric road edges and signals as plain arrays (see the module docstring)."""
    ix = rollouts.map_index
    lines = ix.road_edges.polylines() if ix is not None and ix.has_road_edges else []
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in lines])]).astype(np.int64)
    out = {"road_edge_xy": np.concatenate(lines) if lines else np.zeros((0, 2)), "road_edge_offsets": offsets}
    tl = rollouts.traffic_lights
    t = rollouts.num_steps
    out.update({"tl_lane_segments": tl.lane_segments if tl else np.zeros((0, 4)),
                "tl_segment_lane": tl.segment_lane if tl else np.zeros(0, np.int64),
                "tl_signal_lane": tl.signal_lane if tl else np.zeros(0, np.int64),
                "tl_stop_point": tl.stop_point if tl else np.zeros((0, 2)),
                "tl_red": tl.red if tl else np.zeros((0, t), bool)})
    return out


def load_rollout_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read a file written by ``save_rollouts`` (no pickle); a ``RolloutError`` if it is not one."""
    from envs.metrics.episode import RolloutError

    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise RolloutError(f"{path} is not a readable rollout file ({e}).") from e
    if int(data.get("format_version", -1)) != NPZ_VERSION:
        raise RolloutError(f"{path} is not a trafficgym rollout file of format {NPZ_VERSION}.")
    return data


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
