"""The evaluation protocol: rollouts, their npz format, metric aggregation, and sharding over processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from agents.registry import make_agent
from envs.data import open_dataset
from envs.metrics.episode import RolloutError, register_episode_metric
from training.evaluate import evaluate
from training.rollouts import load_rollout_file, save_rollouts, simulate_scene


@register_episode_metric("test_mean_final_x", "m", "Mean final x over rollouts and agents (test only).", "test")
def _final_x(r):
    return {"test_mean_final_x": float(r.sim[:, :, -1, 0].mean())}


@pytest.fixture(scope="module")
def tiny_val(tiny_env_kwargs):
    kw = tiny_env_kwargs
    return open_dataset(kw["dataset"], "val", data_dir=kw["data_dir"], cache_dir=kw["cache_dir"], case_length=91)


def test_log_replay_rollouts_equal_the_log(tiny_val):
    r = simulate_scene(make_agent("log_replay"), tiny_val, 0, num_rollouts=3)
    r.validate()
    assert r.sim.shape == (3, 3, 91, 5)
    assert r.history_steps == 11
    assert r.context is None
    for k in range(3):
        torch.testing.assert_close(r.sim[k][r.log_valid][:, :3], r.log[r.log_valid][:, :3])  # poses exact
        torch.testing.assert_close(r.sim[k][r.log_valid], r.log[r.log_valid], atol=1e-3, rtol=0)  # v: finite diff
    assert r.ego_index == 0
    assert list(r.agent_ids) == ["0_1", "0_2", "0_3"]


def test_ego_setting_evaluates_every_agent_with_the_ego_marked(tiny_val):
    r = simulate_scene(make_agent("constant_velocity"), tiny_val, 1, num_rollouts=2, setting="ego",
                       traffic=make_agent("idm"))
    assert r.num_agents == 3
    assert r.ego_index == 0
    # The ego kept its speed (constant velocity); IDM drove the others.
    assert float(r.sim[0, 0, -1, 3]) == pytest.approx(float(r.log[0, 10, 3]), abs=1e-4)
    # the ego alone is scored: minADE and the realism likelihoods are the ego's
    assert r.scored.tolist() == [True, False, False]
    from envs.metrics.episode import compute_episode_metrics
    from envs.metrics.planning import ego_planning_metrics

    m = compute_episode_metrics(r, ["min_ade", "realism"])
    assert m["min_ade"] == pytest.approx(ego_planning_metrics(r)["planning_min_ade"], rel=1e-6)
    from dataclasses import replace

    alone = compute_episode_metrics(replace(r, scored=None), ["min_ade"])["min_ade"]
    assert alone != pytest.approx(m["min_ade"])  # the others' errors (IDM's) differ from the ego's


def test_npz_round_trip(tiny_val, tmp_path):
    r = simulate_scene(make_agent("random"), tiny_val, 0, num_rollouts=4, seed=3)
    path = save_rollouts(r, tmp_path)
    data = load_rollout_file(path)
    assert data["x"].shape == (4, 3, 91)
    assert data["z"].max() == 0
    assert int(data["history_steps"]) == 11
    np.testing.assert_allclose(data["x"], r.sim[..., 0].numpy())
    np.testing.assert_allclose(data["log_heading"], r.log[..., 2].numpy())
    assert data["agent_ids"].tolist() == ["0_1", "0_2", "0_3"]
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(RolloutError, match="not a readable rollout file"):
        load_rollout_file(tmp_path / "bad.npz")


def test_evaluate_is_deterministic_and_orders_scenes(tiny_val):
    a = evaluate("random", tiny_val, num_rollouts=3, metrics=["test_mean_final_x"], seed=5)
    b = evaluate("random", tiny_val, num_rollouts=3, metrics=["test_mean_final_x"], seed=5)
    assert a.pop("timing")["rollout_s_per_scene"] > 0
    assert b.pop("timing")
    assert a == b
    assert [r["scene_id"] for r in a["per_scene"]] == [f"DR_USA_Tiny_Road_val_{i}" for i in range(3)]
    mean = np.mean([r["test_mean_final_x"] for r in a["per_scene"]])
    assert a["metrics"]["test_mean_final_x"] == pytest.approx(mean)


@pytest.mark.slow
def test_two_processes_match_one(tiny_env_kwargs, tmp_path):
    kw = tiny_env_kwargs
    common = ["eval", "--agent", "random", "--dataset", kw["dataset"], "--data-dir", kw["data_dir"],
              "--case-length", "91", "--cache-dir", kw["cache_dir"], "--rollouts", "3", "--metric", "min_ade"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.json"
    subprocess.run([sys.executable, "-m", "training.cli", *common, "--json", str(one)], check=True, env=env,
                   capture_output=True)
    two = tmp_path / "two.json"
    # --standalone: a free local port each run (a fixed --master_port collides with a parallel run of this test)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "training.cli", *common, "--json", str(two)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]  # torchrun's and the ranks' errors, if it failed
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["per_scene"] == b["per_scene"]
    assert a["metrics"] == b["metrics"]
    assert a["scenes"] == 3


def test_complete_rollouts_continue_leavers_at_constant_velocity():
    from training.rollouts import complete_rollouts

    traj = torch.zeros(2, 3, 10, 5)
    traj[:, :, :, 0] = torch.arange(10.0)  # x = t, 10 m/s at dt 0.1
    traj[:, :, :, 3] = 10.0
    traj[:, :, :, 2] = 0.3
    valid = torch.ones(2, 3, 10, dtype=torch.bool)
    valid[0, 0, 6:] = False  # leaves after step 5 (e.g. its log ends)
    valid[1, 1, 4:7] = False  # a gap
    valid[:, 2, :4] = False  # not present at the start step 3 (it enters later): left as it is
    valid[:, 2, 5:] = False
    before = (traj.clone(), valid.clone())
    out, ok = complete_rollouts(traj, valid, start=3, dt=0.1)
    torch.testing.assert_close(traj, before[0])  # the inputs are kept
    torch.testing.assert_close(valid, before[1])
    assert ok[:, :2, 3:].all()
    assert ok[:, 2].tolist() == valid[:, 2].tolist()
    torch.testing.assert_close(out[0, 0, 6:, 0], 5.0 + torch.arange(1.0, 5.0))  # 1 m per step from x = 5
    assert (out[0, 0, 6:, 2] == 0.3).all()
    assert (out[0, 0, 6:, 3] == 10.0).all()
    torch.testing.assert_close(out[1, 1, 4:7, 0], torch.tensor([4.0, 5.0, 6.0]))


def test_sim_agents_rollouts_follow_the_wosac_protocol(tiny_val):
    # every agent valid at the current step is valid at every future step of every rollout, whatever the policy
    for name in ("log_replay", "idm", "constant_velocity"):
        r = simulate_scene(make_agent(name), tiny_val, 0, num_rollouts=2)
        assert r.sim_valid[:, :, r.history_steps:].all(), name


def test_too_few_rollouts_fail_before_rolling_out(tiny_val, monkeypatch):
    import training.rollouts

    def boom(*a, **k):
        raise AssertionError("rolled out before checking the metrics")

    monkeypatch.setattr(training.rollouts, "simulate_scene", boom)
    with pytest.raises(RolloutError, match=r"too few for the metric\(s\) \['realism', 'blm_fdd'\].*--rollouts 32"):
        evaluate("idm", tiny_val, num_rollouts=1)
    with pytest.raises(RolloutError, match=r"\['realism'\]"):
        evaluate("idm", tiny_val, num_rollouts=1, metrics=["realism", "min_ade"])
    from envs.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="Did you mean 'min_ade'"):
        evaluate("idm", tiny_val, num_rollouts=4, metrics=["min_aed"])


def test_npz_carries_the_metric_road_edges(tiny_val, tmp_path):
    r = simulate_scene(make_agent("idm"), tiny_val, 0, num_rollouts=2)
    data = load_rollout_file(save_rollouts(r, tmp_path))
    xy, off = data["road_edge_xy"], data["road_edge_offsets"]
    assert off[-1] == len(xy) > 0
    lines = [xy[off[p]:off[p + 1]] for p in range(len(off) - 1)]
    expected = r.map_index.road_edges.polylines()
    assert len(lines) == len(expected)
    assert all(np.allclose(a, b) for a, b in zip(lines, expected, strict=True))
    assert data["tl_red"].shape == (0, 91)  # no signals in this dataset
