"""The latent diffusion policy: the bounded unicycle, the action VAE's reconstruction after a short fit, the noise
schedule and DDIM against hand computations, the mixture NLL, sampling determinism, the closed-loop agent,
learning, and every error path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.latent_diffusion import (
    ActionVAE,
    DiffusionConfig,
    LatentDiffusionAgent,
    LatentDiffusionModel,
    VaeConfig,
    load_diffusion,
    load_vae,
)
from agents.latent_diffusion.denoiser import history_features, mixture_nll
from agents.latent_diffusion.schedule import add_noise, cosine_alpha_bar, ddim_mean, ddim_timesteps
from agents.latent_diffusion.vae import bounded_actions
from envs.dynamics import Unicycle
from envs.errors import CheckpointError, InvalidOptionError, TrafficGymError, UnknownNameError
from training.diffusion_data import action_sequences, dataset_actions, diffusion_batch

MICRO = dict(hidden=32, heads=2, context_layers=1, blocks=2, k_m2a=8, k_a2a=4)


@pytest.fixture(scope="module")
def train_ds():
    from envs.data import open_dataset

    return open_dataset("towns", "train")


@pytest.fixture(scope="module")
def fitted_vae(train_ds):
    """A VAE fitted for 400 steps on the sequences of 12 train scenes (about 20 s), and those sequences."""
    torch.manual_seed(0)
    data = dataset_actions(train_ds, 52, scenes=12)
    from training.diffusion import action_scale

    vae = ActionVAE(VaeConfig(action_scale=action_scale(data)))
    opt = torch.optim.Adam(vae.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(400):
        vae.beta.fill_(1e-3 * min(1.0, step / 200))
        loss, n, _ = vae.loss(data[torch.randint(len(data), (128,), generator=g)])
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    return vae.eval(), data


# ---- dynamics and data --------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 25.0), st.lists(st.floats(-8.0, 8.0), min_size=24, max_size=24))
def test_bounded_actions_stay_in_bounds_and_the_unicycle_replays_them(v0, raw):
    cfg = VaeConfig(horizon=12, stride=4)
    raw = torch.tensor(raw, dtype=torch.float64).view(1, 12, 2)
    actions, pos = bounded_actions(raw, torch.tensor([v0], dtype=torch.float64), cfg)
    assert (actions[..., 0].abs() <= cfg.accel_bound + 1e-9).all()
    assert (actions[..., 1].abs() <= cfg.yaw_rate_bound + 1e-9).all()
    state = torch.tensor([[0.0, 0.0, 0.0, v0, 0.0]], dtype=torch.float64)
    for k in range(12):
        state = Unicycle().forward(state, actions[:, k], cfg.dt)
        speed = state[0, 3:].norm().item()
        assert -1e-9 <= speed <= cfg.v_max + 1e-6
        torch.testing.assert_close(state[:, :2], pos[:, k], atol=1e-9, rtol=0)


def test_action_sequences_invert_the_log_and_stop_at_its_end(train_ds):
    scene = train_ds[0]
    seq, where = action_sequences(scene, 52, [10, 60])
    a, t0 = where[0]
    assert t0 == 10 and bool(seq.mask[0].all())  # 52 known steps after step 10 of a 91-step log
    # replaying the inverted actions reproduces heading and speed; the positions up to the log's own consistency
    log = torch.as_tensor(scene.trajectory, dtype=torch.float64)
    state = log[a, 10]
    for k in range(52):
        state = Unicycle().forward(state, seq.actions[0, k].double(), scene.dt)
    assert abs(float(state[2] - log[a, 62, 2])) < 1e-4
    late = seq.mask[where[:, 1] == 60]
    assert (late.sum(1) <= 90 - 60).all()  # the mask ends with the log
    from envs.geometry import pose_in_frame

    want = pose_in_frame(log[a, 11:63, :3], log[a, 10, :3])[:, :2]
    np.testing.assert_allclose(seq.positions[0].numpy(), want.numpy(), atol=1e-4)
    np.testing.assert_allclose(seq.v0[0].item(), float(np.hypot(*scene.trajectory[a, 10, 3:5])), rtol=1e-3)


def test_history_features_are_in_the_agents_frame():
    traj = torch.zeros(1, 1, 20, 5)
    traj[0, 0, :, 0] = torch.arange(20.0)  # 1 m per step along x, 10 m/s
    traj[0, 0, :, 3] = 10.0
    valid = torch.ones(1, 1, 20, dtype=torch.bool)
    valid[0, 0, :5] = False
    hist, pose = history_features(traj, valid, torch.tensor([12]), 11)
    torch.testing.assert_close(pose[0, 0], torch.tensor([12.0, 0.0, 0.0]))
    assert hist.shape == (1, 1, 11, 6)
    torch.testing.assert_close(hist[0, 0, -1], torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(hist[0, 0, 3], torch.tensor([-0.7, 0.0, 1.0, 0.0, 1.0, 1.0]))  # step 5
    assert (hist[0, 0, :3] == 0).all()  # steps 2-4: not in the log


# ---- VAE ------------------------------------------------------------------------------------------------------
def test_vae_reconstructs_logged_action_sequences_after_a_short_fit(fitted_vae, train_ds):
    from training.diffusion import reconstruction

    vae, data = fitted_vae
    fit = reconstruction(vae, data)
    assert fit["ade"] < 0.8, fit  # mean position error over the known steps of 5.2 s sequences (m)
    untrained = reconstruction(ActionVAE(vae.cfg), data)
    assert untrained["ade"] > 3 * fit["ade"]


# ---- schedule, DDIM, mixture --------------------------------------------------------------------------------
def test_cosine_schedule_and_ddim_steps_by_hand():
    a = cosine_alpha_bar(200)
    s = 0.008
    f = [math.cos((t / 200 + s) / (1 + s) * math.pi / 2) ** 2 for t in (0, 1, 100)]
    assert a[0].item() == 1.0
    assert a[1].item() == pytest.approx(f[1] / f[0], rel=1e-12)
    assert a[100].item() == pytest.approx(f[2] / f[0], rel=1e-12)
    assert 0 < a[200].item() < 1e-4 and bool((a[1:] < a[:-1]).all())
    assert ddim_timesteps(200, 20) == list(range(200, -1, -10))
    assert ddim_timesteps(200, 1) == [200, 0]
    # one DDIM step, by hand: t = 100 -> s = 50, eta = 0.5
    z, x0 = torch.tensor([0.3]), torch.tensor([1.2])
    at, as_ = a[100].item(), a[50].item()
    eps = (0.3 - math.sqrt(at) * 1.2) / math.sqrt(1 - at)
    sigma = 0.5 * math.sqrt((1 - as_) / (1 - at)) * math.sqrt(1 - at / as_)
    mean, sig = ddim_mean(z, x0, a, 100, 50, 0.5)
    assert sig == pytest.approx(sigma)
    assert mean.item() == pytest.approx(math.sqrt(as_) * 1.2 + math.sqrt(1 - as_ - sigma ** 2) * eps, rel=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_with_a_perfect_denoiser_recovers_x0(eta):
    a = cosine_alpha_bar(200)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 13, 8, generator=g, dtype=torch.float64)
    z = torch.randn(4, 13, 8, generator=g, dtype=torch.float64)  # x_T
    ts = ddim_timesteps(200, 20)
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        mean, sigma = ddim_mean(z, x0, a.double(), t, s, eta)
        z = mean + sigma * torch.randn(z.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(z, x0, atol=1e-10, rtol=0)
    # and noising then one DDIM step to 0 with the true x0 is exact too
    zt = add_noise(x0, torch.full((4,), 120), a.double(), torch.randn(x0.shape, dtype=torch.float64))
    torch.testing.assert_close(ddim_mean(zt, x0, a.double(), 120, 0, eta)[0], x0, atol=1e-10, rtol=0)


def test_mixture_nll_equals_a_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # weights 1/4, 3/4
    mean = torch.tensor([[[[0.0]]], [[[1.0]]]]).view(1, 2, 1, 1)
    log_std = torch.tensor([0.0, math.log(2.0)]).view(1, 2, 1, 1)
    z0 = torch.tensor([[[0.5]]])

    def normal(x, m, s):
        return math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    want = -math.log(0.25 * normal(0.5, 0.0, 1.0) + 0.75 * normal(0.5, 1.0, 2.0))
    assert mixture_nll(logits, mean, log_std, z0).item() == pytest.approx(want, rel=1e-6)


def test_sampling_is_deterministic_given_the_seed_and_differs_across_seeds(fitted_vae):
    torch.manual_seed(0)
    model = LatentDiffusionModel(DiffusionConfig(**MICRO), fitted_vae[0]).eval()
    ctx = torch.randn(6, MICRO["hidden"])
    one = model.sample(ctx, torch.Generator().manual_seed(3))
    assert torch.equal(one, model.sample(ctx, torch.Generator().manual_seed(3)))
    assert not torch.allclose(one, model.sample(ctx, torch.Generator().manual_seed(4)))
    # eta 0 and a temperature near 0: the chain is (nearly) deterministic but for x_T
    a = model.sample(ctx, torch.Generator().manual_seed(3), eta=0.0, temperature=1e-4)
    assert a.shape == (6, 13, 8)


# ---- the agent in closed loop ---------------------------------------------------------------------------------
def _val():
    from envs.data import open_dataset

    return open_dataset("towns", "val")


def test_the_agent_drives_every_vehicle_and_is_reproducible(fitted_vae):
    from envs.metrics.episode import compute_episode_metrics
    from training.rollouts import simulate_scene

    torch.manual_seed(0)
    agent = LatentDiffusionAgent(LatentDiffusionModel(DiffusionConfig(**MICRO), fitted_vae[0]), ddim_steps=4)
    ds = _val()
    r1 = simulate_scene(agent, ds, 0, 2, seed=5)
    r2 = simulate_scene(agent, ds, 0, 2, seed=5)
    r3 = simulate_scene(agent, ds, 0, 2, seed=6)
    np.testing.assert_array_equal(r1.sim, r2.sim)
    assert not np.allclose(r1.sim, r3.sim)
    assert not np.allclose(r1.sim[0], r1.sim[1])  # two rollouts of one batch: two samples
    m = compute_episode_metrics(r1, ["min_ade"])
    assert np.isfinite(m["min_ade"])


def _diffusion_fit(vae, ds, steps: int, seed: int = 0):
    from training.diffusion import diffusion_items, latent_scale

    torch.manual_seed(seed)
    cfg = DiffusionConfig(**MICRO, latent_scale=latent_scale(vae, dataset_actions(ds, 52, scenes=12)))
    model = LatentDiffusionModel(cfg, vae)
    items = diffusion_items(ds, 12, 52)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 2e-3)
    rng = np.random.default_rng(seed)
    batches = [diffusion_batch([(ds[i], t) for i, t in (items[k] for k in rng.choice(len(items), 4))], cfg, 52)
               for _ in range(8)]
    losses = []
    for step in range(steps):
        loss, n, _ = model.loss(batches[step % len(batches)])
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        losses.append(loss.item() / n)
    return model, losses, batches


def test_a_few_diffusion_steps_lower_the_denoising_loss(fitted_vae, train_ds):
    model, losses, batches = _diffusion_fit(fitted_vae[0], train_ds, 40)
    torch.manual_seed(1)
    before = LatentDiffusionModel(model.cfg, fitted_vae[0])
    with torch.no_grad():
        torch.manual_seed(2)
        trained = sum(model.loss(b)[0].item() for b in batches)
        torch.manual_seed(2)
        untrained = sum(before.loss(b)[0].item() for b in batches)
    assert trained < 0.8 * untrained


@pytest.mark.slow
def test_diffusion_learning_lowers_the_closed_loop_ade(fitted_vae, train_ds):
    from envs.metrics.episode import compute_episode_metrics
    from training.rollouts import simulate_scene

    model, _, _ = _diffusion_fit(fitted_vae[0], train_ds, 300)
    torch.manual_seed(1)
    untrained = LatentDiffusionModel(model.cfg, fitted_vae[0])

    def ade(m):
        agent = LatentDiffusionAgent(m.eval(), ddim_steps=10)
        return np.mean([compute_episode_metrics(simulate_scene(agent, train_ds, i, 2, seed=i), ["min_ade"])["ade"]
                        for i in range(4)])

    # measured 10.71 m against 11.26 m (600 steps: 10.67 m): the fit helps in closed loop, but weakly (the diffusion
    # model's use of its context is the open problem of this policy; README); the margin catches a fit that does
    # not help at all
    assert ade(model) < 0.97 * ade(untrained)


# ---- checkpoints and bad input --------------------------------------------------------------------------------
def test_checkpoints_round_trip_and_refuse_the_wrong_kind(tmp_path, fitted_vae):
    from agents.checkpoint import save_checkpoint
    from agents.registry import make_agent
    from training.diffusion import save_diffusion, save_vae

    vae = fitted_vae[0]
    name, cfg = save_vae(vae)
    save_checkpoint(tmp_path / "vae.safetensors", name, cfg, vae.state_dict())
    back = load_vae(tmp_path / "vae.safetensors")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in vae.state_dict().items())
    model = LatentDiffusionModel(DiffusionConfig(**MICRO), vae)
    name, cfg = save_diffusion(model)
    save_checkpoint(tmp_path / "ldm.safetensors", name, cfg, model.state_dict())
    agent = make_agent("latent_diffusion", checkpoint=tmp_path / "ldm.safetensors", ddim_steps=5)
    assert all(torch.equal(v, agent.model.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="is an action VAE .* but a latent diffusion model .* is expected"):
        load_diffusion(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="is a latent diffusion model .* but an action VAE .* is expected"):
        load_vae(tmp_path / "ldm.safetensors")
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        load_diffusion(tmp_path / "missing.safetensors")
    # a diffusion model trained on another VAE is refused
    other = ActionVAE(vae.cfg)
    with pytest.raises(CheckpointError, match="trained on the latents of another VAE"):
        LatentDiffusionModel(model.cfg, other)
    tensors = dict(model.state_dict())
    tensors.update({f"vae.{k}": v for k, v in other.state_dict().items()})
    save_checkpoint(tmp_path / "mixed.safetensors", "latent_diffusion", model.config_json(), tensors)
    with pytest.raises(CheckpointError, match="another VAE"):
        load_diffusion(tmp_path / "mixed.safetensors")


def test_bad_sampling_options_are_typed_errors(fitted_vae):
    model = LatentDiffusionModel(DiffusionConfig(**MICRO), fitted_vae[0])
    for steps in (0, 201, 2.5):
        with pytest.raises(InvalidOptionError, match=r"DDIM steps must be an integer in \[1, 200\]"):
            LatentDiffusionAgent(model, ddim_steps=steps)
    for eta in (-0.1, 1.5, "a"):
        with pytest.raises(InvalidOptionError, match=r"eta must be a number in \[0, 1\]"):
            LatentDiffusionAgent(model, eta=eta)
    with pytest.raises(InvalidOptionError, match="temperature must be > 0"):
        LatentDiffusionAgent(model, temperature=0)
    with pytest.raises(InvalidOptionError, match="replan_every"):
        LatentDiffusionAgent(model, replan_every=0)
    with pytest.raises(CheckpointError, match="needs trained weights"):
        LatentDiffusionAgent()
    with pytest.raises(InvalidOptionError, match="must be divisible by heads"):
        DiffusionConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="multiple of stride"):
        VaeConfig(horizon=50)
    with pytest.raises(InvalidOptionError, match="latent 13 x 4 does not match"):
        LatentDiffusionModel(DiffusionConfig(**MICRO, latent_dim=4), fitted_vae[0])


def test_training_functions_name_bad_input(tmp_path, fitted_vae, train_ds):
    from training.diffusion import train_diffusion, train_vae

    with pytest.raises(UnknownNameError, match="latent diffusion size 'huge'"):
        train_diffusion(train_ds, fitted_vae[0], tmp_path, 1, size="huge")
    with pytest.raises(UnknownNameError, match="latent diffusion model option 'layers'"):
        train_diffusion(train_ds, fitted_vae[0], tmp_path, 1, layers=3)
    with pytest.raises(CheckpointError, match="no .*last.safetensors to continue from"):
        train_diffusion(train_ds, fitted_vae[0], tmp_path / "none", 1, resume=True)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        train_vae(train_ds, tmp_path, 1, beta=-1)
    assert issubclass(CheckpointError, TrafficGymError)


@pytest.mark.slow
def test_train_commands_run_alone_and_under_torchrun_and_name_bad_input(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def run(launch, *args):
        out = subprocess.run([*launch, "-m", "training.cli", "train", *args], env=env, capture_output=True, text=True)
        return out, (json.loads(out.stdout[out.stdout.index("{"):]) if out.returncode == 0 else None)

    r, vae = run([sys.executable], "vae", "--out", str(tmp_path / "vae"), "--scenes", "6", "--max-steps", "4",
                 "--batch-size", "64", "--val-scenes", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert vae["validation"]["val/ade"] > 0 and (tmp_path / "vae" / "model.safetensors").exists()
    r, two = run(torchrun, "vae", "--out", str(tmp_path / "vae2"), "--scenes", "6", "--max-steps", "2",
                 "--batch-size", "64", "--val-scenes", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert two["processes"] == 2
    weights = str(tmp_path / "vae" / "model.safetensors")
    r, dif = run(torchrun, "diffusion", "--vae", weights, "--out", str(tmp_path / "ldm"), "--scenes", "8",
                 "--max-steps", "2", "--batch-size", "2", "--val-scenes", "0", "--model-arg", "blocks=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert dif["processes"] == 2
    agent = load_diffusion(tmp_path / "ldm" / "model.safetensors")
    assert agent.cfg.blocks == 2
    # resuming the diffusion run with another VAE is refused; so is a VAE where the diffusion model goes
    r, _ = run([sys.executable], "diffusion", "--vae", str(tmp_path / "vae2" / "model.safetensors"), "--out",
               str(tmp_path / "ldm"), "--scenes", "8", "--max-steps", "3", "--batch-size", "2", "--val-scenes", "0",
               "--model-arg", "blocks=2", "--resume")
    assert r.returncode != 0 and "trained on another VAE" in r.stderr
    r, _ = run([sys.executable], "diffusion", "--vae", str(tmp_path / "ldm" / "model.safetensors"), "--out",
               str(tmp_path / "x"), "--scenes", "8", "--max-steps", "1")
    assert r.returncode != 0 and "is a latent diffusion model" in r.stderr
    r, _ = run([sys.executable], "vae", "--out", str(tmp_path / "ldm"), "--scenes", "6", "--max-steps", "5",
               "--resume")
    assert r.returncode != 0 and "is not an action VAE run" in r.stderr


def test_it_drives_the_traffic_of_the_ego_env(fitted_vae):
    import gymnasium as gym

    import envs  # noqa: F401 -- registers the env ids

    torch.manual_seed(0)
    traffic = LatentDiffusionAgent(LatentDiffusionModel(DiffusionConfig(**MICRO), fitted_vae[0]), ddim_steps=2)
    env = gym.make("trafficgym/Ego-v0", traffic=traffic, split="val")
    env.reset(seed=0)
    for _ in range(6):  # across a replanning step
        _, reward, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        assert np.isfinite(reward)
        if terminated or truncated:
            break
    env.close()
