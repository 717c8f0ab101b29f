"""CAT-K's token choice and targets on hand-built vocabularies (agents/smart/catk.py)."""

from __future__ import annotations

import pytest
import torch

from agents.smart.catk import closest_among_top_k, corrective_targets

BOX = (4.8, 2.0)


def _vocab(finals):
    """``(V, 6, 3)`` tokens moving on a straight line from the origin to each final (x, y, heading)."""
    f = torch.tensor(finals, dtype=torch.float32)
    w = torch.linspace(0, 1, 6)[None, :, None]
    return f[:, None, :] * w


# 0: stand still, 1: 5 m ahead, 2: 5 m ahead and 1 m left, 3: 5 m ahead and 1 m right, 4: 2 m ahead
VOCAB = _vocab([[0, 0, 0], [5, 0, 0], [5, 1, 0], [5, -1, 0], [2, 0, 0]])


def test_a_displaced_rollout_gets_the_token_back_to_the_log():
    # the rollout is 1 m right of the log (y = -1) and the log is 5 m ahead on y = 0: the target leads 5 m
    # ahead and 1 m left; heading pi/2 (northbound, 1 m east of the log) needs the same correction
    rollout = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, torch.pi / 2], [0.0, 0.0, 0.0], [3.0, 3.0, 0.0]])
    log_next = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, torch.pi / 2], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([True, True, True, False])
    targets = corrective_targets(VOCAB, rollout, log_next, valid, BOX)
    assert targets.tolist() == [2, 2, 1, -1]  # on the log: straight on; no log next: no target


def test_closest_among_the_top_k_only():
    rollout = torch.zeros(3, 3)
    log_next = torch.tensor([[5.0, 1.0, 0.0]] * 3)  # exactly token 2's end
    logits = torch.tensor([[0.0, 3.0, -5.0, 2.0, 1.0]] * 3)  # ranking 1, 3, 4, 0, 2: token 2 is least likely
    valid = torch.tensor([True, True, False])
    # top-2 = {1, 3}: 1 ends 1 m from the log, 3 ends 2 m away -> 1; never 2, although it is exact
    assert closest_among_top_k(logits, VOCAB, rollout, log_next, valid, BOX, k=2).tolist() == [1, 1, 1]
    # with every token a candidate, the exact one; without a logged next pose, the most likely
    assert closest_among_top_k(logits, VOCAB, rollout, log_next, valid, BOX, k=5).tolist() == [2, 2, 1]
    # k = 1 is plain greedy decoding
    assert closest_among_top_k(logits, VOCAB, rollout, log_next, valid, BOX, k=1).tolist() == [1, 1, 1]


def test_the_choice_follows_the_rollout_pose_not_the_origin():
    # the same log target from a rollout pose 1 m left of the log: the right-shifting token is now closest
    rollout = torch.tensor([[0.0, 1.0, 0.0]])
    log_next = torch.tensor([[5.0, 0.0, 0.0]])
    logits = torch.zeros(1, 5)
    assert closest_among_top_k(logits, VOCAB, rollout, log_next, torch.tensor([True]), BOX, k=5).tolist() == [3]


@pytest.mark.parametrize("k", [0, 6, 2.5, True])
def test_k_outside_the_vocabulary_is_refused(k):
    with pytest.raises(ValueError, match=r"top-k must be an integer in \[1, 5\]"):
        closest_among_top_k(torch.zeros(1, 5), VOCAB, torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([True]),
                            BOX, k=k)


def test_catk_rollout_tracks_the_log_that_sampling_drifts_from():
    from agents.smart import SmartAgent
    from agents.smart.agent import CatKRollout
    from envs.data import open_dataset
    from envs.metrics.episode import compute_episode_metrics
    from training.rollouts import simulate_scene

    ds = open_dataset("towns", "val")
    sampled = SmartAgent.from_checkpoint("towns-nano")
    catk = CatKRollout(sampled.model, top_k=32)
    ade = {}
    for name, agent in (("sampled", sampled), ("catk", catk)):
        r = simulate_scene(agent, ds, 0, 2, seed=0)
        ade[name] = compute_episode_metrics(r, ["min_ade"])["min_ade"]
    assert ade["catk"] < 0.5 * ade["sampled"], ade
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        CatKRollout(sampled.model, top_k=0)


def test_teacher_forcing_on_the_rollout_gives_the_rollout_logits():
    from agents.smart import SmartAgent
    from agents.smart.agent import CatKRollout
    from agents.smart.catk import corrective_targets
    from envs.data import open_dataset
    from training.bc_data import collate
    from training.catk import catk_sample

    ds = open_dataset("towns", "val")
    model = SmartAgent.from_checkpoint("towns-nano").model.eval()
    agent = CatKRollout(model, top_k=32, record_logits=True)
    scene = ds[0]
    sample = catk_sample(agent, scene, ds.map_index(scene.map_id))
    batch = collate([sample])
    with torch.no_grad():
        enc = model.encode_map(batch.map_points, batch.map_pose, batch.map_type, batch.map_valid, nbr=batch.map_nbr,
                               rows=batch.map_rows)
        full = model(enc, batch.pose, batch.valid, batch.in_token, batch.agent_type, batch.extent,
                     m2a_nbr=batch.m2a_nbr)["vehicle"][0]
    a = scene.num_agents
    checked = 0
    for t, sel, _tok, logits in agent.chosen:
        s = int(t[0]) // 5
        rows = sel[0, :a]
        torch.testing.assert_close(full[rows, s], logits, atol=2e-4, rtol=1e-4)
        checked += int(rows.sum())
    assert checked > 100
    # targets only where the policy drove, each the token back to the log (recomputed here for one step)
    drove = torch.zeros(sample.target.shape, dtype=torch.bool)
    for t, sel, _, _ in agent.chosen:
        drove[sel[0, :a], int(t[0]) // 5] = True
    assert not (torch.as_tensor(sample.target >= 0) & ~drove).any()
    t0, sel0, _, _ = agent.chosen[1]
    s0, rows0 = int(t0[0]) // 5, sel0[0, :a]
    log_next = torch.as_tensor(scene.trajectory[:, 5 * (s0 + 1), :3]).float()[rows0]
    ok = torch.as_tensor(scene.valid[:, 5 * (s0 + 1)])[rows0]
    want = corrective_targets(model.vocab("vehicle"), torch.as_tensor(sample.pose[:, s0])[rows0], log_next, ok, BOX)
    assert torch.as_tensor(sample.target[:, s0])[rows0].tolist() == want.tolist()


def test_a_batched_rollout_gives_each_scene_its_own_rollout():
    import numpy as np

    from agents.smart import SmartAgent
    from agents.smart.agent import CatKRollout
    from envs.data import open_dataset
    from training.catk import catk_sample, catk_samples

    ds = open_dataset("towns", "val")
    agent = CatKRollout(SmartAgent.from_checkpoint("towns-nano").model, top_k=32)
    first = ds.entry(0).map_id
    other = next(i for i in range(len(ds)) if ds.entry(i).map_id != first)
    picked = [ds[0], ds[1], ds[other]]  # two maps, different agent counts
    assert len({s.num_agents for s in picked}) > 1
    together = catk_samples(agent, picked, [ds.map_index(s.map_id) for s in picked])
    for scene, batched in zip(picked, together, strict=True):
        alone = catk_sample(agent, scene, ds.map_index(scene.map_id))
        for field in ("pose", "valid", "in_token", "target", "m2a_nbr"):
            np.testing.assert_array_equal(getattr(batched, field), getattr(alone, field), err_msg=field)


def _bundled_model():
    from agents.smart import SmartAgent

    return SmartAgent.from_checkpoint("towns-nano").model


def test_catk_step_trains_the_decoder_and_leaves_the_frozen_set_bit_identical(tmp_path):
    from envs.data import open_dataset
    from training.catk import TRAINABLE, train_catk

    ds = open_dataset("towns", "train")
    model = _bundled_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, history = train_catk(model, ds, tmp_path, max_steps=2, batch_size=2, lr=1e-3, scenes=2, progress=False,
                                ckpt_every=0)
    assert len(history) == 2
    assert history[0]["targets"] > 100
    assert model.cfg.label_smoothing == 0.0
    trained = TRAINABLE["catk"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(trained) for k in changed), sorted(k for k in changed if not k.startswith(trained))
    assert any(k.startswith("heads.") for k in changed)
    assert any(k.startswith("m2a.") for k in changed)
    assert (tmp_path / "model.safetensors").exists()


def test_catk_bad_options_are_named(tmp_path):
    from envs.data import open_dataset
    from envs.errors import UnknownNameError
    from training.catk import train_catk

    ds = open_dataset("towns", "train")
    with pytest.raises(UnknownNameError, match="rollout"):
        train_catk(_bundled_model(), ds, tmp_path, max_steps=1, rollout="closest")
    with pytest.raises(UnknownNameError, match="frozen set"):
        train_catk(_bundled_model(), ds, tmp_path, max_steps=1, frozen="encoder")
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 2048\]"):
        train_catk(_bundled_model(), ds, tmp_path, max_steps=1, top_k=5000)
    with pytest.raises(UnknownNameError, match="tracking 'position'"):
        train_catk(_bundled_model(), ds, tmp_path, max_steps=1, tracking="position")
    with pytest.raises(UnknownNameError, match="pose-target set 'all'"):
        train_catk(_bundled_model(), ds, tmp_path, max_steps=1, pose_targets="all")
    with pytest.raises(ValueError, match="bc_mix must be a non-negative integer"):
        train_catk(_bundled_model(), ds, tmp_path, max_steps=1, bc_mix=-1)
    with pytest.raises(ValueError, match="with rollout='log' every sample already is one"):
        train_catk(_bundled_model(), ds, tmp_path, max_steps=1, rollout="log", bc_mix=10)
    from agents.smart.agent import CatKRollout

    with pytest.raises(UnknownNameError, match="choice"):
        CatKRollout(_bundled_model(), choice="greedy")


def test_train_catk_command_fine_tunes_and_names_bad_input(tmp_path, capsys):
    import json

    from agents.checkpoint import save_checkpoint
    from agents.smart import SmartAgent
    from envs.errors import CheckpointError
    from training.cli import main

    out = tmp_path / "catk"
    assert main(["train", "catk", "--init", "towns-nano", "--out", str(out), "--max-steps", "1", "--batch-size",
                 "1", "--scenes", "1", "--val-scenes", "0", "--ckpt-every", "0"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["steps"] == 1
    assert json.loads((out / "catk.json").read_text())["init"] == "towns-nano"
    agent = SmartAgent.from_checkpoint(out / "model.safetensors")  # loads as the BC weights do
    assert agent.model.cfg.label_smoothing == 0.0
    # a BC run folder is not resumed as CAT-K; an init of another agent is refused
    bc_dir = tmp_path / "bc"
    bc_dir.mkdir()
    assert main(["train", "catk", "--init", "towns-nano", "--out", str(bc_dir), "--max-steps", "1", "--resume",
                 "--val-scenes", "0"]) == 2
    assert "not a CAT-K run" in capsys.readouterr().err
    save_checkpoint(tmp_path / "idm.safetensors", "idm", {}, {"w": torch.zeros(1)})
    assert main(["train", "catk", "--init", str(tmp_path / "idm.safetensors"), "--out", str(out),
                 "--val-scenes", "0"]) == 2
    assert "'idm' checkpoint" in capsys.readouterr().err
    # the same errors, typed, from the function
    from training.catk import train_catk

    with pytest.raises(CheckpointError, match="not a CAT-K run"):
        train_catk(agent.model, None, bc_dir, max_steps=1, resume=True)


def test_two_processes_fine_tune_as_one(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["-m", "training.cli", "train", "catk", "--init", "towns-nano", "--max-steps", "2", "--batch-size", "2",
            "--scenes", "4", "--lr", "1e-3", "--val-scenes", "0", "--ckpt-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    printed = {}
    for name, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                "2"])):
        run = subprocess.run([sys.executable, *launch, *args, "--out", str(tmp_path / name)], env=env,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        printed[name] = json.loads(run.stdout[run.stdout.index("{"):])
    assert printed["two"]["processes"] == 2
    # the global batch's loss and accuracy are logged, not rank 0's share
    assert printed["two"]["loss"] == pytest.approx(printed["one"]["loss"], rel=1e-4)
    assert printed["two"]["accuracy"] == pytest.approx(printed["one"]["accuracy"], abs=1e-4)
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_catk_learns_to_track_the_log_and_topk_rollouts_do_not(tmp_path):
    """8 steps on the first 4 train scenes: CAT-K lowers closed-loop minADE on them (measured 5.69 -> 4.81-4.89 m
    over two seeds), fine-tuning on top-k rollouts does not (7.95-9.02 m)."""
    import numpy as np

    from agents.smart import SmartAgent
    from envs.data import open_dataset
    from envs.metrics.episode import compute_episode_metrics
    from training.catk import train_catk
    from training.rollouts import simulate_scene

    ds = open_dataset("towns", "train")

    def min_ade(model):
        agent = SmartAgent(model.eval(), top_k=48)
        return float(np.mean([compute_episode_metrics(simulate_scene(agent, ds, i, 4, seed=100 + i),
                                                      ["min_ade"])["min_ade"] for i in range(4)]))

    init = min_ade(_bundled_model())
    ade = {}
    for mode in ("catk", "topk"):
        model, _ = train_catk(_bundled_model(), ds, tmp_path / mode, max_steps=8, batch_size=4, lr=2e-4, scenes=4,
                              rollout=mode, progress=False, ckpt_every=0)
        ade[mode] = min_ade(model)
    assert ade["catk"] < 0.92 * init, (init, ade)
    assert ade["topk"] > ade["catk"] + 1.0, (init, ade)


def test_closed_loop_validation_spreads_its_scenes_over_the_split(monkeypatch):
    import envs.metrics.episode as episode
    import training.rollouts as rollouts
    from training.bc import closed_loop_validation

    seen = []
    monkeypatch.setattr(rollouts, "simulate_scene",
                        lambda agent, ds, i, r, setting="sim_agents", seed=0: seen.append((i, seed)) or i)
    monkeypatch.setattr(episode, "compute_episode_metrics", lambda i, names: {
        "realism_meta_wosac2024": float(i), "min_ade": 1.0, "blm_collision_rate": 0.0, "blm_offroad_rate": 0.5})
    out = closed_loop_validation(list(range(128)), scenes=4, seed=3)(_bundled_model())
    assert seen == [(0, 3), (42, 45), (85, 88), (127, 130)]  # every town of an ordered split, not the first 4
    assert out == {"realism_meta_wosac2024": 63.5, "min_ade": 1.0, "blm_collision_rate": 0.0, "blm_offroad_rate": 0.5}
