"""Training data of the latent diffusion policy: every vehicle's logged future as unicycle actions.

The actions are the unicycle's inverse of the log (``envs.dynamics.Unicycle.inverse``: acceleration from the
speed change, yaw rate from the heading change, step by step), so replaying them reproduces the logged heading and
speed exactly and the positions as far as the logged displacements agree with the logged speeds (measured by
``benchmarks/dynamics_roundtrip.py``). A sequence starts at a step where the vehicle is in the log and runs
``horizon`` steps; its mask ends at the first step the log does not cover. The target positions are the logged
ones in the frame of the start pose.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from envs.dynamics import Unicycle, speed_along_heading
from envs.geometry import pose_in_frame
from envs.types import AgentType


class _Tensors:
    """``to(device)`` for a dataclass whose fields are all tensors."""

    def to(self, device):
        return type(self)(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class ActionBatch(_Tensors):
    """``N`` action sequences: actions ``(N, H, 2)`` (acceleration m/s², yaw rate rad/s), mask ``(N, H)``,
    positions ``(N, H, 2)`` (the logged positions after each action, in the start pose's frame), v0 ``(N,)`` the
    start speed (m/s)."""

    actions: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    v0: torch.Tensor

    def __len__(self) -> int:
        return self.actions.shape[0]

    def __getitem__(self, idx) -> ActionBatch:
        return ActionBatch(*(getattr(self, f.name)[idx] for f in fields(self)))

    @staticmethod
    def cat(parts: list[ActionBatch]) -> ActionBatch:
        return ActionBatch(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ActionBatch)))


def scene_actions(scene) -> tuple[torch.Tensor, torch.Tensor]:
    """The unicycle's inverse of the whole log: actions ``(A, T-1, 2)`` (float64) and where both steps are valid
    ``(A, T-1)``."""
    log = torch.as_tensor(scene.trajectory, dtype=torch.float64)
    valid = torch.as_tensor(scene.valid)
    return Unicycle().inverse(log[:, :-1], log[:, 1:], scene.dt), valid[:, :-1] & valid[:, 1:]


def action_sequences(scene, horizon: int, starts, min_steps: int = 1) -> tuple[ActionBatch, np.ndarray]:
    """Every vehicle's logged action sequence of ``horizon`` steps from each of the ``starts`` steps where it is
    valid and its next ``min_steps`` steps are known: an ``ActionBatch`` and ``(N, 2)`` the (agent, start) of each
    row. Actions past the end of the log or after a gap are masked (and zero)."""
    actions, pair = scene_actions(scene)
    log = torch.as_tensor(scene.trajectory, dtype=torch.float64)
    valid = torch.as_tensor(scene.valid)
    vehicle = torch.as_tensor(scene.agent_type) == int(AgentType.VEHICLE)
    t_max = scene.num_steps - 1
    out, where = [], []
    for t0 in starts:
        if t0 >= t_max:
            continue
        k = torch.arange(horizon)
        t = (t0 + k).clamp(max=t_max - 1)
        inside = (t0 + k) < t_max
        mask = (pair[:, t] & inside).cumprod(dim=1).bool()  # (A, H): up to the first unknown step
        keep = vehicle & valid[:, t0] & (mask.sum(1) >= min_steps)
        if not keep.any():
            continue
        a = keep.nonzero()[:, 0]
        frame = log[a, t0, :3]
        nxt = log[a][:, (t + 1).clamp(max=t_max), :3]
        pos = pose_in_frame(nxt, frame[:, None])[..., :2]
        m = mask[a]
        out.append(ActionBatch(torch.where(m[..., None], actions[a][:, t], 0.0).float(), m,
                               torch.where(m[..., None], pos, 0.0).float(), speed_along_heading(log[a, t0]).float()))
        where.append(np.stack([a.numpy(), np.full(len(a), t0)], axis=1))
    if not out:
        return ActionBatch(torch.zeros(0, horizon, 2), torch.zeros(0, horizon, dtype=torch.bool),
                           torch.zeros(0, horizon, 2), torch.zeros(0)), np.zeros((0, 2), np.int64)
    return ActionBatch.cat(out), np.concatenate(where)


def dataset_actions(ds, horizon: int, scenes: int | None = None, start_every: int = 5, first_start: int = 10,
                    min_steps: int = 10, progress: bool = False) -> ActionBatch:
    """``action_sequences`` of the first ``scenes`` scenes of ``ds`` (all: None), starting at ``first_start``,
    ``first_start + start_every``, ... (the replanning steps of a closed-loop rollout)."""
    n = len(ds) if scenes is None else min(scenes, len(ds))
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="action sequences", unit="scene")
    parts = []
    for i in it:
        scene = ds[i]
        parts.append(action_sequences(scene, horizon, range(first_start, scene.num_steps - 1, start_every),
                                      min_steps)[0])
    return ActionBatch.cat(parts)


@dataclass
class DiffusionBatch(_Tensors):
    """``B`` scenes at one step each, for the diffusion model's loss: the distinct maps' pieces ``map_*`` (``U``
    maps: points ``(U, M, P, 2)``, pose ``(U, M, 3)``, type, valid ``(U, M)``, neighbours ``(U, M, k_map)``) and
    each row's map ``map_rows`` ``(B,)``; every agent's history features ``hist`` ``(B, A, history, 6)``, pose
    ``(B, A, 3)``, ``valid``, ``agent_type`` ``(B, A)``, ``extent`` ``(B, A, 2)``; and the ``N`` target agents
    (``target_rows`` ``(N,)`` into the flattened ``(B * A)``) with their logged action sequences ``actions``
    ``(N, H, 2)``, ``mask`` ``(N, H)``, start speed ``v0`` ``(N,)``."""

    map_points: torch.Tensor
    map_pose: torch.Tensor
    map_type: torch.Tensor
    map_valid: torch.Tensor
    map_nbr: torch.Tensor
    map_rows: torch.Tensor
    hist: torch.Tensor
    pose: torch.Tensor
    valid: torch.Tensor
    agent_type: torch.Tensor
    extent: torch.Tensor
    target_rows: torch.Tensor
    actions: torch.Tensor
    mask: torch.Tensor
    v0: torch.Tensor


def diffusion_batch(items, cfg, horizon: int, min_steps: int | None = None) -> DiffusionBatch:
    """A ``DiffusionBatch`` of ``items``: ``(scene, start step)`` pairs; ``cfg`` a ``DiffusionConfig`` (history
    length, map neighbours). The targets are the vehicles valid at the start with at least ``min_steps`` (default:
    all ``horizon``) known future actions."""
    from agents.latent_diffusion.denoiser import history_features
    from agents.nn.map_pieces import cached_map_pieces, map_piece_neighbours

    min_steps = horizon if min_steps is None else min_steps
    a_max = max(scene.num_agents for scene, _ in items)
    maps: dict[str, int] = {}
    for scene, _ in items:
        maps.setdefault(scene.map_id, len(maps))
    sources = {scene.map_id: scene.map for scene, _ in items}
    pieces = [cached_map_pieces(sources[m]) for m in maps]
    m_max = max(1, max(len(p["pose"]) for p in pieces))
    u = len(maps)
    from agents.nn.map_pieces import PIECE_POINTS

    points = torch.zeros(u, m_max, PIECE_POINTS, 2)
    mpose = torch.zeros(u, m_max, 3)
    mtype = torch.zeros(u, m_max, dtype=torch.long)
    mvalid = torch.zeros(u, m_max, dtype=torch.bool)
    nbr = torch.full((u, m_max, cfg.k_map), -1, dtype=torch.long)
    for i, (m, p) in enumerate(zip(maps, pieces, strict=True)):
        n = len(p["pose"])
        points[i, :n], mpose[i, :n] = torch.as_tensor(p["points"]), torch.as_tensor(p["pose"])
        mtype[i, :n], mvalid[i, :n] = torch.as_tensor(p["type"]), True
        nbr[i, :n] = torch.as_tensor(map_piece_neighbours(sources[m], cfg.k_map, cfg.map_radius))
    b = len(items)
    hist = torch.zeros(b, a_max, cfg.history, 6)
    pose = torch.zeros(b, a_max, 3)
    valid = torch.zeros(b, a_max, dtype=torch.bool)
    kind = torch.zeros(b, a_max, dtype=torch.long)
    extent = torch.zeros(b, a_max, 2)
    rows, parts = [], []
    for r, (scene, t0) in enumerate(items):
        a = scene.num_agents
        traj = torch.as_tensor(scene.trajectory, dtype=torch.float32)[None]
        ok = torch.as_tensor(scene.valid)[None]
        h, now = history_features(traj, ok, torch.tensor([t0]), cfg.history)
        hist[r, :a], pose[r, :a], valid[r, :a] = h[0], now[0], ok[0, :, t0]
        kind[r, :a] = torch.as_tensor(scene.agent_type.astype(np.int64))
        extent[r, :a] = torch.as_tensor(scene.extent, dtype=torch.float32)
        seq, where = action_sequences(scene, horizon, [t0], min_steps)
        parts.append(seq)
        rows.append(torch.as_tensor(r * a_max + where[:, 0], dtype=torch.long))
    seqs = ActionBatch.cat(parts)
    return DiffusionBatch(points, mpose, mtype, mvalid, nbr, torch.tensor([maps[s.map_id] for s, _ in items]),
                          hist, pose, valid, kind, extent, torch.cat(rows), seqs.actions, seqs.mask, seqs.v0)
