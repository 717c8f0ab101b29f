"""One closed-loop episode of registered agents on one scene, rendered to a video (``trafficgym render``).

Settings:
- ``sim_agents``: the agent drives every agent valid at the start step; the others replay their log.
- ``ego``: the agent drives the ego; ``traffic`` (a registered agent name, or ``"log"``) drives everyone else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.inference_mode()
def record_agent_video(agent_name: str, dataset, scene_id: str, out: str | Path, setting: str = "sim_agents",
                       traffic: str = "log", checkpoint: str | None = None, traffic_checkpoint: str | None = None,
                       agent_config: dict | None = None, side_by_side: bool = False,
                       config=None, fps: float | None = None, start_step: int = 10, seed: int = 0) -> Path:
    """Roll the agent out on ``scene_id`` of ``dataset`` (a ``SceneDataset``) and write the video to ``out``.

    The output path and extension are checked before any simulation; ``fps`` defaults to real time.
    """
    from agents.registry import make_agent
    from envs import sim
    from envs.errors import UnknownNameError
    from render.renderer import RenderConfig, render_frame
    from render.video import check_video_path, side_by_side_frame, write_video
    from training.rollouts import SETTINGS, drive

    if setting not in SETTINGS:
        raise UnknownNameError("setting", setting, SETTINGS)
    path = check_video_path(out)
    scene = dataset[dataset.index_of(scene_id)]
    config = config or RenderConfig()
    agent = make_agent(agent_name, checkpoint=checkpoint, **(agent_config or {}))
    other = None if traffic == "log" else make_agent(traffic, checkpoint=traffic_checkpoint)
    maps = sim.stack_maps([scene.map], indices=[dataset.map_index(scene.map_id)])
    state = sim.reset([scene], start_step=start_step, controlled="all" if setting == "sim_agents" else "ego",
                      maps=maps)
    mine = state.controlled[0].numpy()
    rest = state.agent_mask[0].numpy() & ~mine
    # Outline colours: 1 = the agent, 2 = the traffic policy, -1 = log replay.
    driven_by = np.where(mine, 1, np.where(rest & (other is not None), 2, -1))
    frames = []

    def frame(st) -> None:
        if side_by_side:
            frames.append(side_by_side_frame(st, scene.map, 0, config, driven_by=driven_by))
        else:
            frames.append(render_frame(st, scene.map, 0, config, driven_by=driven_by,
                                       title=f"{agent_name} ({setting})"))

    drive(state, agent, other, seed, on_step=frame)
    return write_video(frames, path, fps or 1.0 / scene.dt)
