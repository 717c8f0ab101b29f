"""PPO for the MLP ego policy: the observation-policy adapter, the ``ppo_mlp`` agent's weights (SB3's actor in
plain torch), ``trafficgym train ppo --policy mlp`` (checkpoints, resume, validation) and its bad input."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from agents.obs_policy import ObservationPolicyAgent, observers_of
from agents.registry import make_agent
from envs.errors import CheckpointError, InvalidOptionError, UnknownNameError
from envs.observation import ObsConfig

FLAT = ObsConfig(flat=True, normalize=True)


def test_observers_of_lists_each_rows_masked_agents_first():
    mask = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    idx, real = observers_of(mask)
    assert real.tolist() == [[True, True], [False, False], [True, False]]
    assert idx[real].tolist() == [1, 3, 0]


@pytest.mark.parametrize("obs", [FLAT, ObsConfig()], ids=["flat", "dict"])
def test_the_adapter_sees_what_the_env_shows_and_drives_as_the_env_would(tiny_env_kwargs, obs):
    seen = []

    def policy(rows):
        seen.append(rows)
        n = len(rows) if obs.flat else len(rows["self"])
        return np.tile(np.array([0.5, -0.25], np.float32), (n, 1))

    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=3, vectorization_mode="vector_entry_point", obs=obs,
                        **tiny_env_kwargs)
    env_obs, _ = venv.reset(options={"scene_index": [0, 1, 2]})
    agent = ObservationPolicyAgent(policy, obs=obs)
    st = venv.unwrapped.state
    action = agent(st, st.controlled & st.agent_mask)
    rows = seen[-1]
    if obs.flat:
        np.testing.assert_array_equal(rows, env_obs)
    else:
        for key in env_obs:
            np.testing.assert_array_equal(rows[key], env_obs[key])
    ego = action.data[torch.arange(3), st.ego]
    # normalised (0.5, -0.25) -> 0.5 x 6 m/s^2 and 0.25 x -0.3 1/m (the bicycle's bounds)
    torch.testing.assert_close(ego, torch.tensor([[3.0, -0.075]] * 3), rtol=0, atol=1e-6)
    assert action.valid.sum() == 3 and (action.data[~action.valid] == 0).all()


def test_the_adapter_names_a_policy_that_returns_the_wrong_shape(tiny_env_kwargs):
    env = gym.make("trafficgym/Ego-v0", obs=FLAT, **tiny_env_kwargs)
    env.reset(seed=0)
    agent = ObservationPolicyAgent(lambda rows: np.zeros((len(rows), 3)), obs=FLAT)
    st = env.unwrapped.state
    with pytest.raises(ValueError, match=r"shape \(1, 3\).*expected \(1, 2\)"):
        agent(st, st.controlled)
    with pytest.raises(TypeError, match="callable"):
        ObservationPolicyAgent("not a policy")
    with pytest.raises(UnknownNameError, match="action_scale"):
        ObservationPolicyAgent(lambda x: x, action_scale="normalised")


def _sb3_model(tiny_env_kwargs, net_arch=(32, 32)):
    from stable_baselines3 import PPO

    from envs.vector_env import SB3VecEnv

    venv = SB3VecEnv(gym.make_vec("trafficgym/Ego-v0", num_envs=2, vectorization_mode="vector_entry_point",
                                  autoreset_mode="SameStep", obs=FLAT, **tiny_env_kwargs))
    return PPO("MlpPolicy", venv, n_steps=16, batch_size=32, seed=0, device="cpu",
               policy_kwargs={"net_arch": list(net_arch), "log_std_init": -1.5})


def test_ppo_mlp_weights_reproduce_sb3s_policy(tiny_env_kwargs, tmp_path):
    from training.sb3_ppo import PpoMlpConfig, save_run

    model = _sb3_model(tiny_env_kwargs)
    with torch.no_grad():  # move the weights off their initialisation so the check means something
        for p in model.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cfg = PpoMlpConfig(net_arch=(32, 32), num_envs=2, n_steps=16, batch_size=32)
    save_run(model, cfg, tmp_path)
    agent = make_agent("ppo_mlp", checkpoint=tmp_path / "model.safetensors")
    obs = np.random.default_rng(0).normal(size=(5, model.observation_space.shape[0])).astype(np.float32) * 0.3
    expected, _ = model.predict(obs, deterministic=True)
    np.testing.assert_allclose(np.clip(agent.predict(obs), -1, 1), expected, rtol=0, atol=1e-6)
    stochastic = make_agent("ppo_mlp", checkpoint=tmp_path / "model.safetensors", deterministic=False)
    assert not np.allclose(stochastic.predict(obs), agent.predict(obs))
    assert agent.actor.log_std.detach().numpy() == pytest.approx(model.policy.log_std.detach().numpy())


def test_ppo_mlp_weights_carry_vecnormalize_statistics(tiny_env_kwargs, tmp_path):
    from stable_baselines3 import PPO

    from training.sb3_ppo import PpoMlpConfig, make_env, save_run, wrap_env

    cfg = PpoMlpConfig(net_arch=(16,), num_envs=2, n_steps=16, batch_size=32)
    data = {k: tiny_env_kwargs[k] for k in ("dataset", "data_dir", "case_length", "cache_dir")}
    venv = wrap_env(cfg, make_env(cfg, 2, data, "val"))
    model = PPO("MlpPolicy", venv, n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu",
                policy_kwargs={"net_arch": [16]})
    model.learn(64)  # moves the running statistics off (0, 1)
    assert venv.obs_rms.var.max() != 1.0
    save_run(model, cfg, tmp_path, sb3_zip=False)
    agent = make_agent("ppo_mlp", checkpoint=tmp_path / "model.safetensors")
    assert agent.actor.standardize
    venv.training = False
    obs = np.random.default_rng(1).normal(size=(4, model.observation_space.shape[0])).astype(np.float32)
    expected, _ = model.predict(venv.normalize_obs(obs), deterministic=True)
    np.testing.assert_allclose(np.clip(agent.predict(obs), -1, 1), expected, rtol=0, atol=1e-5)


def test_ppo_mlp_bad_input(tiny_env_kwargs, tmp_path):
    from training.sb3_ppo import PpoMlpConfig, check_finite, check_observation_dim, save_run

    with pytest.raises(CheckpointError, match="needs trained weights"):
        make_agent("ppo_mlp")
    with pytest.raises(CheckpointError, match="Did you mean 'towns-ppo-mlp'"):
        make_agent("ppo_mlp", checkpoint="towns-ppo-mpl")
    with pytest.raises(CheckpointError, match="'smart' checkpoint, not 'ppo_mlp'"):
        from agents.smart.model import PRETRAINED

        make_agent("ppo_mlp", checkpoint=PRETRAINED["towns-nano"])
    model = _sb3_model(tiny_env_kwargs)
    save_run(model, PpoMlpConfig(net_arch=(32, 32), num_envs=2, n_steps=16, batch_size=32), tmp_path)
    agent = make_agent("ppo_mlp", checkpoint=tmp_path / "model.safetensors")
    with pytest.raises(InvalidOptionError, match="reads .* features"):
        agent.predict(np.zeros((2, 7), np.float32))
    other = gym.make("trafficgym/Ego-v0", obs=ObsConfig(flat=True, normalize=True, num_agents=4), **tiny_env_kwargs)
    with pytest.raises(InvalidOptionError, match="trained with"):
        agent.check_observation_space(other.observation_space)
    with pytest.raises(InvalidOptionError, match="observation settings the policy was trained with"):
        check_observation_dim(agent.actor.obs_dim, other.observation_space, "run/last.safetensors")
    with pytest.raises(InvalidOptionError, match="flat"):
        PpoMlpConfig(obs=ObsConfig())
    with pytest.raises(UnknownNameError, match="traffic"):
        PpoMlpConfig(traffic="imd")
    with pytest.raises(ValueError, match="must divide"):
        PpoMlpConfig(num_envs=3, n_steps=10, batch_size=7)

    from training.sb3_ppo import TrainingDivergedError

    check_finite(model, 16, None)  # finite: passes
    with torch.no_grad():
        model.policy.action_net.weight[0, 0] = math.nan
    with pytest.raises(TrainingDivergedError, match=r"step 48: weights .*action_net.* checkpoint is run/last"):
        check_finite(model, 48, "run/last.safetensors")


def test_train_ppo_cli_trains_resumes_and_drives(tiny_env_kwargs, tmp_path, capsys):
    from training.cli import main

    data = ["--dataset", "interaction_multi", "--data-dir", tiny_env_kwargs["data_dir"], "--case-length", "91",
            "--cache-dir", tiny_env_kwargs["cache_dir"], "--split", "val"]
    run = tmp_path / "run"
    common = ["train", "ppo", "--out", str(run), *data, "--num-envs", "2", "--n-steps", "32", "--batch-size", "32",
              "--epochs", "1", "--net-arch", "16", "--eval-every", "64", "--eval-scenes", "2", "--quiet"]
    assert main([*common, "--steps", "128"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 128
    rows = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [64, 128]  # after the first update (64 steps), and the final weights
    assert {"return", "collision", "offroad", "progress", "length"} <= set(rows[-1])
    assert (run / "sb3_model.zip").exists() and (run / "tb").is_dir()
    before = make_agent("ppo_mlp", checkpoint=run / "model.safetensors").actor.action_net.weight.clone()

    assert main([*common, "--steps", "192", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 192
    after = make_agent("ppo_mlp", checkpoint=run / "model.safetensors")
    assert not torch.equal(before, after.actor.action_net.weight)

    assert main(["eval", "--setting", "ego", "--agent", "ppo_mlp", "--checkpoint", str(run / "model.safetensors"),
                 *data, "--rollouts", "1", "--metric", "planning"]) == 0
    assert "ppo_mlp" in capsys.readouterr().out

    assert main([*common, "--steps", "256", "--resume", "--net-arch", "8"]) == 2
    assert "does not match the model" in capsys.readouterr().err
    assert main([*common, "--steps", "256", "--resume", "--lr", "1e-3"]) == 2
    assert "other settings than the run's (['lr'])" in capsys.readouterr().err
    assert main(["train", "ppo", "--policy", "mpl", "--out", str(tmp_path / "x"), *data]) == 2
    assert "Did you mean 'mlp'" in capsys.readouterr().err
    assert main(["train", "ppo", "--out", str(tmp_path / "y"), "--resume", *data]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_train_ppo_without_tensorboard_names_the_install_line(tiny_env_kwargs, tmp_path, monkeypatch):
    import builtins

    from training.sb3_ppo import PpoMlpConfig, train_ppo_mlp

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    data = {k: tiny_env_kwargs[k] for k in ("dataset", "data_dir", "case_length", "cache_dir")}
    from envs.errors import TrafficGymError

    with pytest.raises(TrafficGymError, match=r'pip install "protobuf>=6.31.1,<8" "tensorboard>=2.20,<3"'):
        train_ppo_mlp(tmp_path / "run", PpoMlpConfig(num_envs=2, n_steps=16, batch_size=32), data=data,
                      progress=False, split="val")
