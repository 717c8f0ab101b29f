"""Behaviour-cloning samples of the tokenized policy: each scene's logged tracks tokenized by the matched roll-out,
and the map pieces around them, padded into batches.

Per scene (``TokenSample``): step boundaries every 0.5 s from the first logged step; at boundary ``s`` the input
is the matched pose, the token that led into it (``-1`` = BOS at the first boundary or after a gap) and the
target is the token of the next 0.5 s (``-1`` where it is not tokenizable: masked out of the loss). The target
is the token nearest to the *logged* pose at ``s + 1`` in the frame of the *matched* pose at ``s``
(SMART's behaviour-cloning target, arXiv 2405.15677), which is what ``tokenizer.tokenize`` chooses.

Batches share maps: the scenes of a batch that lie on the same map are encoded against one set of map pieces
(the union of their crops), so the map encoder, which dominates the cost of a training step, runs once per map
and batch rather than once per scene (``collate``; ``TokenBatch.map_rows`` says which map each scene uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agents.nn.attention import radius_neighbours
from agents.nn.map_pieces import PIECE_POINTS, cached_map_pieces, map_piece_neighbours
from agents.smart.model import TokenBatch
from agents.smart.tokenizer import TYPE_NAMES, MotionVocabulary, tokenize
from envs.errors import VocabularyError


@dataclass
class TokenSample:
    pose: np.ndarray  # (A, S, 3) matched pose at each input boundary
    valid: np.ndarray  # (A, S)
    in_token: np.ndarray  # (A, S) -1 = BOS
    target: np.ndarray  # (A, S) -1 = no target
    agent_type: np.ndarray  # (A,)
    extent: np.ndarray  # (A, 2)
    map_id: str  # the scene's map
    map_piece: np.ndarray  # (M,) sorted indices of the cropped pieces among the map's pieces (cached_map_pieces)
    map_pose: np.ndarray  # (M, 3)
    map_points: np.ndarray  # (M, P, 2)
    map_type: np.ndarray  # (M,)
    map_nbr: np.ndarray  # (M, K_MAP) each cropped piece's neighbours on the whole map (map piece indices, -1: none)
    m2a_nbr: np.ndarray  # (A, S, K_M2A) map pieces each agent-step attends to (map piece indices, -1: none)
    scene_id: str = ""
    next_pose: np.ndarray | None = None  # (A, S, 3) the logged pose 0.5 s ahead in the input pose's frame
    next_pose_valid: np.ndarray | None = None  # (A, S) the agent-steps with a pose target

    @property
    def num_pose_targets(self) -> int:
        return 0 if self.next_pose_valid is None else int(self.next_pose_valid.sum())

    @property
    def num_targets(self) -> int:
        return int((self.target >= 0).sum())


POSE_TARGETS = ("ego", "vehicles")  # whose next poses a pose-predicting model (gmm_ego) is trained on


def scene_sample(scene, vocab: MotionVocabulary, cfg, token_noise: int = 1, seed: int = 0,
                 pose_targets: str | None = None) -> TokenSample:
    """Tokenize one scene (every agent of a type the vocabulary has) and crop its map for ``cfg`` (a
    ``SmartConfig``): the pieces the agent-steps attend to (their ``k_m2a`` nearest within ``m2a_radius``), grown
    by the map neighbours of every map-encoder layer, so those pieces encode exactly as on the whole map (the
    rollouts encode the whole map). ``token_noise`` > 1: the inputs follow a roll-out that applies one of the
    ``token_noise`` nearest tokens at random (``tokenizer.tokenize``; drawn from ``seed`` and the scene id), and
    the targets are the corrections back to the log. ``pose_targets`` (``"ego"`` or ``"vehicles"``; for
    ``agents.gmm_ego``) adds the logged pose 0.5 s ahead of each input pose of the scene's ego or of every vehicle,
    in that input pose's frame (``TokenSample.next_pose``). ``VocabularyError`` for agent types the vocabulary
    lacks."""
    if pose_targets is not None and pose_targets not in POSE_TARGETS:
        from envs.errors import UnknownNameError

        raise UnknownNameError("pose-target set", pose_targets, POSE_TARGETS)
    kinds = scene.agent_type.astype(np.int64)
    missing = sorted({int(k) for k in kinds} - {int(k) for k, n in TYPE_NAMES.items() if n in vocab.poses})
    if missing:
        from envs.types import AgentType

        raise VocabularyError(f"Scene {scene.scene_id} has {[AgentType(k).name for k in missing]} agents but the "
                              f"vocabulary only covers {sorted(vocab.poses)}; rebuild it on this dataset "
                              "(`trafficgym train vocab`).")
    traj, valid = torch.from_numpy(scene.trajectory), torch.from_numpy(scene.valid)
    import zlib

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(scene.scene_id.encode()))
    tokens, matched, _, applied = tokenize(traj, valid, torch.from_numpy(kinds), vocab, noise_k=token_noise,
                                           generator=gen)
    s = tokens.shape[1]
    from agents.smart.tokenizer import TOKEN_STEPS

    b_valid = valid[:, ::TOKEN_STEPS][:, :s + 1]
    in_token = torch.cat([torch.full((len(kinds), 1), -1, dtype=torch.long), applied[:, :-1]], dim=1)
    sample = token_sample(scene, matched[:, :s].numpy(), b_valid[:, :s].numpy(), in_token.numpy(), tokens.numpy(),
                          cfg)
    if pose_targets is not None:
        from envs.geometry import pose_in_frame
        from envs.types import AgentType

        who = np.zeros(len(kinds), bool)
        if pose_targets == "vehicles":
            who[:] = kinds == int(AgentType.VEHICLE)
        elif scene.ego_index >= 0:
            who[scene.ego_index] = True
        ahead = traj[:, ::TOKEN_STEPS][:, 1:s + 1, :3].double()
        sample.next_pose = pose_in_frame(ahead, matched[:, :s].double()).float().numpy()
        sample.next_pose_valid = (b_valid[:, :s] & b_valid[:, 1:s + 1]).numpy() & who[:, None]
    return sample


def token_sample(scene, pose: np.ndarray, ok: np.ndarray, in_token: np.ndarray, target: np.ndarray,
                 cfg, m2a: np.ndarray | None = None) -> TokenSample:
    """A ``TokenSample`` of ``scene`` from its step-boundary poses ``(A, S, 3)``, validity ``(A, S)``, input and
    target tokens ``(A, S)`` (-1: BOS / none), with the map cropped for ``cfg``: the pieces the agent-steps attend
    to (their ``k_m2a`` nearest within ``m2a_radius``; or ``m2a`` ``(A, S, k_m2a)`` map piece indices, -1: none,
    if given), grown by the map neighbours of every map-encoder layer, so those pieces encode exactly as on the
    whole map."""
    crop = np.zeros(0, np.int64)
    given = m2a is not None
    m2a = m2a.copy() if given else np.full((*ok.shape, cfg.k_m2a), -1, np.int64)
    sample_map = {"pose": np.zeros((0, 3), np.float32), "points": np.zeros((0, PIECE_POINTS, 2), np.float32),
                  "type": np.zeros(0, np.int64), "nbr": np.zeros((0, cfg.k_map), np.int64)}
    if scene.map is not None and len(cached_map_pieces(scene.map)["pose"]):
        p = cached_map_pieces(scene.map)
        nbr = map_piece_neighbours(scene.map, cfg.k_map, cfg.map_radius)
        if not given:
            m2a[ok] = radius_neighbours(pose[ok][:, :2], p["tree"], len(p["pose"]), cfg.k_m2a, cfg.m2a_radius)
        m2a[~ok] = -1
        crop = np.unique(m2a[m2a >= 0])
        for _ in range(cfg.map_layers):  # every layer reaches one neighbourhood further
            crop = np.union1d(crop, nbr[crop][nbr[crop] >= 0])
        sample_map = {"pose": p["pose"][crop], "points": p["points"][crop], "type": p["type"][crop],
                      "nbr": nbr[crop]}
    return TokenSample(pose=pose.astype(np.float32), valid=ok, in_token=in_token, target=target,
                       agent_type=scene.agent_type.astype(np.int64), extent=scene.extent.astype(np.float32),
                       map_id=scene.map.map_id if scene.map is not None else "", map_piece=crop,
                       map_pose=sample_map["pose"], map_points=sample_map["points"], map_type=sample_map["type"],
                       map_nbr=sample_map["nbr"], m2a_nbr=m2a, scene_id=scene.scene_id)


def collate(samples: list[TokenSample]) -> TokenBatch:
    """Pad scenes to a ``TokenBatch``: agents to the largest count (padding is invalid). Scenes on the same map
    share one set of map pieces, the union of their crops: ``map_*`` tensors are ``(U, M, ...)`` over the batch's
    U maps, ``map_rows`` ``(B,)`` the map of each scene, ``map_nbr`` ``(U, M, K)`` each piece's neighbours for the
    map encoder and ``m2a_nbr`` ``(B, A, S, K)`` the pieces each agent-step attends to, both as positions in the
    union (-1: none or not held)."""
    b = len(samples)
    a = max(len(x.agent_type) for x in samples)
    s = max(x.pose.shape[1] for x in samples)
    maps = list(dict.fromkeys(x.map_id for x in samples))
    rows = [maps.index(x.map_id) for x in samples]
    unions = []
    for map_id in maps:
        mine = [x for x in samples if x.map_id == map_id]
        ids, first = np.unique(np.concatenate([x.map_piece for x in mine]), return_index=True)
        unions.append((ids, *(np.concatenate([getattr(x, name) for x in mine])[first]
                              for name in ("map_pose", "map_points", "map_type", "map_nbr"))))
    m = max([len(u[0]) for u in unions] + [0])
    out = {
        "pose": torch.zeros(b, a, s, 3), "valid": torch.zeros(b, a, s, dtype=torch.bool),
        "in_token": torch.full((b, a, s), -1, dtype=torch.long), "target": torch.full((b, a, s), -1, dtype=torch.long),
        "agent_type": torch.zeros(b, a, dtype=torch.long), "extent": torch.ones(b, a, 2),
        "map_pose": torch.zeros(len(maps), m, 3), "map_points": torch.zeros(len(maps), m, PIECE_POINTS, 2),
        "map_type": torch.zeros(len(maps), m, dtype=torch.long),
        "map_valid": torch.zeros(len(maps), m, dtype=torch.bool),
        "map_nbr": torch.full((len(maps), m, samples[0].map_nbr.shape[-1]), -1, dtype=torch.long),
        "map_rows": torch.as_tensor(rows, dtype=torch.long),
        "m2a_nbr": torch.full((b, a, s, samples[0].m2a_nbr.shape[-1]), -1, dtype=torch.long),
    }
    for u, (ids, pose, points, kind, nbr) in enumerate(unions):
        n = len(ids)
        out["map_pose"][u, :n] = torch.from_numpy(pose)
        out["map_points"][u, :n] = torch.from_numpy(points)
        out["map_type"][u, :n] = torch.from_numpy(kind)
        out["map_valid"][u, :n] = True
        out["map_nbr"][u, :n] = torch.from_numpy(_positions(ids, nbr))
    for i, x in enumerate(samples):
        na, ns = len(x.agent_type), x.pose.shape[1]
        out["pose"][i, :na, :ns] = torch.from_numpy(x.pose)
        out["valid"][i, :na, :ns] = torch.from_numpy(x.valid)
        out["in_token"][i, :na, :ns] = torch.from_numpy(x.in_token)
        out["target"][i, :na, :ns] = torch.from_numpy(x.target)
        out["agent_type"][i, :na] = torch.from_numpy(x.agent_type)
        out["extent"][i, :na] = torch.from_numpy(x.extent)
        out["m2a_nbr"][i, :na, :ns] = torch.from_numpy(_positions(unions[rows[i]][0], x.m2a_nbr))
    if any(x.next_pose is not None for x in samples):
        out["next_pose"], out["next_pose_valid"] = torch.zeros(b, a, s, 3), torch.zeros(b, a, s, dtype=torch.bool)
        for i, x in enumerate(samples):
            if x.next_pose is not None:
                na, ns = x.next_pose.shape[:2]
                out["next_pose"][i, :na, :ns] = torch.from_numpy(x.next_pose)
                out["next_pose_valid"][i, :na, :ns] = torch.from_numpy(x.next_pose_valid)
    return TokenBatch(**out)


def _positions(ids: np.ndarray, pieces: np.ndarray) -> np.ndarray:
    """Map piece indices ``pieces`` (any shape, -1: none) as positions in the sorted ``ids`` (-1 where absent)."""
    if len(ids) == 0:
        return np.full(pieces.shape, -1, np.int64)
    pos = np.searchsorted(ids, pieces).clip(max=len(ids) - 1)
    return np.where((pieces >= 0) & (ids[pos] == pieces), pos, -1)
