"""PPO fine-tuning of the Gaussian-mixture ego (training/ppo.py): GAE with termination vs truncation, the mixture
action's log-probability, the KL to the initial policy, rollouts that do not depend on their batch, and the
teacher-forced scores equal to the rollout's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.ppo import (
    GmmPpo,
    GmmPpoConfig,
    GmmPpoRollout,
    action_log_prob,
    collect,
    gae,
    kl_to_init,
    masked_entropy,
)

LOG_2PI = math.log(2 * math.pi)


# ---- GAE ---------------------------------------------------------------------------------------------------------

def test_gae_terminated_episode_has_nothing_after_its_end():
    adv, ret = gae(np.array([[1.0, 2.0]]), np.array([[0.5, 1.0]]), np.array([2]), np.array([True]),
                   last_value=np.array([100.0]), discount=np.full((1, 2), 0.9), lam=0.5)
    # delta1 = 2 + 0 - 1 = 1; delta0 = 1 + 0.9 * 1 - 0.5 = 1.4; A0 = 1.4 + 0.9 * 0.5 * 1
    np.testing.assert_allclose(adv, [[1.85, 1.0]])
    np.testing.assert_allclose(ret, [[2.35, 2.0]])


def test_gae_truncated_episode_is_bootstrapped_with_its_final_value():
    adv, ret = gae(np.array([[1.0, 2.0]]), np.array([[0.5, 1.0]]), np.array([2]), np.array([False]),
                   last_value=np.array([2.0]), discount=np.full((1, 2), 0.9), lam=0.5)
    # delta1 = 2 + 0.9 * 2 - 1 = 2.8; A0 = 1.4 + 0.45 * 2.8
    np.testing.assert_allclose(adv, [[2.66, 2.8]])
    np.testing.assert_allclose(ret, [[3.16, 3.8]])


def test_gae_pads_short_episodes_and_uses_each_decisions_discount():
    adv, ret = gae(np.array([[1.0, 7.0], [1.0, 1.0]]), np.array([[0.0, 9.0], [0.0, 0.0]]), np.array([1, 2]),
                   np.array([False, True]), last_value=np.array([3.0, 0.0]),
                   discount=np.array([[0.5, 0.0], [0.8, 0.9]]), lam=1.0)
    np.testing.assert_allclose(adv[0], [1.0 + 0.5 * 3.0, 0.0])  # padding ignored, bootstrap x its own discount
    np.testing.assert_allclose(adv[1], [1.0 + 0.8 * 1.0, 1.0])  # lambda 1: the discounted return - value
    np.testing.assert_allclose(ret[0, 1], 0.0)


# ---- the mixture action ------------------------------------------------------------------------------------------

def test_action_log_prob_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]])
    allowed = torch.tensor([[True, True, False]])  # the top-k at the time (the third is not among them)
    mean = torch.zeros(1, 3, 3)
    pose = torch.tensor([[0.5, 0.0, 0.1]])
    std = (0.5, 0.5, 0.05)
    got = action_log_prob(logits, mean, allowed, torch.tensor([1]), pose, std)
    gauss = (-0.5 - math.log(0.5)) + (-math.log(0.5)) + (-0.5 * 4 - math.log(0.05)) - 1.5 * LOG_2PI
    assert float(got) == pytest.approx(math.log(0.75) + gauss, abs=1e-5)
    # no exploration noise: the pose is the mean and only the component's probability counts
    assert float(action_log_prob(logits, mean, allowed, torch.tensor([0]), pose, (0.0, 0.0, 0.0))) == \
        pytest.approx(math.log(0.25), abs=1e-6)


def test_action_log_prob_wraps_the_heading_difference():
    mean = torch.zeros(1, 1, 3)
    mean[0, 0, 2] = math.pi - 0.05
    pose = torch.tensor([[0.0, 0.0, -math.pi + 0.05]])  # 0.1 rad from the mean across +-pi
    got = action_log_prob(torch.zeros(1, 1), mean, torch.ones(1, 1, dtype=torch.bool), torch.tensor([0]), pose,
                          (0.0, 0.0, 0.05))
    assert float(got) == pytest.approx(-0.5 * 4 - math.log(0.05) - 0.5 * LOG_2PI, abs=1e-4)


def test_masked_entropy_by_hand():
    allowed = torch.tensor([[True, True, False]])
    assert float(masked_entropy(torch.tensor([[1.0, 1.0, 9.0]]), allowed)) == pytest.approx(math.log(2.0))


def test_kl_to_init_by_hand():
    logits, init = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])
    mean, init_mean = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)
    mean[0, 0, 0] = 0.5  # component 0 moved by one exploration std in x
    got = kl_to_init(logits, mean, init, init_mean, (0.5, 0.5, 0.05))
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.5 * 0.5 * 1.0
    assert float(got) == pytest.approx(want, abs=1e-6)
    assert float(kl_to_init(init, init_mean, init, init_mean, (0.5, 0.5, 0.05))) == pytest.approx(0.0, abs=1e-7)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_kl_to_init_is_non_negative(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 16, generator=g) * 3, torch.randn(4, 16, generator=g) * 3
    m, m0 = torch.randn(4, 16, 3, generator=g), torch.randn(4, 16, 3, generator=g)
    assert (kl_to_init(a, m, b, m0, (0.5, 0.5, 0.05)) >= -1e-6).all()


# ---- rollouts and scores -----------------------------------------------------------------------------------------

def _engine(num: int, traffic: str = "log"):
    import gymnasium as gym

    import envs  # noqa: F401

    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=num, vectorization_mode="vector_entry_point", split="val",
                        traffic=traffic)
    return venv.unwrapped.engine


@pytest.fixture(scope="module")
def catk_model():
    from training.ppo import load_init

    return load_init("towns-gmm-catk").eval()


def test_a_scenes_rollout_does_not_depend_on_the_other_scenes_of_its_batch(catk_model):
    agent = GmmPpoRollout(catk_model, top_k=3, pose_std=(0.5, 0.5, 0.05))
    both = collect(_engine(2), agent, [3, 40], seeds=[11, 12], gamma=0.99)
    alone = collect(_engine(1), agent, [40], seeds=[12], gamma=0.99)
    mine = both.row == 1
    np.testing.assert_array_equal(both.comp[mine], alone.comp)
    np.testing.assert_allclose(both.pose[mine], alone.pose, atol=1e-4)
    np.testing.assert_allclose(both.reward[1], alone.reward[0], atol=1e-5)
    assert both.length[1] == alone.length[0] == len(alone.comp)
    assert both.episodes["return"][1] == pytest.approx(alone.episodes["return"][0], abs=1e-5)


def test_rollout_rewards_sum_to_the_env_return_and_decisions_follow_the_top_k(catk_model):
    agent = GmmPpoRollout(catk_model, top_k=3, pose_std=(0.5, 0.5, 0.05))
    roll = collect(_engine(3), agent, [0, 17, 60], seeds=[1, 2, 3], gamma=1.0)
    # with gamma 1 the decisions' rewards add up to the env's episode return (the training reward)
    np.testing.assert_allclose(roll.reward.sum(1), roll.episodes["return"], rtol=1e-6, atol=1e-6)
    assert (roll.allowed.sum(1) == 3).all()
    assert roll.allowed[np.arange(len(roll.comp)), roll.comp].all()
    # one decision per 0.5 s from the first controlled step (10) until the episode ends
    for r in range(3):
        steps = roll.step[roll.row == r]
        np.testing.assert_array_equal(steps, np.arange(2, 2 + len(steps)))
        assert len(steps) == math.ceil(roll.episodes["length"][r] / 5)
    truncated = ~roll.terminated
    np.testing.assert_array_equal(roll.final_step[truncated], 18)  # the end of the 91-step log


def test_teacher_forced_scores_equal_the_rollouts_own(catk_model):
    from training.bc_data import collate

    agent = GmmPpoRollout(catk_model, top_k=3, pose_std=(0.5, 0.5, 0.05))
    roll = collect(_engine(2), agent, [5, 90], seeds=[7, 8], gamma=0.99)
    module = GmmPpo(catk_model, GmmPpoConfig())
    with torch.no_grad():
        logits, _, _ = module.score(collate(roll.samples), torch.as_tensor(roll.row),
                                    torch.as_tensor(roll.ego[roll.row]), torch.as_tensor(roll.step))
    recorded = torch.cat([r["logits"] for r in agent.records])
    torch.testing.assert_close(logits, recorded, atol=2e-4, rtol=1e-4)


def test_ppo_steps_raise_the_probability_of_the_decisions_with_positive_advantage(catk_model):
    """The update's direction: on one rollout's decisions, with advantage +1 where the ego took its most likely
    component and -1 elsewhere, a few small steps make the decisions of positive advantage more likely and the
    others less likely."""
    import copy

    from training.bc_data import collate
    from training.catk import freeze
    from training.ppo import PpoBatch

    model = copy.deepcopy(catk_model)
    freeze(model, "catk")
    agent = GmmPpoRollout(model, top_k=3, pose_std=(0.0, 0.0, 0.0))
    roll = collect(_engine(2), agent, [5, 90], seeds=[7, 8], gamma=0.99)
    cfg = GmmPpoConfig(kl_coef=0.0, clip=0.2)
    module = GmmPpo(model, cfg)
    tokens = collate(roll.samples)
    row, ego, step = torch.as_tensor(roll.row), torch.as_tensor(roll.ego[roll.row]), torch.as_tensor(roll.step)
    comp, allowed, pose = torch.as_tensor(roll.comp), torch.as_tensor(roll.allowed), torch.as_tensor(roll.pose)
    with torch.no_grad():
        logits, mean, _ = module.score(tokens, row, ego, step)
        old = action_log_prob(logits, mean, allowed, comp, pose, cfg.pose_std)
    good = comp == logits.masked_fill(~allowed, float("-inf")).argmax(-1)
    assert good.any() and (~good).any()
    adv = torch.where(good, 1.0, -1.0)
    batch = PpoBatch(tokens=tokens, row=row, agent=ego, step=step, comp=comp, allowed=allowed, pose=pose,
                     old_logp=old, advantage=adv, ret=torch.zeros(len(adv)), init_logits=logits, init_mean=mean)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(10):
        loss, n, _ = module.loss(batch)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    with torch.no_grad():
        logits, mean, _ = module.score(tokens, row, ego, step)
        new = action_log_prob(logits, mean, allowed, comp, pose, cfg.pose_std)
    assert (new - old)[good].mean() > 0.005
    assert (new - old)[~good].mean() < -0.05


def test_gmm_ppo_config_bad_input():
    with pytest.raises(ValueError, match="iterations"):
        GmmPpoConfig(iterations=0)
    with pytest.raises(ValueError, match="minibatches"):
        GmmPpoConfig(scenes=2, minibatches=4)
    with pytest.raises(ValueError, match="pose_std"):
        GmmPpoConfig(pose_std=(0.5, -1.0, 0.0))
    from envs.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        GmmPpoConfig(traffic="idn")
    with pytest.raises(UnknownNameError):
        GmmPpoConfig(frozen="everything")


@pytest.mark.slow
def test_ppo_learns_on_a_tiny_task(tmp_path):
    """The learning test: paid for standing still (the progress reward negated; no penalties, no termination), 8
    PPO iterations on two train scenes make the ego brake: the rollouts' progress falls far below the untrained
    policy's on the same scenes and draws (measured: 100 -> 46-50 m at lr 1e-4 to 2e-4)."""
    from training.ppo import train_gmm_ppo

    def progress(lr):
        cfg = GmmPpoConfig(iterations=8, scenes=2, epochs=4, minibatches=1, lr=lr, value_warmup=1, kl_coef=0.0,
                           top_k=16, pose_std=(1.0, 0.5, 0.05), progress_reward=-0.1, collision_penalty=0.0,
                           offroad_penalty=0.0, terminate=False, final_lr_fraction=1.0, seed=3)
        _, history = train_gmm_ppo(tmp_path / f"lr{lr}", cfg, init="towns-gmm-catk", progress=False,
                                   validate=False, scenes=2)
        return [h["episode_progress"] for h in history[::cfg.epochs]]  # one value per rollout

    learned, untrained = progress(1e-4), progress(1e-12)
    assert learned[:2] == pytest.approx(untrained[:2], abs=1e-3)  # the same policy until the first update
    assert np.mean(learned[-2:]) < np.mean(untrained[-2:]) - 15.0


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    """Under torchrun each process rolls out its share of the scenes (each scene with its own draws) and
    DistributedDataParallel averages the gradients: 2 processes x 1 scene == 1 process x 2 scenes."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["-m", "training.cli", "train", "ppo", "--policy", "gmm_ego", "--init", "towns-gmm-catk", "--iterations",
            "2", "--scenes-per-rollout", "2", "--minibatches", "1", "--epochs", "1", "--value-warmup", "0",
            "--lr", "1e-4", "--eval-scenes", "0", "--scenes", "4", "--ckpt-every", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                "2"])):
        run = subprocess.run([sys.executable, *launch, *args, "--out", str(tmp_path / name)], env=env,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    init = load_file(str(__import__("agents.gmm_ego", fromlist=["PRETRAINED"]).PRETRAINED["towns-gmm-catk"]))
    assert one.keys() == two.keys()
    assert any(not torch.equal(one[k], init[k]) for k in one)  # it trained
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-4)


def test_train_ppo_gmm_bad_input(tmp_path, capsys):
    from training.cli import main

    out = ["--out", str(tmp_path / "run")]
    assert main(["train", "ppo", "--policy", "gmm_eg", *out]) == 2
    assert "Did you mean 'gmm_ego'" in capsys.readouterr().err
    assert main(["train", "ppo", "--policy", "gmm_ego", *out]) == 2
    assert "give --init" in capsys.readouterr().err
    assert main(["train", "ppo", "--policy", "mlp", "--init", "towns-gmm", *out]) == 2
    assert "--init is for --policy gmm_ego" in capsys.readouterr().err
    assert main(["train", "ppo", "--policy", "gmm_ego", "--init", "towns-nano", *out]) == 2  # the tokenized policy's
    assert "bundled 'smart' checkpoint" in capsys.readouterr().err
    assert main(["train", "ppo", "--policy", "gmm_ego", "--init", "towns-gmm", "--pose-std", "0.5,x", *out]) == 2
    assert "--pose-std takes 3" in capsys.readouterr().err
    assert main(["train", "ppo", "--policy", "gmm_ego", "--init", "towns-gmm", "--resume", *out]) == 2
    assert "not a gmm_ego PPO run" in capsys.readouterr().err


def test_a_nan_loss_stops_with_the_step_and_the_last_checkpoint(tmp_path):
    from types import SimpleNamespace

    from training.ppo import _NanGuard
    from training.sb3_ppo import TrainingDivergedError

    trainer = SimpleNamespace(step=12, cfg=SimpleNamespace(out=str(tmp_path)))
    assert _NanGuard().on_step_end(trainer, {"loss": 1.5}) is None
    with pytest.raises(TrainingDivergedError, match="step 12: the loss is nan.*none saved yet"):
        _NanGuard().on_step_end(trainer, {"loss": float("nan")})
    (tmp_path / "last.safetensors").write_bytes(b"")
    with pytest.raises(TrainingDivergedError, match="last.safetensors"):
        _NanGuard().on_step_end(trainer, {"loss": float("inf")})


def test_the_training_state_is_not_mistaken_for_the_agents_weights(tmp_path):
    from agents.checkpoint import save_checkpoint
    from agents.registry import make_agent
    from envs.errors import CheckpointError

    path = save_checkpoint(tmp_path / "last.safetensors", "gmm_ego_ppo", {}, {"x": torch.zeros(1)},
                           extra={"weights_of": "gmm_ego"})
    with pytest.raises(CheckpointError, match="training state .* load .*model.safetensors"):
        make_agent("gmm_ego", checkpoint=path)


def test_learning_curves_put_env_steps_on_the_x_axis(tmp_path):
    import json

    from torch.utils.tensorboard import SummaryWriter

    from envs.errors import TrafficGymError
    from training.ppo_curves import plot, read_run

    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "ppo.json").write_text(json.dumps({"scenes": 4}))
    w = SummaryWriter(str(run / "tb"))
    for step, length in ((4, 50.0), (8, 80.0), (12, 60.0)):  # one rollout per 4 gradient steps
        w.add_scalar("train/episode_length", length, step)
        for key in ("return", "collision", "offroad", "progress"):
            w.add_scalar(f"train/episode_{key}", float(step), step)
    w.close()
    (run / "val.jsonl").write_text("\n".join(json.dumps(
        {"step": s, "return": 1.0, "collision": 0.0, "offroad": 0.0, "progress": 9.0, **extra})
        for s, extra in ((0, {"env_steps": 0}), (8, {}))))
    data = read_run(run)
    np.testing.assert_allclose(data["train"]["return"][0], [200, 520, 760])  # cumulative 4 x mean length
    np.testing.assert_allclose(data["val"]["progress"][0], [0, 520])  # given, or read off the rollouts
    assert plot([str(run)], ["a"], tmp_path / "c.png").stat().st_size > 10_000
    with pytest.raises(TrafficGymError, match="not a gmm_ego PPO run"):
        read_run(tmp_path)
