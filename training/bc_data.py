"""Behaviour-cloning samples of the tokenized policy: each scene's logged tracks tokenized by the matched roll-out,
and the map pieces around them, padded into batches.

Per scene (``TokenSample``): step boundaries every 0.5 s from the first logged step; at boundary ``s`` the input
is the matched pose, the token that led into it (``-1`` = BOS at the first boundary or after a gap) and the
target is the token of the next 0.5 s (``-1`` where it is not tokenizable: masked out of the loss). The target
is the token nearest to the *logged* pose at ``s + 1`` in the frame of the *matched* pose at ``s``
(METHODS.md §2), which is what ``tokenizer.tokenize`` chooses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agents.tokenizer import TYPE_NAMES, MotionVocabulary, map_pieces, tokenize
from envs.errors import VocabularyError


@dataclass
class TokenSample:
    pose: np.ndarray  # (A, S, 3) matched pose at each input boundary
    valid: np.ndarray  # (A, S)
    in_token: np.ndarray  # (A, S) -1 = BOS
    target: np.ndarray  # (A, S) -1 = no target
    agent_type: np.ndarray  # (A,)
    extent: np.ndarray  # (A, 2)
    map_pose: np.ndarray  # (M, 3)
    map_points: np.ndarray  # (M, P, 2)
    map_type: np.ndarray  # (M,)
    map_nbr: np.ndarray  # (M, K_MAP) nearest pieces within the map radius (-1: none)
    m2a_nbr: np.ndarray  # (A, S, K_M2A) nearest pieces of each agent-step within the map->agent radius (-1: none)
    scene_id: str = ""

    @property
    def num_targets(self) -> int:
        return int((self.target >= 0).sum())


_PIECES: dict[str, dict] = {}


def _pieces(m) -> dict:
    if m.map_id not in _PIECES:
        from scipy.spatial import cKDTree

        p = map_pieces(m)
        p["tree"] = cKDTree(p["pose"][:, :2] if len(p["pose"]) else np.zeros((1, 2)))
        _PIECES[m.map_id] = p
    return _PIECES[m.map_id]


def _neighbours(points: np.ndarray, tree, count: int, k: int, radius: float) -> np.ndarray:
    """``(len(points), k)`` indices of the ``k`` nearest of ``count`` tree points within ``radius`` (-1: none),
    nearest first (what ``agents.layers.knn`` computes on the fly at rollout)."""
    if count == 0 or len(points) == 0:
        return np.full((len(points), k), -1, np.int64)
    _, idx = tree.query(points, k=min(k, count), distance_upper_bound=radius)
    idx = np.asarray(idx).reshape(len(points), -1)
    idx = np.where(idx >= count, -1, idx)
    return np.pad(idx, ((0, 0), (0, k - idx.shape[1])), constant_values=-1).astype(np.int64)


def scene_sample(scene, vocab: MotionVocabulary, cfg) -> TokenSample:
    """Tokenize one scene (every agent of a type the vocabulary has), crop its map to the pieces within the
    map->agent radius + 5 m (a piece's length) of any logged boundary pose, and find the map and map->agent
    neighbours of ``cfg`` (a ``SmartConfig``). ``VocabularyError`` for agent types the vocabulary lacks."""
    map_radius = cfg.m2a_radius
    kinds = scene.agent_type.astype(np.int64)
    missing = sorted({int(k) for k in kinds} - {int(k) for k, n in TYPE_NAMES.items() if n in vocab.poses})
    if missing:
        from envs.types import AgentType

        raise VocabularyError(f"Scene {scene.scene_id} has {[AgentType(k).name for k in missing]} agents but the "
                              f"vocabulary only covers {sorted(vocab.poses)}; rebuild it on this dataset "
                              "(`trafficgym train vocab`).")
    traj, valid = torch.from_numpy(scene.trajectory), torch.from_numpy(scene.valid)
    tokens, matched, _ = tokenize(traj, valid, torch.from_numpy(kinds), vocab)
    s = tokens.shape[1]
    from agents.tokenizer import TOKEN_STEPS

    b_valid = valid[:, ::TOKEN_STEPS][:, :s + 1]
    in_token = torch.cat([torch.full((len(kinds), 1), -1, dtype=torch.long), tokens[:, :-1]], dim=1)
    pose = matched[:, :s].numpy()
    ok = b_valid[:, :s].numpy()
    sample_map = {"pose": np.zeros((0, 3), np.float32), "points": np.zeros((0, 11, 2), np.float32),
                  "type": np.zeros(0, np.int64)}
    if scene.map is not None:
        p = _pieces(scene.map)
        if len(p["pose"]):
            pts = pose[ok][:, :2]
            near = sorted({j for js in p["tree"].query_ball_point(pts, map_radius + 5.0) for j in js}) \
                if len(pts) else []
            near = np.asarray(near, dtype=np.int64)
            sample_map = {"pose": p["pose"][near], "points": p["points"][near], "type": p["type"][near]}
    from scipy.spatial import cKDTree

    m = len(sample_map["pose"])
    tree = cKDTree(sample_map["pose"][:, :2]) if m else None
    map_nbr = _neighbours(sample_map["pose"][:, :2], tree, m, cfg.k_map, cfg.map_radius)
    m2a = _neighbours(pose[..., :2].reshape(-1, 2), tree, m, cfg.k_m2a, map_radius).reshape(*pose.shape[:2],
                                                                                        cfg.k_m2a)
    return TokenSample(pose=pose.astype(np.float32), valid=ok, in_token=in_token.numpy(), target=tokens.numpy(),
                       agent_type=kinds, extent=scene.extent.astype(np.float32), map_pose=sample_map["pose"],
                       map_points=sample_map["points"], map_type=sample_map["type"], map_nbr=map_nbr,
                       m2a_nbr=m2a, scene_id=scene.scene_id)


def collate(samples: list[TokenSample]) -> dict[str, torch.Tensor]:
    """Pad scenes to a batch: agents to the largest count, map pieces likewise (padding is invalid)."""
    b = len(samples)
    a = max(len(x.agent_type) for x in samples)
    s = max(x.pose.shape[1] for x in samples)
    m = max(len(x.map_pose) for x in samples)
    out = {
        "pose": torch.zeros(b, a, s, 3), "valid": torch.zeros(b, a, s, dtype=torch.bool),
        "in_token": torch.full((b, a, s), -1, dtype=torch.long), "target": torch.full((b, a, s), -1, dtype=torch.long),
        "agent_type": torch.zeros(b, a, dtype=torch.long), "extent": torch.ones(b, a, 2),
        "map_pose": torch.zeros(b, m, 3), "map_points": torch.zeros(b, m, 11, 2),
        "map_type": torch.zeros(b, m, dtype=torch.long), "map_valid": torch.zeros(b, m, dtype=torch.bool),
        "map_nbr": torch.full((b, m, samples[0].map_nbr.shape[-1]), -1, dtype=torch.long),
        "m2a_nbr": torch.full((b, a, s, samples[0].m2a_nbr.shape[-1]), -1, dtype=torch.long),
    }
    for i, x in enumerate(samples):
        na, ns, nm = len(x.agent_type), x.pose.shape[1], len(x.map_pose)
        out["pose"][i, :na, :ns] = torch.from_numpy(x.pose)
        out["valid"][i, :na, :ns] = torch.from_numpy(x.valid)
        out["in_token"][i, :na, :ns] = torch.from_numpy(x.in_token)
        out["target"][i, :na, :ns] = torch.from_numpy(x.target)
        out["agent_type"][i, :na] = torch.from_numpy(x.agent_type)
        out["extent"][i, :na] = torch.from_numpy(x.extent)
        out["map_pose"][i, :nm] = torch.from_numpy(x.map_pose)
        out["map_points"][i, :nm] = torch.from_numpy(x.map_points)
        out["map_type"][i, :nm] = torch.from_numpy(x.map_type)
        out["map_valid"][i, :nm] = True
        out["map_nbr"][i, :nm] = torch.from_numpy(x.map_nbr)
        out["m2a_nbr"][i, :na, :ns] = torch.from_numpy(x.m2a_nbr)
    return out
