"""Closed-loop rollouts for evaluation: R samples of one scene at once, their ``Rollouts`` container, and the
stable npz format ``trafficgym eval --save-rollouts`` writes.

Settings (WOSAC protocol by default: 1.1 s of logged history, then the rest of the scene at 10 Hz):
- ``sim_agents``: the agent drives every agent valid at the start step; they are the evaluated agents.
  Agents that enter later replay their log and are interaction context (identical in every rollout).
- ``ego``: the agent drives the ego; ``traffic`` (a registered agent name or ``"log"``) drives the others.
  Every agent of the scene is evaluated (traffic differs between rollouts when it is reactive), and the ego
  planning metrics read ``ego_index``.

npz format (version 1), one file per scene, ``<scene_id>.npz``, plain arrays (``np.load(allow_pickle=False)``):
    format_version ()           1
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
Official WOSAC tooling expects 80 future steps of (x, y, z, heading) for 32 rollouts per evaluated object:
``x[:, :, history_steps:]`` etc. are exactly that on the towns data (91 steps, history 11).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from envs.errors import UnknownNameError

SETTINGS = ("sim_agents", "ego")
NPZ_VERSION = 1


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


@torch.inference_mode()
def simulate_scene(agent, ds, scene_index: int, num_rollouts: int, setting: str = "sim_agents",
                   traffic=None, start_step: int = 10, seed: int = 0):
    """``num_rollouts`` closed-loop samples of scene ``scene_index`` of ``ds`` as an ``envs.metrics.episode.Rollouts``.

    ``agent`` / ``traffic``: ``agents.base.Agent`` objects (``traffic`` None: log replay). The rollouts run as one
    batch of R copies of the scene; stochastic agents draw different samples per row; ``seed`` makes the whole
    call reproducible.
    """
    from envs import sim
    from envs.metrics.episode import Rollouts

    if setting not in SETTINGS:
        raise UnknownNameError("setting", setting, SETTINGS)
    scene = ds[scene_index]
    maps = sim.stack_maps([scene.map], indices=[ds.map_index(scene.map_id)])
    state = sim.reset([scene] * num_rollouts, start_step=start_step,
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
    return Rollouts(
        scene_id=scene.scene_id, agent_ids=scene.agent_ids[idx.numpy()],
        agent_type=torch.as_tensor(scene.agent_type[idx.numpy()]).long(), extent=torch.as_tensor(scene.extent)[idx],
        sim=state.traj[:, idx].clone(), sim_valid=state.valid[:, idx].clone(), log=log[idx], log_valid=log_valid[idx],
        history_steps=start_step + 1, dt=scene.dt, map_index=ds.map_index(scene.map_id), ego_index=ego,
        context=log[others] if has_context else None, context_valid=log_valid[others] if has_context else None,
        context_extent=torch.as_tensor(scene.extent)[others] if has_context else None,
    )


def save_rollouts(rollouts, directory: str | Path) -> Path:
    """Write one scene's rollouts in the npz format of the module docstring (atomic)."""
    import os
    import tempfile

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
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
    return path


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
