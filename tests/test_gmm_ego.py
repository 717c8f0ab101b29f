"""The Gaussian-mixture ego policy: the mixture NLL against a hand computation, the component choices, the
bicycle toward a target pose, incremental decoding equal to teacher forcing, learning, and the error paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agents.gmm_ego import (
    GMM_STD,
    GmmEgoAgent,
    GmmEgoModel,
    bicycle_toward,
    choose_component,
    closest_component,
    gmm_nll,
    reachable_target,
)
from agents.smart import SmartConfig
from envs.dynamics import InvertibleBicycle
from envs.errors import CheckpointError, InvalidOptionError, UnknownNameError
from tests.test_smart import MICRO, scenes, vocab_of
from training.bc_data import collate, scene_sample


def micro_gmm(vocab, **kw) -> GmmEgoModel:
    torch.manual_seed(0)
    cfg = SmartConfig.of_size("nano", {k: len(v) for k, v in vocab.poses.items()}, **{**MICRO, **kw})
    return GmmEgoModel(cfg, vocab)


def test_mixture_nll_equals_a_hand_computation():
    # two components, weights 0.25 / 0.75; target (1, 0, 0); means (1, 0, 0) and (0, 0, pi/2)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    mean = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, math.pi / 2]]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    sx, sy, sc, ss = GMM_STD
    norm = 1.0 / ((2 * math.pi) ** 2 * sx * sy * sc * ss)
    # component 1: exact match; component 2: dx = 1, dcos = 1, dsin = -1
    p1 = norm
    p2 = norm * math.exp(-0.5 * ((1 / sx) ** 2 + (1 / sc) ** 2 + (1 / ss) ** 2))
    expected = -math.log(0.25 * p1 + 0.75 * p2)
    assert gmm_nll(logits, mean, target).item() == pytest.approx(expected, rel=1e-5)
    # the heading enters through cos / sin: 2 pi apart is the same pose
    assert gmm_nll(logits, mean + torch.tensor([0, 0, 2 * math.pi]), target).item() == pytest.approx(expected, rel=1e-4)


def test_closest_of_the_top_three_components():
    logits = torch.tensor([[5.0, 4.0, 3.0, -9.0]])
    mean = torch.tensor([[[3.0, 0, 0], [2.0, 0, 0], [1.5, 0, 0], [1.0, 0, 0]]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    # component 3 (1.0 m) is the closest but not in the top 3: component 2 (1.5 m) is chosen
    assert closest_component(mean, logits, target).tolist() == [2]
    assert closest_component(mean, logits, target, k=4).tolist() == [3]
    # near-deterministic choice: a low temperature takes the most likely; k = 1 always does
    g = torch.Generator().manual_seed(0)
    picks = choose_component(logits.expand(200, -1), 3, 0.1, g)
    assert (picks == 0).float().mean() > 0.99
    assert set(choose_component(logits.expand(200, -1), 3, 10.0, g).tolist()) == {0, 1, 2}


@settings(max_examples=60, deadline=None)
@given(st.floats(0.5, 15.0), st.floats(-0.25, 0.25), st.floats(-1.5, 1.5))
def test_bicycle_toward_reaches_an_arc_target(v0, curvature, accel):
    # a target the bicycle reaches without stopping (made by the bicycle itself): driving the action found
    # lands on it within 2 cm; the curvature is recovered, and the acceleration exactly at constant speed
    assume(v0 + 0.5 * accel > 0.1)
    bike = InvertibleBicycle()

    def drive(state, act):
        for _ in range(5):
            state = bike.forward(state, act, 0.1)
        return state

    state = torch.tensor([[0.0, 0.0, 0.0, v0, 0.0]], dtype=torch.float64)
    act = torch.tensor([[accel, curvature]], dtype=torch.float64)
    target = drive(state, act)[:, :3]
    got = bicycle_toward(state, target, 0.5)
    reached = drive(state, got)[:, :3]
    assert float((reached[:, :2] - target[:, :2]).norm()) < 0.02
    assert float(got[0, 1] - curvature) == pytest.approx(0.0, abs=1e-3)
    if accel == 0.0:
        torch.testing.assert_close(got, act, atol=1e-9, rtol=1e-9)


def test_bicycle_toward_stops_for_a_target_behind_and_stays_in_bounds():
    state = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0]])
    act = bicycle_toward(state, torch.tensor([[-1.0, 0.0, 0.0]]), 0.5)
    assert act[0, 0] == -10.0 and act[0, 1] == 0.0  # the hardest braking; no turn on the spot
    act = bicycle_toward(state, torch.tensor([[40.0, 10.0, 1.0]]), 0.5)
    assert act[0, 0] == 6.0 and act[0, 1] <= 0.3


def test_reachable_target_is_the_log_where_reachable_and_bounded_where_not():
    # 12 m/s heading along +y, 0.1 s steps: a logged pose 6 m ahead is reached exactly (zero acceleration)
    state = torch.tensor([[3.0, 4.0, math.pi / 2, 0.0, 12.0], [0.0, 0.0, 0.0, 10.0, 0.0]])
    local = torch.tensor([[6.0, 0.0, 0.0], [20.0, 0.0, 0.0]])
    got = reachable_target(state, local, 0.1)
    torch.testing.assert_close(got[0], local[0], atol=1e-5, rtol=0)
    # 20 m ahead at 10 m/s is out of reach: the most the bicycle's 6 m/s² covers, 10 * 0.5 + 6 * 0.5**2 / 2
    torch.testing.assert_close(got[1], torch.tensor([5.75, 0.0, 0.0]), atol=1e-5, rtol=0)
    # a turn within the curvature bound is reached to centimetres; one beyond it is not
    arc = torch.tensor([[5.0 * math.sin(0.5), 5.0 * (1 - math.cos(0.5)), 0.5]])  # radius 5 m, 2.5 m of arc
    moving = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0]])
    torch.testing.assert_close(reachable_target(moving, arc, 0.1), arc, atol=0.02, rtol=0)
    sharp = reachable_target(moving, torch.tensor([[0.5, 2.0, 1.5]]), 0.1)
    assert sharp[0, 2].abs() < 1.5 and sharp[0, 1] < 2.0
    assert reachable_target(moving[:0], arc[:0], 0.1).shape == (0, 3)


def test_speed_tracking_ends_at_the_targets_mean_speed():
    # 7 m/s, a target 4 m straight ahead in 0.5 s (mean speed 8 m/s): hitting the pose needs 4 m/s² (and ends at
    # 9 m/s); tracking the speed needs 2 m/s² (and ends at 8 m/s)
    state = torch.tensor([[0.0, 0.0, 0.0, 7.0, 0.0]])
    target = torch.tensor([[4.0, 0.0, 0.0]])
    assert bicycle_toward(state, target, 0.5)[0, 0].item() == pytest.approx(4.0)
    assert bicycle_toward(state, target, 0.5, tracking="speed")[0, 0].item() == pytest.approx(2.0)
    with pytest.raises(UnknownNameError, match="tracking 'position'"):
        bicycle_toward(state, target, 0.5, tracking="position")


def test_anchors_spread_the_components_over_the_targets():
    # three clusters of next poses (standing, 5 m ahead, 5 m ahead turning left): k-means puts an anchor on each,
    # and the means start at the anchors (offsets of an untrained head are small)
    data = scenes(1)
    vocab = vocab_of(data)
    model = micro_gmm(vocab)
    model.components = 3
    model.anchors = torch.zeros(3, 3)
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [4.5, 1.0, 0.4]])
    targets = torch.cat([c + 0.05 * torch.randn(50, 3, generator=g) for c in centres])
    anchors = model.set_anchors(targets)
    assert (torch.cdist(centres, anchors).min(dim=1).values < 0.05).all()  # an anchor on every cluster
    assert torch.equal(model.anchors, anchors)  # a buffer: saved and loaded with the weights
    same = model.set_anchors(torch.ones(5, 3))  # fewer distinct targets than components: every anchor there
    torch.testing.assert_close(same, torch.ones(3, 3))


def test_pose_targets_are_the_logged_next_pose_in_the_input_frame():
    data = scenes(1)
    vocab = vocab_of(data)
    model = micro_gmm(vocab)
    sample = scene_sample(data[0], vocab, model.cfg, pose_targets="ego")
    assert sample.next_pose_valid[1:].sum() == 0 and sample.next_pose_valid[0].all()  # the ego (agent 0) only
    log = data[0].trajectory[0]
    n = sample.pose.shape[1]
    frame = sample.pose[0]  # the input (matched) pose at each boundary s; the target is the log at s + 1
    d = log[5:5 * n + 1:5, :2] - frame[:, :2]
    c, si = np.cos(frame[:, 2]), np.sin(frame[:, 2])
    np.testing.assert_allclose(sample.next_pose[0, :, 0], c * d[:, 0] + si * d[:, 1], atol=1e-4)
    np.testing.assert_allclose(sample.next_pose[0, :, 1], -si * d[:, 0] + c * d[:, 1], atol=1e-4)
    # straight motion: no heading change, and forward by the distance travelled while the agent moves
    np.testing.assert_allclose(sample.next_pose[0, :, 2], 0.0, atol=1e-3)
    travelled = np.abs(log[5::5, 0] - log[:-5:5, 0])[:n]
    moving = travelled > 0.5
    np.testing.assert_allclose(sample.next_pose[0, moving, 0], travelled[moving], atol=0.1)
    every = scene_sample(data[0], vocab, model.cfg, pose_targets="vehicles")
    assert every.next_pose_valid.all(axis=1).all()
    with pytest.raises(UnknownNameError, match="pose-target set 'all'"):
        scene_sample(data[0], vocab, model.cfg, pose_targets="all")


def test_incremental_mixture_equals_teacher_forcing():
    data = scenes(2)
    vocab = vocab_of(data)
    model = micro_gmm(vocab, agent_layers=2).eval()
    batch = collate([scene_sample(s, vocab, model.cfg, pose_targets="vehicles") for s in data])
    with torch.no_grad():
        enc = model.encode_map(batch.map_points, batch.map_pose, batch.map_type, batch.map_valid,
                               nbr=batch.map_nbr, rows=batch.map_rows)
        logits, mean = model(enc, batch.pose, batch.valid, batch.in_token, batch.agent_type, batch.extent,
                             m2a_nbr=batch.m2a_nbr)
        cache: dict = {}
        for s in range(batch.pose.shape[2]):
            lg, mu = model.step(cache, enc, batch.pose[:, :, s], batch.valid[:, :, s], batch.in_token[:, :, s],
                                batch.agent_type, batch.extent)
            ok = batch.valid[:, :, s]
            torch.testing.assert_close(lg[ok], logits[:, :, s][ok], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(mu[ok], mean[:, :, s][ok], atol=2e-4, rtol=1e-4)


def test_a_few_steps_of_bc_lower_the_nll():
    data = scenes(4)
    vocab = vocab_of(data)
    model = micro_gmm(vocab)
    batch = collate([scene_sample(s, vocab, model.cfg, pose_targets="vehicles") for s in data])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        total, count, before = model.loss(batch)
    first = float(total / count)
    for _ in range(60):
        total, count, _ = model.loss(batch)
        opt.zero_grad()
        (total / count).backward()
        opt.step()
    with torch.no_grad():
        total, count, after = model.loss(batch)
    print(first, float(total / count), before, after)
    assert float(total / count) < first - 3.0
    assert after["top1_error"] < 0.5 * before["top1_error"]


def test_bad_input_is_named():
    data = scenes(1)
    vocab = vocab_of(data)
    with pytest.raises(InvalidOptionError, match="components must be >= 1"):
        GmmEgoModel(micro_gmm(vocab).cfg, vocab, components=0)
    with pytest.raises(CheckpointError, match="needs trained weights"):
        GmmEgoAgent()
    from agents.smart import SmartModel

    with pytest.raises(CheckpointError, match="needs a GmmEgoModel"):
        GmmEgoAgent(SmartModel(micro_gmm(vocab).cfg, vocab))
    model = micro_gmm(vocab)
    batch = collate([scene_sample(data[0], vocab, model.cfg)])
    from envs.errors import TrafficGymError

    with pytest.raises(TrafficGymError, match="needs next_pose targets"):
        model.loss(batch)


def _trained(data, vocab, steps: int = 80) -> GmmEgoModel:
    model = micro_gmm(vocab)
    batch = collate([scene_sample(s, vocab, model.cfg, pose_targets="vehicles") for s in data])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        total, count, _ = model.loss(batch)
        opt.zero_grad()
        (total / count).backward()
        opt.step()
    return model.eval()


def test_the_agent_drives_the_ego_in_closed_loop_closer_to_the_log_once_trained():
    from envs import sim
    from training.rollouts import drive

    data = scenes(4)
    vocab = vocab_of(data)

    def ego_ade(model):
        state = sim.reset(data, start_step=10, controlled="ego")
        state = drive(state, GmmEgoAgent(model), seed=0)
        b = torch.arange(len(data))
        err = (state.traj[b, state.ego, 11:, :2] - state.log[b, state.ego, 11:, :2]).norm(dim=-1)
        others = state.agent_mask.clone()
        others[b, state.ego] = False
        # log replay for the others: exactly their log
        torch.testing.assert_close(state.traj[..., 11:, :2][others], state.log[..., 11:, :2][others])
        return float(err.mean())

    untrained, trained = ego_ade(micro_gmm(vocab).eval()), ego_ade(_trained(data, vocab))
    print(untrained, trained)
    assert trained < 0.7 * untrained


def test_checkpoints_round_trip_and_are_not_smart_checkpoints(tmp_path):
    from agents.checkpoint import save_checkpoint
    from agents.registry import make_agent
    from training.bc import save_smart

    data = scenes(1)
    vocab = vocab_of(data)
    model = micro_gmm(vocab)
    agent_name, cfg = save_smart(model)
    assert agent_name == "gmm_ego"
    save_checkpoint(tmp_path / "gmm.safetensors", agent_name, cfg, model.state_dict())
    agent = make_agent("gmm_ego", checkpoint=tmp_path / "gmm.safetensors", temperature=0.5)
    assert agent.model.components == 16 and agent.temperature == 0.5
    for k, v in model.state_dict().items():
        torch.testing.assert_close(agent.model.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="holds a 'gmm_ego' checkpoint, not 'smart'"):
        make_agent("smart", checkpoint=tmp_path / "gmm.safetensors")
    from agents.smart import PRETRAINED

    with pytest.raises(CheckpointError, match="holds a 'smart' checkpoint, not 'gmm_ego'"):
        make_agent("gmm_ego", checkpoint=PRETRAINED["towns-nano"])


def test_it_refuses_to_drive_anything_but_the_ego():
    from envs import sim

    data = scenes(1)
    vocab = vocab_of(data)
    agent = GmmEgoAgent(micro_gmm(vocab))
    state = sim.reset(data, start_step=10, controlled="all")
    with pytest.raises(InvalidOptionError, match="ego policy: it drives the scene's ego and nothing else"):
        agent.reset(state, state.controlled)


def _gmm_on_nano() -> GmmEgoModel:
    """A mixture model on the bundled tokenized policy's backbone (its head untrained), as --init towns-nano."""
    from training.bc import _smart_backbone

    torch.manual_seed(0)
    nano = _smart_backbone("towns-nano")
    model = GmmEgoModel(nano.cfg, nano.motion_vocabulary())
    model.load_state_dict(nano.state_dict(), strict=False)
    return model


def test_teacher_forcing_on_the_ego_rollout_gives_the_rollout_mixtures():
    from agents.gmm_ego import GmmCatKRollout
    from envs.data import open_dataset
    from training.catk import catk_sample

    ds = open_dataset("towns", "val")
    model = _gmm_on_nano().eval()
    seen = []
    step = model.step

    def recording_step(cache, enc, pose, valid, in_token, agent_type, extent):
        out = step(cache, enc, pose, valid, in_token, agent_type, extent)
        seen.append(out)
        return out

    model.step = recording_step
    agent = GmmCatKRollout(model)
    scene = ds[5]
    sample = catk_sample(agent, scene, ds.map_index(scene.map_id))
    del model.step
    batch = collate([sample])
    with torch.no_grad():
        enc = model.encode_map(batch.map_points, batch.map_pose, batch.map_type, batch.map_valid,
                               nbr=batch.map_nbr, rows=batch.map_rows)
        logits, mean = model(enc, batch.pose, batch.valid, batch.in_token, batch.agent_type, batch.extent,
                             m2a_nbr=batch.m2a_nbr)
    e, a = scene.ego_index, scene.num_agents
    # the rollout's decoder steps: boundaries 0 and 5 (history), then one per 0.5 s from step 10
    assert len(seen) == batch.pose.shape[2] - (0 if (scene.num_steps - 1) % 5 else 1) or len(seen) >= 17
    for s, (lg, mu) in enumerate(seen[: batch.pose.shape[2]]):
        ok = batch.valid[0, :a, s]
        torch.testing.assert_close(lg[0, :a][ok], logits[0, :a, s][ok], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(mu[0, :a][ok], mean[0, :a, s][ok], atol=2e-4, rtol=1e-4)
    # targets: the ego's only, from step 10 on, the logged pose 0.5 s later in the rollout pose's frame
    has = torch.as_tensor(sample.next_pose_valid)
    assert has[e, 2:].sum() > 10 and not has[e, :2].any() and has.sum() == has[e].sum()
    from envs.geometry import pose_in_frame

    # the first target: the rollout is still on the log, which the bicycle reaches (reachable_target)
    s = int(has[e].nonzero()[0])
    logged = pose_in_frame(torch.as_tensor(scene.trajectory[e, 5 * (s + 1), :3]).double(),
                           torch.as_tensor(sample.pose[e, s]).double())
    np.testing.assert_allclose(sample.next_pose[e, s], logged.numpy(), atol=0.1)


def test_ego_rollout_samples_add_the_other_vehicles_log_targets_on_request():
    from agents.gmm_ego import GmmCatKRollout
    from envs.data import open_dataset
    from envs.geometry import pose_in_frame
    from envs.types import AgentType
    from training.catk import catk_samples

    ds = open_dataset("towns", "val")
    scene = ds[5]
    agent = GmmCatKRollout(_gmm_on_nano().eval())
    ego_only, every = (catk_samples(agent, [scene], [ds.map_index(scene.map_id)], pose_targets=t)[0]
                       for t in ("ego", "vehicles"))
    e = scene.ego_index
    np.testing.assert_array_equal(every.next_pose_valid[e], ego_only.next_pose_valid[e])
    np.testing.assert_allclose(every.next_pose[e][every.next_pose_valid[e]],
                               ego_only.next_pose[e][ego_only.next_pose_valid[e]], atol=1e-5)
    others = every.next_pose_valid.copy()
    others[e] = False
    vehicles = scene.agent_type == int(AgentType.VEHICLE)
    assert others.sum() > 50 and not others[~vehicles].any()
    # the others replay the log: their targets are the logged pose 0.5 s later in the logged pose's frame
    a, s = np.argwhere(others)[len(np.argwhere(others)) // 2]
    want = pose_in_frame(torch.as_tensor(scene.trajectory[a, 5 * (s + 1), :3]).double(),
                         torch.as_tensor(scene.trajectory[a, 5 * s, :3]).double())
    np.testing.assert_allclose(every.next_pose[a, s], want.numpy(), atol=1e-4)


def test_ego_catk_step_trains_the_head_and_decoder_and_leaves_the_frozen_set(tmp_path):
    from envs.data import open_dataset
    from training.catk import TRAINABLE, train_catk

    ds = open_dataset("towns", "train")
    model = _gmm_on_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, history = train_catk(model, ds, tmp_path, max_steps=2, batch_size=2, lr=1e-3, top_k=3, scenes=2,
                                progress=False, ckpt_every=0)
    assert len(history) == 2 and 10 < history[0]["targets"] < 40  # the egos' steps only
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert all(k.startswith(TRAINABLE["catk"]) for k in changed)
    assert any(k.startswith("gmm_head.") for k in changed) and any(k.startswith("a2a.") for k in changed)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 16\] \(mixture components\)"):
        train_catk(_gmm_on_nano(), ds, tmp_path / "x", max_steps=1, top_k=32)
    # --bc-mix: the same scenes' behaviour-cloning samples join each batch (the ego's logged steps as targets)
    _, mixed = train_catk(_gmm_on_nano(), ds, tmp_path / "mix", max_steps=1, batch_size=2, lr=1e-3, top_k=3,
                          scenes=2, progress=False, ckpt_every=0, bc_mix=10)
    bc_targets = sum(int(scene_sample(ds[i], model.motion_vocabulary(), model.cfg, pose_targets="ego")
                         .next_pose_valid.sum()) for i in range(2))
    assert mixed[0]["targets"] == history[0]["targets"] + bc_targets


@pytest.mark.slow
def test_train_commands_for_the_ego_policy_and_their_bad_input(tmp_path, capsys):
    import json

    from training.cli import main

    bc = tmp_path / "bc"
    assert main(["train", "bc", "--agent", "gmm_ego", "--init", "towns-nano", "--out", str(bc), "--max-steps", "2",
                 "--scenes", "4", "--val-scenes", "1", "--val-every", "2", "--workers", "0"]) == 0
    out = json.loads((printed := capsys.readouterr().out)[printed.index("{"):])
    assert out["steps"] == 2 and "top1_error" in out and "val/planning_min_ade" in out["validation"]
    agent = GmmEgoAgent.from_checkpoint(bc / "model.safetensors")
    assert agent.model.cfg.size == "nano" and len(agent.model.vocab("vehicle")) == 2048
    catk = tmp_path / "catk"
    assert main(["train", "catk", "--agent", "gmm_ego", "--init", str(bc / "model.safetensors"), "--out", str(catk),
                 "--max-steps", "1", "--batch-size", "1", "--scenes", "2", "--val-scenes", "0"]) == 0
    capsys.readouterr()
    run = json.loads((catk / "catk.json").read_text())
    assert (run["agent"], run["lr"], run["top_k"]) == ("gmm_ego", 1e-4, 3)
    GmmEgoAgent.from_checkpoint(catk / "model.safetensors")
    # the tokenized policy's weights are not an ego policy's, and vice versa
    assert main(["train", "catk", "--agent", "gmm_ego", "--init", "towns-nano", "--out", str(tmp_path / "x"),
                 "--val-scenes", "0"]) == 2
    assert "'smart' checkpoint, not 'gmm_ego'" in capsys.readouterr().err
    assert main(["train", "catk", "--init", str(bc / "model.safetensors"), "--out", str(tmp_path / "y"),
                 "--val-scenes", "0"]) == 2
    assert "'gmm_ego' checkpoint, not 'smart'" in capsys.readouterr().err
    assert main(["train", "bc", "--init", "towns-nano", "--out", str(tmp_path / "z"), "--val-scenes", "0"]) == 2
    assert "--init starts a gmm_ego model" in capsys.readouterr().err


def test_a_scene_without_an_ego_and_an_unknown_size_are_named():
    from envs.errors import NoEgoError
    from tests.scenes import make_scene, straight_road
    from training.bc import train_bc

    scene = make_scene([dict(x0=0, y0=-1.75, speed=5.0)], map_data=straight_road(), ego_index=-1)
    from envs import sim

    with pytest.raises(NoEgoError):
        sim.reset([scene], start_step=10, controlled="ego")
    data = scenes(1)
    vocab = vocab_of(data)
    with pytest.raises(UnknownNameError, match="SMART size 'huge'"):
        train_bc(data, vocab, "huge", "/tmp/unused", 1, agent="gmm_ego")
    with pytest.raises(UnknownNameError, match="agent trainable by behaviour cloning 'gmm'"):
        train_bc(data, vocab, "nano", "/tmp/unused", 1, agent="gmm")
    # no pose target at all (no ego in any scene, ego targets asked for): refused, not an empty run
    from envs.errors import TrafficGymError

    with pytest.raises(TrafficGymError, match="No training samples"):
        train_bc([scene], vocab, "nano", "/tmp/unused", 1, agent="gmm_ego", pose_targets="ego", progress=False,
                 **MICRO)


def test_it_drives_the_ego_in_eval_render_and_the_ego_env(tmp_path, capsys):
    # trained on a tiny dataset by the command; then the evaluation (ego setting, IDM traffic), the renderer and
    # the Gymnasium env (through AgentPolicy, whose episode equals the simulator's rollout) all drive with it
    import gymnasium as gym
    import imageio.v3 as iio

    import envs  # noqa: F401
    from agents.env_policy import AgentPolicy
    from agents.registry import make_agent
    from envs import sim
    from tests import interaction_fixture as fixture
    from training.cli import main
    from training.rollouts import drive

    root = fixture.write_dataset(tmp_path / "data", cases=2, case_length=91)
    common = ["--dataset", "interaction_multi", "--data-dir", str(root), "--case-length", "91", "--cache-dir",
              str(tmp_path / "cache")]
    assert main(["train", "bc", "--agent", "gmm_ego", *common, "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--val-scenes", "0", "--workers", "0"]) == 0
    ckpt = str(tmp_path / "run" / "model.safetensors")
    assert main(["eval", "--setting", "ego", "--agent", "gmm_ego", "--checkpoint", ckpt, "--traffic", "idm", *common,
                 "--split", "val", "--rollouts", "2", "--metric", "planning", "--metric", "min_ade"]) == 0
    assert "planning_min_ade" in capsys.readouterr().out
    out = tmp_path / "gmm.gif"
    assert main(["render", "--setting", "ego", "--agent", "gmm_ego", "--checkpoint", ckpt, "--traffic", "idm",
                 *common, "--split", "val", "--scene", "DR_USA_Tiny_Road_val_0", "--out", str(out), "--size",
                 "96"]) == 0
    assert iio.imread(out, index=None).shape[0] == 81
    assert main(["eval", "--agent", "gmm_ego", "--checkpoint", ckpt, *common, "--split", "val", "--rollouts",
                 "2", "--metric", "min_ade"]) == 2  # the sim-agents setting: every agent, not the ego alone
    assert "ego policy" in capsys.readouterr().err
    env = gym.make("trafficgym/Ego-v0", dataset="interaction_multi", data_dir=str(root), case_length=91,
                   split="val", cache_dir=str(tmp_path / "cache"), terminate_on_collision=False,
                   terminate_on_offroad=False)
    policy = AgentPolicy(env, make_agent("gmm_ego", checkpoint=ckpt), seed=4)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, terminated, truncated, _ = env.step(policy(None))
        done = terminated or truncated
    eng = env.unwrapped.engine
    st = eng.state
    scene = eng.dataset[eng.scene_indices[int(eng.slot_scene[0])]]
    ref = drive(sim.reset([scene], start_step=10, controlled="ego"), make_agent("gmm_ego", checkpoint=ckpt), seed=4)
    e = int(st.ego[0])
    torch.testing.assert_close(st.traj[0, e, :, :3], ref.traj[0, e, :, :3], atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["towns-gmm", "towns-gmm-catk", "towns-gmm-ppo"])
def test_bundled_towns_weights_load_and_drive_the_ego_closer_to_the_log_than_constant_velocity(name):
    # the shipped checkpoints (README: the gmm_ego section) are nano backbones with anchored components, and they
    # drive: on towns val scenes the ego stays closer to the log than constant velocity's
    from agents.gmm_ego import PRETRAINED
    from agents.registry import make_agent
    from envs.data import open_dataset
    from envs.metrics.episode import compute_episode_metrics
    from training.rollouts import simulate_scene

    assert PRETRAINED[name].is_file() and PRETRAINED[name].stat().st_size < 8e6
    agent = make_agent("gmm_ego", checkpoint=name)
    assert agent.model.cfg.size == "nano" and agent.model.components == 16
    assert float(agent.model.anchors.std(0)[0]) > 1.0  # spread components, not one collapsed mean
    val = open_dataset("towns", "val")
    cv = make_agent("constant_velocity")
    ours, theirs = [], []
    for i in (0, 32, 64, 96, 127):  # spread over the split's towns; the mean over them
        ours.append(compute_episode_metrics(simulate_scene(agent, val, i, 4, setting="ego", seed=i),
                                            ["planning"])["planning_min_ade"])
        theirs.append(compute_episode_metrics(simulate_scene(cv, val, i, 4, setting="ego", seed=i),
                                              ["planning"])["planning_min_ade"])
    print(ours, theirs)
    assert np.mean(ours) < 0.8 * np.mean(theirs)
    with pytest.raises(CheckpointError, match="Did you mean 'towns-gmm'"):
        make_agent("gmm_ego", checkpoint="towns-gm")


def test_more_bad_options_are_named(tmp_path):
    from agents.gmm_ego import GmmCatKRollout
    from envs import sim
    from envs.types import AgentType
    from tests.scenes import make_scene, straight_road
    from training.catk import train_catk

    data = scenes(1)
    vocab = vocab_of(data)
    with pytest.raises(UnknownNameError, match="tracking 'exact'"):
        GmmEgoAgent(micro_gmm(vocab), tracking="exact")
    with pytest.raises(UnknownNameError, match="CAT-K rollout choice 'greedy'"):
        GmmCatKRollout(micro_gmm(vocab), choice="greedy")
    walker = make_scene([dict(x0=0, y0=0, speed=1.2, type=AgentType.PEDESTRIAN)], map_data=straight_road())
    state = sim.reset([walker], start_step=10, controlled="ego")
    with pytest.raises(InvalidOptionError, match="drives vehicles only"):
        GmmEgoAgent(micro_gmm(vocab)).reset(state, state.controlled)

    class NoEgo(list):
        def entry(self, i):
            return type("E", (), {"ego_index": -1, "map_id": "m"})()

    from envs.errors import TrafficGymError

    with pytest.raises(TrafficGymError, match="has an ego to fine-tune the ego policy on"):
        train_catk(micro_gmm(vocab), NoEgo(data), tmp_path, max_steps=1, top_k=3, progress=False)
