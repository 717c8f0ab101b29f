"""Motion tokens: segments, k-disk vocabulary, the matched roll-out tokenizer, saving, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.smart.tokenizer import (
    TOKEN_STEPS,
    MotionVocabulary,
    _relative,
    build_vocabulary,
    place,
    segments,
    token_poses,
    tokenize,
)
from envs.errors import CheckpointError, VocabularyError
from envs.types import AgentType
from tests import interaction_fixture as fixture
from training.cli import main
from training.vocab import build_motion_vocabulary, load_vocabulary, save_vocabulary

DT = 0.1


def arc_track(speed: float, yaw_rate: float, steps: int = 41, heading: float = 0.3) -> torch.Tensor:
    """``(T, 3)`` poses of a constant speed, constant yaw-rate motion (exact integration)."""
    t = torch.arange(steps, dtype=torch.float64) * DT
    h = heading + yaw_rate * t
    if abs(yaw_rate) < 1e-9:
        x, y = speed * t * math.cos(heading), speed * t * math.sin(heading)
    else:
        x = speed / yaw_rate * (torch.sin(h) - math.sin(heading))
        y = -speed / yaw_rate * (torch.cos(h) - math.cos(heading))
    return torch.stack([x + 5.0, y - 3.0, h], dim=-1).float()


def family() -> torch.Tensor:
    """``(N, T, 3)`` tracks: speeds 0..14 m/s × yaw rates -0.3..0.3 rad/s."""
    return torch.stack([arc_track(v, w) for v in np.arange(0, 15, 0.5) for w in np.linspace(-0.3, 0.3, 13)])


def test_segments_of_a_straight_track_end_where_the_motion_says():
    track = arc_track(10.0, 0.0)[None]
    segs = segments(track, torch.ones(1, 41, dtype=torch.bool))
    assert segs.shape == (41 - TOKEN_STEPS, TOKEN_STEPS + 1, 3)
    torch.testing.assert_close(segs[:, -1], torch.tensor([[5.0, 0.0, 0.0]]).expand(len(segs), 3), atol=1e-4,
                               rtol=0)
    valid = torch.ones(1, 41, dtype=torch.bool)
    valid[0, 20] = False  # windows touching step 20 are dropped
    assert len(segments(track, valid)) == 41 - TOKEN_STEPS - (TOKEN_STEPS + 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-100, 100), st.floats(-100, 100), st.floats(-3.1, 3.1)), min_size=1,
                max_size=5), st.floats(-100, 100), st.floats(-100, 100), st.floats(-3.1, 3.1))
def test_place_inverts_relative(poses, ox, oy, oh):
    p = torch.tensor(poses, dtype=torch.float64)[None]
    origin = torch.tensor([[ox, oy, oh]], dtype=torch.float64)
    back = place(_relative(p, origin), origin)
    torch.testing.assert_close(back[..., :2], p[..., :2], atol=1e-9, rtol=0)
    assert torch.allclose(torch.cos(back[..., 2] - p[..., 2]), torch.ones(1, dtype=torch.float64))


def test_vocabulary_covers_its_training_motions_and_respects_the_size():
    tracks = family()
    segs = segments(tracks, torch.ones(tracks.shape[:2], dtype=torch.bool))
    poses, stats = build_vocabulary(segs, size=4096, tol=0.05)
    assert poses[0].abs().max() == 0  # token 0: stand still
    assert stats["clustered"] == 1.0
    assert stats["segments"] == len(segs)
    small, small_stats = build_vocabulary(segs, size=20, tol=0.05)
    assert len(small) == 20
    assert small_stats["clustered"] < 1.0


def family_vocabulary():
    """The family() tracks, all valid, and a fine (tol 0.05 m) vehicle vocabulary built from them."""
    tracks = family()
    valid = torch.ones(tracks.shape[:2], dtype=torch.bool)
    poses, _ = build_vocabulary(segments(tracks, valid), size=4096, tol=0.05)
    vocab = MotionVocabulary({"vehicle": poses}, 0.05)
    kinds = torch.zeros(len(tracks), dtype=torch.long)
    return tracks, valid, poses, vocab, kinds


def test_tokenized_tracks_reconstruct_within_tolerance_and_roll_out_to_the_matched_poses():
    tracks, valid, poses, vocab, kinds = family_vocabulary()
    tokens, matched, error, _ = tokenize(tracks, valid, kinds, vocab)
    assert tokens.shape == (len(tracks), 8)
    assert (tokens >= 0).all()
    assert float(error.max()) < 0.1  # the roll-out re-matches every 0.5 s: no drift beyond the tolerance
    still = 6  # speed 0, yaw rate 0 (family(): 13 yaw rates per speed, the 7th is 0)
    assert (tokens[still] == 0).all()
    assert float(error[still].max()) == 0
    # Decoding: token s placed at matched pose s ends at matched pose s + 1.
    for s in range(8):
        end = token_poses(poses, tokens[:, s], matched[:, s])[:, -1]
        torch.testing.assert_close(end, matched[:, s + 1], atol=1e-4, rtol=0)
    # A token needs both of its ends logged (as in SMART); the roll-out restarts at the next logged boundary.
    valid[3, 15] = False
    tokens, matched, error, _ = tokenize(tracks, valid, kinds, vocab)
    assert tokens[3, 2:4].tolist() == [-1, -1]
    assert math.isnan(error[3, 2].item())
    torch.testing.assert_close(matched[3, 4], tracks[3, 20])
    assert tokens[3, 4] >= 0


def test_noised_tokenization_strays_from_the_log_and_its_targets_lead_back():
    tracks, valid, poses, vocab, kinds = family_vocabulary()
    clean, _, clean_error, clean_applied = tokenize(tracks, valid, kinds, vocab)
    assert torch.equal(clean, clean_applied)
    tokens, matched, error, applied = tokenize(tracks, valid, kinds, vocab, noise_k=8,
                                               generator=torch.Generator().manual_seed(0))
    assert bool((applied != tokens).float().mean() > 0.5)  # mostly another of the 8 nearest
    assert float(error.mean()) > float(clean_error.mean())  # the roll-out strays from the log
    for s in range(8):  # the roll-out moves by the applied tokens
        end = token_poses(poses, applied[:, s], matched[:, s])[:, -1]
        torch.testing.assert_close(end, matched[:, s + 1], atol=1e-4, rtol=0)
    # each target is the nearest token to the log's next pose from the roll-out's pose: the best correction
    from agents.smart.tokenizer import _relative, nearest_final

    local = _relative(tracks[:, 5:41:5, :3].double().reshape(-1, 1, 3), matched[:, :8].double().reshape(-1, 3))[:, 0]
    best, _ = nearest_final(poses, local, (4.8, 2.0))
    assert torch.equal(best.view(len(tracks), 8), tokens)
    with pytest.raises(ValueError, match="noise_k must be >= 1"):
        tokenize(tracks, valid, kinds, vocab, noise_k=0)


def test_vocabulary_errors():
    tracks = family()[:5]
    poses, _ = build_vocabulary(segments(tracks, torch.ones(tracks.shape[:2], dtype=torch.bool)), 64, 0.05)
    vocab = MotionVocabulary({"vehicle": poses}, 0.05)
    with pytest.raises(VocabularyError, match="no tokens for PEDESTRIAN agents"):
        tokenize(tracks, torch.ones(tracks.shape[:2], dtype=torch.bool),
                 torch.full((5,), int(AgentType.PEDESTRIAN)), vocab)
    with pytest.raises(VocabularyError, match="No training segments"):
        build_vocabulary(torch.zeros(0, TOKEN_STEPS + 1, 3), 64, 0.05)
    with pytest.raises(ValueError, match="size must be >= 1 and tol > 0"):
        build_vocabulary(segments(tracks, torch.ones(5, 41, dtype=torch.bool)), 64, 0.0)
    with pytest.raises(VocabularyError, match=r"must be \(V, 6, 3\)"):
        MotionVocabulary({"vehicle": torch.zeros(4, 5, 3)}, 0.05)
    with pytest.raises(VocabularyError, match="Token 0"):
        MotionVocabulary({"vehicle": torch.ones(4, 6, 3)}, 0.05)
    with pytest.raises(VocabularyError, match="holds no motion vocabulary"):
        MotionVocabulary.from_tensors({"weight": torch.zeros(2)}, 0.05)
    with pytest.raises(VocabularyError, match="no scenes"):
        build_motion_vocabulary([])


def test_vocabulary_file_round_trip_and_foreign_checkpoints(tmp_path):
    from agents.checkpoint import save_checkpoint

    tracks = family()[:40]
    poses, stats = build_vocabulary(segments(tracks, torch.ones(tracks.shape[:2], dtype=torch.bool)), 64, 0.05)
    path = save_vocabulary(MotionVocabulary({"vehicle": poses}, 0.05, {"vehicle": stats}), tmp_path / "v.st", {})
    back = load_vocabulary(path)
    torch.testing.assert_close(back.poses["vehicle"], poses)
    assert back.tol == 0.05
    assert back.stats["vehicle"] == stats
    other = save_checkpoint(tmp_path / "idm.st", "idm", {}, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError):
        load_vocabulary(other)


def test_train_vocab_command_reports_coverage(tmp_path_factory, capsys):
    root = fixture.write_dataset(tmp_path_factory.mktemp("tiny_vocab"), cases=3, case_length=91)
    out = tmp_path_factory.mktemp("vocab") / "vocab.safetensors"
    args = ["train", "vocab", "--dataset", "interaction_multi", "--data-dir", str(root), "--case-length", "91",
            "--cache-dir", str(tmp_path_factory.mktemp("cache")), "--split", "train", "--size", "256",
            "--out", str(out)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    vehicle = report["per_type"]["vehicle"]
    assert vehicle["tokens"] <= 256
    assert 0 < vehicle["clustered"] <= 1
    assert vehicle["reconstruction_mean_m"] < 0.2
    assert load_vocabulary(out).size(AgentType.VEHICLE) == vehicle["tokens"]
