"""The tokenized policy: incremental decoding equals teacher forcing, it learns, the trainer (checkpoints, resume,
two processes == one process), and the error paths."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.smart import SmartConfig, SmartModel
from agents.smart.tokenizer import MotionVocabulary, build_vocabulary, segments
from envs.errors import CheckpointError, TrafficGymError, UnknownNameError, VocabularyError
from envs.types import AgentType
from tests.scenes import make_scene, straight_road
from training.bc import save_smart
from training.bc_data import collate, scene_sample
from training.trainer import SampleBatches, TrainConfig, Trainer

MICRO = dict(hidden=32, heads=2, map_layers=1, agent_layers=1, dropout=0.0)


def scenes(n: int, seed: int = 0):
    """Scenes of 6 vehicles on a straight road, each with its own speed and constant acceleration."""
    rng = np.random.default_rng(seed)
    road = straight_road(length=400)
    out = []
    for k in range(n):
        tracks = [dict(x0=float(rng.uniform(0, 150)), y0=-1.75 if i % 2 else 1.75, heading=0.0 if i % 2 else np.pi,
                       speed=float(rng.uniform(2, 14)), accel=float(rng.uniform(-1.0, 1.0))) for i in range(6)]
        for tr in tracks:
            if tr["heading"]:
                tr["x0"] += 200
        out.append(make_scene(tracks, map_data=road, scene_id=f"s{k}"))
    return out


def vocab_of(data, size: int = 64) -> MotionVocabulary:
    segs = torch.cat([segments(torch.from_numpy(s.trajectory), torch.from_numpy(s.valid)) for s in data])
    poses, _ = build_vocabulary(segs, size, 0.05)
    return MotionVocabulary({"vehicle": poses}, 0.05)


def micro_model(vocab, **kw):
    torch.manual_seed(0)
    return SmartModel(SmartConfig.of_size("nano", {k: len(v) for k, v in vocab.poses.items()}, **{**MICRO, **kw}),
                      vocab)


def test_incremental_steps_equal_teacher_forcing():
    data = scenes(2)
    vocab = vocab_of(data)
    model = micro_model(vocab, agent_layers=2).eval()
    batch = collate([scene_sample(s, vocab, model.cfg) for s in data])
    with torch.no_grad():
        enc = model.encode_map(batch.map_points, batch.map_pose, batch.map_type, batch.map_valid,
                               nbr=batch.map_nbr, rows=batch.map_rows)
        assert len(batch.map_pose) == 1  # both scenes lie on one map: it is encoded once
        full = model(enc, batch.pose, batch.valid, batch.in_token, batch.agent_type, batch.extent)
        cache: dict = {}
        steps = [model.step(cache, enc, batch.pose[:, :, s], batch.valid[:, :, s], batch.in_token[:, :, s],
                            batch.agent_type, batch.extent)["vehicle"] for s in range(batch.pose.shape[2])]
    ok = batch.valid
    torch.testing.assert_close(torch.stack(steps, 2)[ok], full["vehicle"][ok], atol=1e-4, rtol=1e-4)
    # the training crop encodes every piece an agent attends to exactly as the whole map does (rollouts encode
    # the whole map), and the precomputed map->agent neighbours are the ones the model finds on the whole map
    # (compared by distance: pieces of a straight road tie, and ties may be broken either way)
    from agents.nn.attention import knn
    from agents.nn.map_pieces import cached_map_pieces, map_piece_neighbours

    pieces = cached_map_pieces(data[0].map)
    whole = [torch.as_tensor(pieces[k])[None] for k in ("points", "pose", "type")]
    nbr = torch.as_tensor(map_piece_neighbours(data[0].map, model.cfg.k_map, model.cfg.map_radius))[None]
    with torch.no_grad():
        full = model.encode_map(*whole, torch.ones(1, len(pieces["pose"]), dtype=torch.bool), nbr=nbr)
    ids = torch.as_tensor(np.unique(np.concatenate([x.map_piece for x in (scene_sample(s, vocab, model.cfg)
                                                                          for s in data)])))
    used = batch.m2a_nbr[batch.m2a_nbr >= 0].unique()
    assert len(used) < len(ids) < len(pieces["pose"])  # a crop, larger than what is attended to
    torch.testing.assert_close(enc.feat[0, used], full.feat[0, ids[used]], atol=1e-5, rtol=1e-5)

    def dists(idx, ok, q, keys):
        d = (keys[torch.arange(len(keys))[:, None, None], idx.clamp(min=0)] - q[..., None, :]).norm(dim=-1)
        return torch.where(ok, d, torch.full_like(d, -1.0)).sort(dim=-1).values

    q = batch.pose[..., :2].flatten(1, 2)
    mp = full.pose[..., :2].expand(len(q), -1, -1)
    idx, ok = knn(q, mp, model.cfg.k_m2a, model.cfg.m2a_radius, full.valid.expand(len(q), -1))
    pre = batch.m2a_nbr.flatten(1, 2)
    pre = torch.where(pre >= 0, ids[pre.clamp(min=0)], pre)  # union positions -> map pieces
    v = batch.valid.flatten(1, 2)
    torch.testing.assert_close(dists(pre, pre >= 0, q, mp)[v], dists(idx, ok, q, mp)[v], atol=1e-4, rtol=0)


def test_behaviour_cloning_learns(tmp_path):
    data = scenes(4)
    vocab = vocab_of(data)
    model = micro_model(vocab)
    samples = [scene_sample(s, vocab, model.cfg) for s in data]
    trainer = Trainer(model, SampleBatches(samples, collate, 2),
                      TrainConfig(out=str(tmp_path), max_steps=120, batch_size=2, lr=3e-3, progress=False,
                                  ckpt_every=0), save_fn=save_smart)
    history = trainer.fit()
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    acc = np.mean([h["accuracy"] for h in history[-10:]])
    chance = 1.0 / len(vocab.poses["vehicle"])
    assert last < 0.6 * first
    assert acc > 20 * chance  # well above chance (1/64)
    assert (tmp_path / "last.safetensors").exists()
    assert (tmp_path / "tb").is_dir()


def test_checkpoint_resume_continues_where_it_stopped(tmp_path):
    data = scenes(2)
    vocab = vocab_of(data)
    samples = [scene_sample(s, vocab, micro_model(vocab).cfg) for s in data]

    def trainer(steps, resume):
        return Trainer(micro_model(vocab), SampleBatches(samples, collate, 2),
                       TrainConfig(out=str(tmp_path), max_steps=steps, batch_size=2, progress=False, resume=resume,
                                   ckpt_every=0), save_fn=save_smart)

    with pytest.raises(CheckpointError, match="no checkpoint"):
        trainer(4, resume=True).fit()
    straight = trainer(6, resume=False)
    straight.fit()
    reference = {k: v.clone() for k, v in straight.model.state_dict().items()}
    interrupted = trainer(6, resume=False)  # stopped after 3 of 6 steps (its last checkpoint) ...
    for _ in range(3):
        interrupted.train_step(interrupted.next_batch())
    interrupted.save()
    resumed = trainer(6, resume=True)  # ... and continued
    resumed.fit()
    assert resumed.step == 6
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, reference[k], atol=1e-5, rtol=1e-4)  # float noise of scatter-adds


def _ddp_worker(rank: int, world: int, store: str, out: str, samples, vocab_poses):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    vocab = MotionVocabulary({"vehicle": vocab_poses}, 0.05)
    t = Trainer(micro_model(vocab), SampleBatches(samples, collate, 4),
                TrainConfig(out=out, max_steps=2, batch_size=4, progress=False, ckpt_every=0), save_fn=save_smart)
    for _ in range(2):
        t.train_step(t.next_batch())
    if rank == 0:
        torch.save(t.model.state_dict(), os.path.join(out, "ddp.pt"))
    dist.destroy_process_group()


def test_two_processes_take_the_same_steps_as_one(tmp_path):
    import torch.multiprocessing as mp

    data = scenes(8)
    vocab = vocab_of(data)
    samples = [scene_sample(s, vocab, micro_model(vocab).cfg) for s in data]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), samples, vocab.poses["vehicle"]),
             nprocs=2, join=True)
    single = Trainer(micro_model(vocab), SampleBatches(samples, collate, 4),
                     TrainConfig(out=str(tmp_path), max_steps=2, batch_size=4, progress=False, ckpt_every=0),
                     save_fn=lambda m: ("smart", {}))
    for _ in range(2):
        single.train_step(single.next_batch())
    ddp = torch.load(tmp_path / "ddp.pt")
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, atol=2e-5, rtol=1e-4)


def test_bad_input_is_named(tmp_path):
    data = scenes(1)
    vocab = vocab_of(data)
    with pytest.raises(UnknownNameError, match="SMART size"):
        SmartConfig.of_size("huge", {"vehicle": 64})
    with pytest.raises(UnknownNameError, match="SMART configuration field 'k_m2A'.*Did you mean 'k_m2a'"):
        SmartConfig.of_size("nano", {"vehicle": 64}, k_m2A=32)
    with pytest.raises(ValueError, match="k_m2a needs a positive integer, got 2.5"):
        SmartConfig.of_size("nano", {"vehicle": 64}, k_m2a=2.5)
    with pytest.raises(ValueError, match="m2a_radius needs a number >= 0, got 'far'"):
        SmartConfig.of_size("nano", {"vehicle": 64}, m2a_radius="far")
    assert SmartConfig.of_size("nano", {"vehicle": 64}, k_m2a=32.0, m2a_radius=30).k_m2a == 32
    with pytest.raises(VocabularyError, match="has 64 tokens but the config says 10"):
        SmartModel(SmartConfig.of_size("nano", {"vehicle": 10}, **MICRO), vocab)
    with pytest.raises(TrafficGymError, match="No training samples"):
        SampleBatches([], collate, 4)
    walker = make_scene([dict(x0=0, y0=0, speed=1.2, type=AgentType.PEDESTRIAN)])
    with pytest.raises(VocabularyError, match="PEDESTRIAN"):
        scene_sample(walker, vocab, micro_model(vocab).cfg)
    # a checkpoint of another agent is refused on resume
    from agents.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "last.safetensors", "idm", {}, {"w": torch.zeros(1)})
    t = Trainer(micro_model(vocab), SampleBatches([scene_sample(data[0], vocab, micro_model(vocab).cfg)], collate, 4),
                TrainConfig(out=str(tmp_path), resume=True, progress=False), lambda m: ("smart", {}))
    with pytest.raises(CheckpointError, match="'idm' checkpoint"):
        t.fit()


def test_train_bc_command_trains_resumes_and_names_bad_agents(tmp_path, capsys):
    from tests import interaction_fixture as fixture
    from training.cli import main

    root = fixture.write_dataset(tmp_path / "data", cases=2, case_length=91)
    args = ["train", "bc", "--dataset", "interaction_multi", "--data-dir", str(root), "--case-length", "91",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--batch-size", "2"]

    def report(text: str) -> dict:
        return json.loads(text[text.index("{"):])

    assert main([*args, "--max-steps", "3"]) == 0
    first = report(capsys.readouterr().out)
    assert first["steps"] == 3
    assert first["validation"]["val/min_ade"] >= 0
    for name in ("vocab", "last", "model"):
        assert (tmp_path / "run" / f"{name}.safetensors").exists()
    assert main([*args, "--max-steps", "4", "--resume"]) == 0
    assert report(capsys.readouterr().out)["steps"] == 4
    assert main([*args, "--agent", "smrt"]) == 2  # unknown trainable agent, named on stderr
    assert "smart" in capsys.readouterr().err


# ---- the closed-loop agent -----------------------------------------------------------------------------------

def _checkpoint(tmp_path, vocab, **kw):
    from agents.checkpoint import save_checkpoint

    model = micro_model(vocab, **kw)
    return save_checkpoint(tmp_path / "smart.safetensors", "smart", {**model.cfg.to_json(), "tol": model.tol},
                           model.state_dict()), model


def test_smart_agent_drives_closed_loop_deterministically(tmp_path):
    from agents.registry import make_agent
    from envs import sim
    from training.rollouts import drive

    data = scenes(2)
    vocab = vocab_of(data)
    path, model = _checkpoint(tmp_path, vocab)
    runs = []
    for seed in (0, 0, 1):
        agent = make_agent("smart", checkpoint=path, top_k=8)
        state = drive(sim.reset(data, start_step=10, controlled="all"), agent, seed=seed)
        runs.append(state.traj.clone())
    torch.testing.assert_close(runs[0], runs[1])  # same seed, same rollout
    assert not torch.equal(runs[0], runs[2])  # another seed samples other tokens
    # every 0.5 s of a driven agent is a vocabulary motion placed at its pose (token_poses), so its end pose
    # lies exactly on the end of some token relative to the pose 5 steps before
    from agents.smart.tokenizer import _relative, nearest_final

    traj = runs[0][0, :, 10:91:5, :3].double()  # (A, 17, 3) boundary poses
    local = _relative(traj[:, 1:].reshape(-1, 1, 3), traj[:, :-1].reshape(-1, 3))[:, 0]
    _, dist = nearest_final(vocab.poses["vehicle"], local, (4.8, 2.0))
    assert float(dist.max()) < 1e-3


def test_map_encoding_rows_must_be_given_for_shared_maps():
    from agents.nn.map_encoder import MapEncoding

    enc = MapEncoding(torch.zeros(2, 3, 4), torch.zeros(2, 3, 3), torch.ones(2, 3, dtype=torch.bool))
    assert enc.row_maps(2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 encoded maps for a batch of 5 rows"):
        enc.row_maps(5)
    shared = MapEncoding(enc.feat, enc.pose, enc.valid, rows=torch.tensor([0, 0, 1, 1, 1]))
    assert shared.row_maps(5).tolist() == [0, 0, 1, 1, 1]


def test_smart_agent_error_paths(tmp_path):
    from agents.checkpoint import save_checkpoint
    from agents.registry import make_agent
    from envs import sim

    data = scenes(1)
    vocab = vocab_of(data)
    with pytest.raises(CheckpointError, match="needs trained weights"):
        make_agent("smart")
    path, model = _checkpoint(tmp_path, vocab)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        make_agent("smart", checkpoint=path, top_k=0)
    # another size: the shapes do not match
    other = save_checkpoint(tmp_path / "other.safetensors", "smart",
                            {**micro_model(vocab, hidden=16).cfg.to_json(), "tol": 0.05}, model.state_dict())
    with pytest.raises(CheckpointError, match="does not match the model"):
        make_agent("smart", checkpoint=other)
    # a vocabulary of another size than the config says
    cfg = {**model.cfg.to_json(), "tol": 0.05, "vocab_sizes": {"vehicle": 10}}
    bad = save_checkpoint(tmp_path / "bad.safetensors", "smart", cfg, model.state_dict())
    with pytest.raises(VocabularyError, match="config says 10"):
        make_agent("smart", checkpoint=bad)
    idm = save_checkpoint(tmp_path / "idm.safetensors", "idm", {}, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'idm' checkpoint"):
        make_agent("smart", checkpoint=idm)
    # agent types the vocabulary lacks
    walker = make_scene([dict(x0=0, y0=-1.75, speed=5), dict(x0=0, y0=-5, speed=1.2, type=AgentType.PEDESTRIAN)])
    state = sim.reset([walker], start_step=10, controlled="all")
    agent = make_agent("smart", checkpoint=path)
    with pytest.raises(VocabularyError, match="no tokens for PEDESTRIAN"):
        agent.reset(state, state.controlled, seed=0)


def test_samples_built_in_worker_processes_equal_in_process():
    from training.bc import build_samples

    data = scenes(3)
    vocab = vocab_of(data)
    cfg = micro_model(vocab).cfg
    one = build_samples(data, vocab, cfg, progress=False)
    two = build_samples(data, vocab, cfg, progress=False, workers=2)
    for a, b in zip(one, two, strict=True):
        assert a.scene_id == b.scene_id
        for name in ("pose", "valid", "in_token", "target", "map_piece", "map_pose", "m2a_nbr"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_eval_command_compares_smart_with_a_baseline(tmp_path, capsys):
    # --checkpoint goes to the agent with weights only, so a learned agent and a baseline compare in one call
    from tests import interaction_fixture as fixture
    from training.cli import main

    root = fixture.write_dataset(tmp_path / "data", cases=2, case_length=91)
    common = ["--dataset", "interaction_multi", "--data-dir", str(root), "--case-length", "91", "--cache-dir",
              str(tmp_path / "cache")]
    assert main(["train", "bc", *common, "--out", str(tmp_path / "run"), "--max-steps", "2", "--val-scenes",
                 "0", "--model-arg", "k_m2a=4", "--model-arg", "m2a_radius=25"]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "last.safetensors")
    from agents.smart.agent import SmartAgent

    cfg = SmartAgent.from_checkpoint(ckpt).model.cfg  # --model-arg overrides land in the saved configuration
    assert (cfg.k_m2a, cfg.m2a_radius, cfg.k_map) == (4, 25.0, 8)
    assert main(["train", "bc", *common, "--out", str(tmp_path / "bad"), "--max-steps", "1", "--val-scenes", "0",
                 "--model-arg", "k_m2a"]) == 2
    assert "--model-arg expects KEY=VALUE" in capsys.readouterr().err
    assert main(["eval", "--agent", "smart", "--agent", "constant_velocity", "--checkpoint", ckpt, *common,
                 "--split", "val", "--rollouts", "2", "--metric", "min_ade"]) == 0
    out = capsys.readouterr().out
    assert "smart" in out
    assert "constant_velocity" in out
    assert "min_ade" in out
    assert main(["eval", "--agent", "constant_velocity", "--checkpoint", ckpt, *common, "--split", "val"]) == 2


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 60), st.sampled_from([5.0, 10.0, 20.0]),
       st.sampled_from([3.0, 10.0]))
def test_radius_grid_finds_the_same_neighbours_as_brute_force(seed, count, radius, cell):
    from agents.nn.attention import RadiusGrid, knn

    rng = np.random.default_rng(seed)
    sets = [rng.uniform(-50, 50, (count, 2)), rng.uniform(0, 30, (max(count // 2, 1), 2))]
    keys = torch.zeros(2, max(len(x) for x in sets), 2)
    valid = torch.zeros(2, keys.shape[1], dtype=torch.bool)
    for u, x in enumerate(sets):
        keys[u, :len(x)], valid[u, :len(x)] = torch.as_tensor(x, dtype=torch.float32), True
    grid = RadiusGrid.build(sets, radius, cell=cell)
    rows = torch.tensor([0, 1, 1, 0])
    query = torch.as_tensor(rng.uniform(-80, 80, (4, 25, 2)), dtype=torch.float32)  # inside and outside the grids
    idx, ok = grid.knn(query, rows, keys, 6)
    ref_idx, ref_ok = knn(query, keys[rows], 6, radius, valid[rows])
    assert torch.equal(ok.sum(-1), ref_ok.sum(-1))

    def found(i, o):  # distances of the neighbours found, nearest first (ties may swap indices)
        d = (keys[rows][torch.arange(4)[:, None, None], i] - query[..., None, :]).norm(dim=-1)
        return torch.where(o, d, torch.full_like(d, -1.0))

    torch.testing.assert_close(found(idx, ok), found(ref_idx, ref_ok))


def test_smart_agent_never_reads_the_future_log_of_the_agents_it_drives(tmp_path):
    # the map context of a rollout is the whole map, not a crop around where the log says the agents go
    from dataclasses import replace

    from agents.registry import make_agent
    from envs import sim
    from training.rollouts import drive

    data = scenes(1)
    vocab = vocab_of(data)
    path, _ = _checkpoint(tmp_path, vocab)
    altered = data[0].trajectory.copy()
    altered[:, 11:, 1] += 40.0  # the logged future drives 40 m sideways, off the road
    twin = replace(data[0], trajectory=altered)
    runs = []
    for scene in (data[0], twin):
        agent = make_agent("smart", checkpoint=path, top_k=8)
        state = drive(sim.reset([scene], start_step=10, controlled="all"), agent, seed=3)
        runs.append(state.traj[..., 11:, :3].clone())
    torch.testing.assert_close(runs[0], runs[1])


def test_grouped_batches_hold_one_map_and_visit_every_full_chunk(tmp_path):
    data = scenes(6)
    vocab = vocab_of(data)
    cfg = micro_model(vocab).cfg
    samples = [scene_sample(s, vocab, cfg) for s in data]
    for i, x in enumerate(samples):
        x.map_id = "a" if i < 4 else "b"  # two maps: 4 scenes and 2 scenes
    data_ = SampleBatches(samples, collate, 2, group_fn=lambda x: x.map_id)
    seen = []
    for _ in range(6):  # two epochs of three batches
        batch = data_.next_samples()
        assert len({x.map_id for x in batch}) == 1
        seen += [x.scene_id for x in batch]
    assert sorted(seen) == sorted(2 * [x.scene_id for x in samples])
    with pytest.raises(ValueError, match="No group of samples fills a batch of 5"):
        SampleBatches(samples, collate, 5, group_fn=lambda x: x.map_id)


def test_smart_agent_drives_on_a_map_without_pieces_and_leaves_through_map_exits(tmp_path):
    from agents.registry import make_agent
    from envs import sim
    from envs.types import PolylineType
    from tests.scenes import make_map
    from training.rollouts import drive

    data = scenes(2)
    vocab = vocab_of(data)
    path, _ = _checkpoint(tmp_path, vocab)
    # only lane boundaries: nothing the map encoder reads (no pieces), so no map attention at all
    bare = make_map([(np.array([[0.0, 0.0], [400.0, 0.0]]), PolylineType.LANE_BOUNDARY)], map_id="test:bare")
    scene = make_scene([dict(x0=10.0 * i, y0=-1.75, speed=8.0) for i in range(3)], map_data=bare)
    state = drive(sim.reset([scene], start_step=10, controlled="all"), make_agent("smart", checkpoint=path), seed=0)
    assert bool(state.valid[0, :3, -1].all())
    # a road whose lane ends 3 m ahead of the agents: whoever drives past its end leaves the scene there
    from tests.scenes import straight_road

    short = straight_road(length=60.0, map_id="test:short")
    tracks = [dict(x0=57.0 - 8.0 * i, y0=-1.75, speed=10.0, steps=slice(0, 11)) for i in range(3)]
    state = drive(sim.reset([make_scene(tracks, map_data=short)], start_step=10, controlled="all"),
                  make_agent("smart", checkpoint=path, top_k=1), seed=0)
    assert bool(state.removed[0, :3].any())
    for a in range(3):
        steps = state.valid[0, a].nonzero().squeeze(-1)
        assert float(state.traj[0, a, steps[-1], 0]) <= 60.0 + 30.0  # removed by the exit's depth at the latest


def test_smart_agent_is_reactive_traffic_in_the_vector_ego_env_across_autoresets(tmp_path, tiny_env_kwargs):
    import gymnasium as gym

    import envs  # noqa: F401  (registers the ids)
    from agents.registry import make_agent

    data = scenes(2)
    path, _ = _checkpoint(tmp_path, vocab_of(data))
    traffic = make_agent("smart", checkpoint=path, top_k=4)
    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=3, vectorization_mode="vector_entry_point",
                        traffic=[(traffic, "vehicles")], **tiny_env_kwargs)
    venv.reset(seed=0)
    log = venv.unwrapped.state.log.clone()
    for _ in range(85):  # one episode (80 steps), the autoreset, and a few steps of the next
        _, _, _, _, info = venv.step(np.zeros((3, 2), np.float32))
    assert "smart" in set(np.asarray(info["driven_by"]).ravel().tolist())
    state = venv.unwrapped.state
    driven = np.asarray(info["driven_by"]) == "smart"
    t = int(state.t[0])
    assert t == 14  # step 81 reset the slots (NextStep autoreset), then 4 steps of the next episode
    moved = (state.traj[..., t, :2] - log[..., t, :2]).norm(dim=-1)[torch.as_tensor(driven)]
    assert bool((moved > 1e-3).any())  # the learned traffic drives its own way, not the log's


@pytest.mark.parametrize("name", ["towns-nano", "towns-nano-3k", "towns-nano-catk"])
def test_bundled_towns_weights_load_and_beat_constant_velocity_on_val_scenes(name):
    # each shipped checkpoint (README: "Training") is a nano model with the towns vocabulary, and it drives: on
    # towns val scenes its rollouts stay closer to the log than constant velocity's
    from agents.registry import make_agent
    from agents.smart import PRETRAINED
    from envs.data import open_dataset
    from envs.metrics.episode import compute_episode_metrics
    from training.rollouts import simulate_scene

    assert PRETRAINED[name].is_file()
    agent = make_agent("smart", checkpoint=name)
    assert agent.model.cfg.size == "nano"
    assert agent.model.types == ["vehicle"]
    assert len(agent.model.vocab("vehicle")) == 2048
    val = open_dataset("towns", "val")
    cv = make_agent("constant_velocity")
    for i in (3, 70):
        ours = compute_episode_metrics(simulate_scene(agent, val, i, 4, seed=i), ["min_ade"])["min_ade"]
        theirs = compute_episode_metrics(simulate_scene(cv, val, i, 4, seed=i), ["min_ade"])["min_ade"]
        assert ours < theirs
    with pytest.raises(CheckpointError, match="Did you mean 'towns-nano'"):
        make_agent("smart", checkpoint="towns-nan")
