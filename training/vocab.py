"""``trafficgym train vocab``: build the motion vocabulary of the tokenized policies from a dataset's training
scenes, with coverage figures, and save it as tensors in a checkpoint file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agents.checkpoint import save_checkpoint
from agents.smart.tokenizer import (
    TOKEN_BOX,
    TYPE_NAMES,
    MotionVocabulary,
    build_vocabulary,
    nearest_final,
    segments,
    tokenize,
)
from envs.errors import VocabularyError

VOCAB_FILE_AGENT = "motion_vocabulary"


def build_motion_vocabulary(ds, size: int = 2048, tol: float = 0.05, max_segments: int = 200_000,
                            holdout: float = 0.1, seed: int = 0) -> MotionVocabulary:
    """k-disk vocabularies for every agent type with segments in ``ds``; ``stats`` per type: segments used,
    tokens, fraction clustered, coverage of held-out segments (final contour within ``tol`` of a token's), and
    the mean / max reconstruction error (m, mean corner distance at token boundaries) of tokenizing every
    logged track of up to 64 scenes by the matched roll-out."""
    if len(ds) == 0:
        raise VocabularyError("The split has no scenes: nothing to build a vocabulary from.")
    per_type: dict[int, list[torch.Tensor]] = {}
    for i in range(len(ds)):
        scene = ds[i]
        traj, valid = torch.from_numpy(scene.trajectory), torch.from_numpy(scene.valid)
        for kind in np.unique(scene.agent_type):
            if int(kind) in TOKEN_BOX:
                rows = torch.from_numpy(scene.agent_type == kind)
                per_type.setdefault(int(kind), []).append(segments(traj[rows], valid[rows]))
    rng = np.random.default_rng(seed)
    poses, stats = {}, {}
    for kind, parts in sorted(per_type.items()):
        segs = torch.cat(parts)
        if len(segs) == 0:
            continue
        segs = segs[torch.from_numpy(rng.permutation(len(segs))[:max_segments])]
        n_hold = int(len(segs) * holdout)
        vocab_poses, st = build_vocabulary(segs[n_hold:], size, tol, kind, seed)
        if n_hold:
            _, dist = nearest_final(vocab_poses, segs[:n_hold, -1], TOKEN_BOX[kind])
            st["holdout_coverage"] = round(float((dist < tol).double().mean()), 4)
        poses[TYPE_NAMES[kind]] = vocab_poses
        stats[TYPE_NAMES[kind]] = st
    if not poses:
        raise VocabularyError("No agent of a tokenizable type (vehicle, pedestrian, cyclist) has a 0.5 s logged "
                              "segment in this split.")
    vocab = MotionVocabulary(poses, tol, stats)
    errors: dict[str, list[torch.Tensor]] = {}
    for i in range(min(len(ds), 64)):
        scene = ds[i]
        kinds = torch.from_numpy(scene.agent_type.astype(np.int64))
        keep = torch.tensor([TYPE_NAMES.get(int(k)) in poses for k in kinds.tolist()], dtype=torch.bool)
        _, _, err, _ = tokenize(torch.from_numpy(scene.trajectory)[keep], torch.from_numpy(scene.valid)[keep],
                             kinds[keep], vocab)
        for kind in kinds[keep].unique().tolist():
            e = err[kinds[keep] == kind]
            errors.setdefault(TYPE_NAMES[kind], []).append(e[torch.isfinite(e)])
    for name, parts in errors.items():
        e = torch.cat(parts)
        if len(e):
            stats[name]["reconstruction_mean_m"] = round(float(e.mean()), 4)
            stats[name]["reconstruction_max_m"] = round(float(e.max()), 4)
    return vocab


def save_vocabulary(vocab: MotionVocabulary, path: str | Path, config: dict) -> Path:
    """One safetensors file: the token poses per type, the tolerance and build config, and the statistics."""
    return save_checkpoint(path, VOCAB_FILE_AGENT, {**config, "tol": vocab.tol}, vocab.to_tensors(),
                           extra={"stats": vocab.stats})


def load_vocabulary(path: str | Path) -> MotionVocabulary:
    from agents.checkpoint import load_checkpoint

    config, tensors, extra = load_checkpoint(path, expected_agent=VOCAB_FILE_AGENT)
    vocab = MotionVocabulary.from_tensors(tensors, float(config["tol"]))
    vocab.stats = extra.get("stats", {})
    return vocab
