"""Motion tokens (SMART-style): a vocabulary of 0.5 s box-contour motions per agent type, built from the training
scenes by k-disk clustering, and the tokenizer that turns logged tracks into token sequences.

A token is the sequence of ``TOKEN_STEPS + 1`` poses (x, y, heading) of a fixed-size box over 0.5 s, in the frame
of its first pose (so pose 0 is the origin). Token 0 is "stand still". Contours are the box's four corners
(``TOKEN_BOX``); distances between contours are mean corner distances (m).

Building (``build_vocabulary``): sample 5-step segments with both ends valid, normalise them to their first
pose, start from token 0, then repeatedly pick a random remaining segment as a centre, cover every remaining
segment whose final contour is within ``tol`` of the centre's, make the token the mean of the covered segments,
and remove them — until the vocabulary is full or nothing is left. The vocabulary is built from our own data
(never from random dummy data, whose tokens barely cover lateral motion, as CAT-K found of SMART's published
vocabulary: Zhang et al., arXiv 2412.05334) and saved as tensors (``to_tensors``) inside a
checkpoint.

Tokenizing (``tokenize``): roll forward from the first pose; at each 0.5 s step place every token's final contour
at the previous *matched* pose and choose the one with the smallest mean corner distance to the logged contour;
the matched contour gives the next pose. Steps whose end is not logged have no token (-1) and the roll-out
restarts at the next logged pose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from envs.errors import VocabularyError
from envs.geometry import box_corners, pose_from_frame, pose_in_frame
from envs.types import AgentType

TOKEN_STEPS = 5  # steps per token (0.5 s at 10 Hz)
TOKEN_BOX = {AgentType.VEHICLE: (4.8, 2.0), AgentType.CYCLIST: (2.0, 1.0), AgentType.PEDESTRIAN: (1.0, 1.0)}
TYPE_NAMES = {AgentType.VEHICLE: "vehicle", AgentType.PEDESTRIAN: "pedestrian", AgentType.CYCLIST: "cyclist"}


def _relative(poses: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Poses ``(..., K, 3)`` in the frame of ``origin`` ``(..., 3)`` (heading wrapped)."""
    return pose_in_frame(poses, origin[..., None, :])


def place(local: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Local poses ``(..., K, 3)`` placed at world poses ``origin`` ``(..., 3)`` (inverse of ``_relative``)."""
    return pose_from_frame(local, origin[..., None, :])


def contour(poses: torch.Tensor, box: tuple[float, float]) -> torch.Tensor:
    """Corners ``(..., 4, 2)`` of a ``box`` (length, width) at poses ``(..., 3)``."""
    length = torch.full_like(poses[..., 0], box[0])
    return box_corners(poses[..., 0], poses[..., 1], poses[..., 2], length, torch.full_like(length, box[1]))


def contour_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean corner distance (m) of contours ``(..., 4, 2)``."""
    return (a - b).norm(dim=-1).mean(dim=-1)


def segments(traj: torch.Tensor, valid: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Every ``TOKEN_STEPS``-step window of logged tracks with all its steps valid, in the frame of its first pose.

    traj ``(A, T, >=3)`` x, y, heading (...); valid ``(A, T)``. Returns ``(S, TOKEN_STEPS + 1, 3)``.
    """
    k = TOKEN_STEPS + 1
    if traj.shape[1] < k:
        return traj.new_zeros((0, k, 3))
    windows = traj[..., :3].unfold(1, k, stride).permute(0, 1, 3, 2)  # (A, W, k, 3)
    ok = valid.unfold(1, k, stride).all(dim=-1)  # (A, W)
    w = windows[ok]
    return _relative(w, w[:, 0])


@dataclass
class MotionVocabulary:
    """Token poses per agent type: ``poses[type_name]`` ``(V, TOKEN_STEPS + 1, 3)``, pose 0 = origin, token 0 =
    standing still; ``tol``: the clustering tolerance (m); ``stats``: coverage figures from the build."""

    poses: dict[str, torch.Tensor]
    tol: float
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, p in self.poses.items():
            if p.dim() != 3 or p.shape[1:] != (TOKEN_STEPS + 1, 3) or len(p) < 1:
                raise VocabularyError(f"Vocabulary for {name!r} must be (V, {TOKEN_STEPS + 1}, 3), got "
                                      f"{tuple(p.shape)}.")
            if p[0].abs().max() > 1e-6:
                raise VocabularyError(f"Token 0 of the {name!r} vocabulary must be 'stand still' (all zeros).")

    def size(self, agent_type: AgentType) -> int:
        return len(self.for_type(agent_type))

    def for_type(self, agent_type: AgentType) -> torch.Tensor:
        name = TYPE_NAMES.get(AgentType(int(agent_type)))
        if name is None or name not in self.poses:
            raise VocabularyError(f"The motion vocabulary has no tokens for {AgentType(int(agent_type)).name} "
                                  f"agents (it has {sorted(self.poses)}); rebuild it on data with such agents "
                                  "(`trafficgym train vocab`) or leave them to another policy.")
        return self.poses[name]

    def to_tensors(self, prefix: str = "vocab.") -> dict[str, torch.Tensor]:
        return {f"{prefix}{name}": p.float().contiguous() for name, p in self.poses.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], tol: float, prefix: str = "vocab.") -> MotionVocabulary:
        poses = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not poses:
            raise VocabularyError(f"No '{prefix}*' tensors: this file holds no motion vocabulary.")
        return cls(poses, tol)


def build_vocabulary(segs: torch.Tensor, size: int, tol: float, agent_type: AgentType = AgentType.VEHICLE,
                     seed: int = 0) -> tuple[torch.Tensor, dict]:
    """k-disk clustering of ``(S, TOKEN_STEPS + 1, 3)`` normalised segments into at most ``size`` tokens.

    Returns the token poses ``(V, TOKEN_STEPS + 1, 3)`` (token 0 = still) and statistics: ``segments``,
    ``tokens``, ``clustered`` (fraction of segments removed into some token's disk).
    """
    if size < 1 or tol <= 0:
        raise ValueError(f"Vocabulary size must be >= 1 and tol > 0, got size={size}, tol={tol}.")
    if len(segs) == 0:
        raise VocabularyError(f"No training segments for {AgentType(int(agent_type)).name} agents: nothing to "
                              "cluster (is the split empty, or does it have no such agents?).")
    box = TOKEN_BOX[AgentType(int(agent_type))]
    segs = segs.double()
    final = contour(segs[:, -1], box)  # (S, 4, 2)
    still = torch.zeros(TOKEN_STEPS + 1, 3, dtype=segs.dtype)
    tokens = [still]
    remaining = contour_distance(final, contour(still[-1], box)) >= tol
    rng = np.random.default_rng(seed)
    while len(tokens) < size and remaining.any():
        left = remaining.nonzero().squeeze(-1)
        centre = int(left[rng.integers(len(left))])
        covered = remaining & (contour_distance(final, final[centre]) < tol)
        members = segs[covered]
        heading = torch.atan2(members[..., 2].sin().mean(0), members[..., 2].cos().mean(0))
        tokens.append(torch.cat([members[..., :2].mean(0), heading[:, None]], dim=-1))
        remaining &= ~covered
    poses = torch.stack(tokens).float()
    poses[:, 0] = 0  # pose 0 is the origin of every token
    return poses, {"segments": len(segs), "tokens": len(poses),
                   "clustered": round(1 - float(remaining.double().mean()), 4)}


def nearest_final(vocab_poses: torch.Tensor, local_final: torch.Tensor, box: tuple[float, float],
                  chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and mean corner distance of the token whose final contour is nearest to each ``(S, 3)`` local pose."""
    idx, dist = nearest_finals(vocab_poses, local_final, box, 1, chunk)
    return idx[:, 0], dist[:, 0]


def nearest_finals(vocab_poses: torch.Tensor, local_final: torch.Tensor, box: tuple[float, float], k: int,
                   chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and mean corner distances ``(S, k)`` of the ``k`` tokens whose final contours are nearest to each
    ``(S, 3)`` local pose, nearest first."""
    token_c = contour(vocab_poses[:, -1].double(), box)  # (V, 4, 2)
    k = min(k, len(vocab_poses))
    idx, dist = [], []
    for part in local_final.double().split(chunk):
        d = contour_distance(contour(part, box)[:, None], token_c[None])  # (s, V)
        best = d.topk(k, dim=-1, largest=False) if k > 1 else d.min(dim=-1, keepdim=True)
        idx.append(best.indices)
        dist.append(best.values)
    if not idx:
        return torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k), dtype=torch.float64)
    return torch.cat(idx), torch.cat(dist)


def tokenize(traj: torch.Tensor, valid: torch.Tensor, agent_type: torch.Tensor, vocab: MotionVocabulary,
             start: int = 0, noise_k: int = 1, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token sequences of logged tracks by the matched roll-out.

    traj ``(A, T, >=3)``, valid ``(A, T)``, agent_type ``(A,)``. Steps ``s = 0 .. S-1`` cover log steps
    ``start + 5 s .. start + 5 (s + 1)``. At each step the target token is the one whose end lies nearest to the
    logged pose at ``s + 1`` from the roll-out's pose at ``s``; the roll-out then moves by the *applied* token:
    the target itself, or with ``noise_k > 1`` one of the ``noise_k`` nearest drawn at random (SMART's noised
    tokenization: the roll-out strays from the log the way a policy's does, and the targets teach the way back).

    Returns tokens ``(A, S)`` (targets; -1 where the step is not tokenizable), matched poses ``(A, S + 1, 3)``
    (the roll-out's pose at each token boundary; the log's pose where a roll-out restarts), ``(A, S)`` the
    roll-out contour's mean corner distance to the log at the end of each step (m; NaN where there is no token)
    and the applied tokens ``(A, S)`` (equal to the targets without noise).
    """
    if noise_k < 1:
        raise ValueError(f"noise_k must be >= 1 (1: no noise), got {noise_k}.")
    a, t = valid.shape
    n_steps = max((t - 1 - start) // TOKEN_STEPS, 0)
    at = start + TOKEN_STEPS * torch.arange(n_steps + 1)
    gt, gt_valid = traj[:, at, :3].double(), valid[:, at]
    tokens = torch.full((a, n_steps), -1, dtype=torch.long)
    applied = tokens.clone()
    error = torch.full((a, n_steps), float("nan"), dtype=torch.float64)
    matched = gt.clone()
    for kind in agent_type.unique().tolist():
        rows = (agent_type == kind).nonzero().squeeze(-1)
        if not gt_valid[rows].any():
            continue
        poses = vocab.for_type(AgentType(kind)).double()
        box = TOKEN_BOX[AgentType(kind)]
        for s in range(n_steps):
            ok = gt_valid[rows, s] & gt_valid[rows, s + 1]
            r = rows[ok]
            if len(r) == 0:
                continue
            local = _relative(gt[r, s + 1][:, None], matched[r, s])[:, 0]  # the log's next pose, matched frame
            near, _ = nearest_finals(poses, local, box, noise_k)  # (n, k)
            pick = torch.randint(0, near.shape[1], (len(r),), generator=generator) if noise_k > 1 else \
                torch.zeros(len(r), dtype=torch.long)
            idx = near.gather(1, pick[:, None])[:, 0]
            tokens[r, s], applied[r, s] = near[:, 0], idx
            matched[r, s + 1] = place(poses[idx, -1][:, None], matched[r, s])[:, 0]
            error[r, s] = contour_distance(contour(matched[r, s + 1], box), contour(gt[r, s + 1], box))
    return tokens, matched.float(), error, applied


def token_poses(vocab_poses: torch.Tensor, tokens: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """The 10 Hz poses 1..TOKEN_STEPS of ``tokens`` ``(...)`` placed at world poses ``origin`` ``(..., 3)``:
    ``(..., TOKEN_STEPS, 3)``."""
    return place(vocab_poses[tokens][..., 1:, :].to(origin.dtype), origin)


# ---- map tokens ------------------------------------------------------------------------------------------------
# Direct polyline encoding, not a learned map vocabulary: every 5 m piece keeps its exact geometry (a vocabulary
# would snap it to the nearest of ~1k shapes), there is no second vocabulary to build and ship, and encoding a
# piece is one small MLP either way.
