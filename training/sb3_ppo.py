"""PPO for an MLP ego policy, by stable-baselines3 on the native vector env: ``trafficgym train ppo --policy mlp``.

SB3's ``PPO("MlpPolicy")`` trains on ``trafficgym/Ego-v0`` with flat, normalised observations (``ObsConfig(flat=
True, normalize=True)``), ``num_envs`` scenes stepped in one batched state (``SB3VecEnv``: no subprocesses), the
env's default reward and terminations, and log or reactive traffic. Every ``eval_every`` env steps the
deterministic policy drives ``eval_scenes`` val scenes (spread over the split) once each; return, collision,
off-road, progress and episode length go to TensorBoard (``DIR/tb``), ``DIR/val.jsonl`` and the console, and the
run is saved:

- ``DIR/model.safetensors``: the ``ppo_mlp`` agent's weights and config (loads without SB3, no pickle);
- ``DIR/last.safetensors``: the whole SB3 policy (actor and critic) with the optimizer state and the step count,
  which ``--resume`` continues from (same format, no pickle);
- ``DIR/sb3_model.zip``: SB3's own file, for SB3 users (``PPO.load``); trafficgym never reads it.

Training stops with ``TrainingDivergedError`` (naming the step and the last good checkpoint) as soon as the loss
or a weight stops being finite.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from envs.errors import CheckpointError, InvalidOptionError, TrafficGymError
from envs.observation import ObsConfig

WEIGHTS, CHECKPOINT, SB3_ZIP, VAL_LOG = "model.safetensors", "last.safetensors", "sb3_model.zip", "val.jsonl"
TRAFFIC = ("log", "idm", "smart")
RESUMABLE_CHANGES = {"total_steps", "eval_every", "eval_scenes"}  # what --resume may change


class TrainingDivergedError(TrafficGymError, RuntimeError):
    """The loss or the weights became NaN or infinite during training."""


@dataclass(frozen=True)
class PpoMlpConfig:
    """PPO hyperparameters (SB3 names) and the run's env settings. Defaults chosen on towns train / val."""

    total_steps: int = 1_000_000
    num_envs: int = 16
    n_steps: int = 256  # per env and rollout: 4,096 env steps per update at 16 envs
    batch_size: int = 512
    n_epochs: int = 5
    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    net_arch: tuple[int, ...] = (256, 256)
    log_std_init: float = -2.0
    normalize_obs: bool = True  # SB3's VecNormalize (running mean / std of each feature, clipped to ±10)
    collision_penalty: float = -5.0  # the training reward's collision and off-road weights (the env's: -5)
    offroad_penalty: float = -5.0
    log_divergence_penalty: float = 0.0  # training reward per metre from the logged ego position, per step
    terminate: bool = True  # training episodes end at a collision / leaving the road (evaluation's always do)
    traffic: str = "log"
    obs: ObsConfig = field(default_factory=lambda: ObsConfig(flat=True, normalize=True))
    eval_every: int = 100_000
    eval_scenes: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.traffic not in TRAFFIC:
            from envs.errors import UnknownNameError

            raise UnknownNameError("traffic", self.traffic, TRAFFIC)
        if not self.obs.flat:
            raise InvalidOptionError("The MLP policy reads flat observations: ObsConfig(flat=True).")
        for name in ("total_steps", "num_envs", "n_steps", "batch_size", "n_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"PpoMlpConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if (self.num_envs * self.n_steps) % self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} must divide num_envs x n_steps = "
                             f"{self.num_envs * self.n_steps} (one rollout).")

    def to_json(self) -> dict:
        out = asdict(self)
        out["net_arch"] = list(self.net_arch)
        return out

    @classmethod
    def from_json(cls, data: dict) -> PpoMlpConfig:
        data = dict(data)
        data["obs"] = ObsConfig(**data["obs"])
        data["net_arch"] = tuple(data["net_arch"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _traffic(name: str):
    if name == "smart":
        from agents.registry import make_agent

        return make_agent("smart", checkpoint="towns-nano")
    return name


def make_env(cfg: PpoMlpConfig, num_envs: int, data: dict, split: str, same_step: bool = True):
    """The training env: the ego env with the run's observation settings and training reward."""
    import gymnasium as gym

    import envs  # noqa: F401
    from envs.rewards import RewardConfig

    reward = RewardConfig(collision=cfg.collision_penalty, offroad=cfg.offroad_penalty,
                          log_divergence=cfg.log_divergence_penalty)
    return gym.make_vec("trafficgym/Ego-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                        autoreset_mode="SameStep" if same_step else "NextStep", split=split,
                        traffic=_traffic(cfg.traffic), obs=cfg.obs, reward=reward,
                        terminate_on_collision=cfg.terminate, terminate_on_offroad=cfg.terminate, **data)


def wrap_env(cfg: PpoMlpConfig, venv):
    """``SB3VecEnv`` of the vector env, behind ``VecNormalize`` (observations only) if the run normalises."""
    from envs.vector_env import SB3VecEnv

    sb3 = SB3VecEnv(venv)
    if not cfg.normalize_obs:
        return sb3
    from stable_baselines3.common.vec_env import VecNormalize

    return VecNormalize(sb3, norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=cfg.gamma)


def build_model(cfg: PpoMlpConfig, venv, out: Path):
    from stable_baselines3 import PPO

    from training.trainer import require_tensorboard

    require_tensorboard()  # SB3 would fail only at learn(), with an error that names no fix

    return PPO("MlpPolicy", venv, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
               learning_rate=cfg.lr, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
               ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
               policy_kwargs={"net_arch": list(cfg.net_arch), "log_std_init": cfg.log_std_init},
               tensorboard_log=str(out / "tb"), verbose=0, device="cpu")


# ---- checkpoints -------------------------------------------------------------------------------------------------

def save_run(model, cfg: PpoMlpConfig, out: Path, sb3_zip: bool = True) -> Path:
    """``model.safetensors`` (the agent), ``last.safetensors`` (resumable), ``sb3_model.zip`` (SB3's own)."""
    from agents.checkpoint import save_checkpoint
    from agents.ppo_mlp import MlpActor, actor_tensors, checkpoint_config

    policy = model.policy
    obs_dim, action_dim = int(policy.observation_space.shape[0]), int(policy.action_space.shape[0])
    rms = _obs_rms(model)
    actor = MlpActor(obs_dim, action_dim, cfg.net_arch, standardize=rms is not None)
    agent_cfg = checkpoint_config(actor, cfg.obs)
    save_checkpoint(out / WEIGHTS, "ppo_mlp", agent_cfg, actor_tensors(policy.state_dict(), rms),
                    extra={"num_timesteps": int(model.num_timesteps), "ppo": cfg.to_json()})
    tensors = dict(policy.state_dict())
    if rms is not None:
        tensors.update({"obs_rms.mean": torch.as_tensor(rms.mean), "obs_rms.var": torch.as_tensor(rms.var),
                        "obs_rms.count": torch.as_tensor(float(rms.count), dtype=torch.float64)})
    opt = policy.optimizer.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v)
    path = save_checkpoint(out / CHECKPOINT, "ppo_mlp", agent_cfg, tensors,
                           extra={"num_timesteps": int(model.num_timesteps), "ppo": cfg.to_json(),
                                  "param_groups": opt["param_groups"], "kind": "ppo_mlp_training_state"})
    if sb3_zip:
        model.save(out / SB3_ZIP)
    return path


def load_run(model, out: Path) -> tuple[int, PpoMlpConfig]:
    """Load ``out/last.safetensors`` into ``model`` (policy + optimizer); returns the saved step count and the
    run's config. ``InvalidOptionError`` if the saved policy reads another observation space than ``model``'s
    env."""
    from agents.checkpoint import load_checkpoint, load_state_dict_strict

    path = out / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path} (train without --resume first).")
    cfg, tensors, extra = load_checkpoint(path, expected_agent="ppo_mlp")
    if extra.get("kind") != "ppo_mlp_training_state":
        raise CheckpointError(f"{path} holds ppo_mlp weights without a training state; resume from a run folder "
                              "made by `trafficgym train ppo --policy mlp`.")
    check_observation_dim(int(cfg["obs_dim"]), model.observation_space, path)
    rms = _obs_rms(model)
    if (rms is None) != ("obs_rms.mean" not in tensors):
        raise InvalidOptionError(f"{path} was trained {'without' if rms is not None else 'with'} observation "
                                 "normalisation; resume with the run's own settings.")
    if rms is not None:
        rms.mean, rms.var = tensors["obs_rms.mean"].double().numpy(), tensors["obs_rms.var"].double().numpy()
        rms.count = float(tensors["obs_rms.count"])
    load_state_dict_strict(model.policy, {k: v for k, v in tensors.items()
                                          if not k.startswith(("optim.", "obs_rms."))}, path)
    state: dict = {"state": {}, "param_groups": extra["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state["state"].setdefault(int(i), {})[k] = value
    model.policy.optimizer.load_state_dict(state)
    model.num_timesteps = int(extra["num_timesteps"])
    return model.num_timesteps, PpoMlpConfig.from_json(extra["ppo"])


def _obs_rms(model):
    """The ``RunningMeanStd`` of the ``VecNormalize`` around the model's env, or None."""
    from stable_baselines3.common.vec_env import VecNormalize

    env = model.get_env()
    return env.obs_rms if isinstance(env, VecNormalize) else None


def check_observation_dim(saved: int, space, path) -> None:
    """``InvalidOptionError`` unless ``space`` is a flat Box of ``saved`` features."""
    shape = getattr(space, "shape", None)
    if shape is None or tuple(shape) != (saved,):
        raise InvalidOptionError(f"{path} holds an MLP policy of {saved} observation features, but the env's "
                                 f"observation space is {space}: make the env with the observation settings the "
                                 "policy was trained with (the run's ObsConfig, the same dataset).")


def check_finite(model, step: int, last_good: Path | None) -> None:
    """``TrainingDivergedError`` if SB3's last logged loss or any policy weight is NaN or infinite."""
    logger = getattr(model, "_logger", None)  # set up by learn()
    loss = None if logger is None else logger.name_to_value.get("train/loss")
    bad_loss = loss is not None and not math.isfinite(float(loss))
    bad_weights = [n for n, p in model.policy.named_parameters() if not torch.isfinite(p).all()]
    if bad_loss or bad_weights:
        what = f"loss {loss}" if bad_loss else f"weights {bad_weights[:3]}"
        raise TrainingDivergedError(
            f"PPO diverged at step {step}: {what} not finite. The last good checkpoint is "
            f"{last_good if last_good else '(none saved yet)'}; resume from it with a lower --lr "
            f"(or a smaller --max-grad-norm).")


# ---- the run ---------------------------------------------------------------------------------------------------

def train_ppo_mlp(out: str | Path, cfg: PpoMlpConfig, data: dict | None = None, resume: bool = False,
                  progress: bool = True, split: str = "train", val_split: str = "val") -> list[dict]:
    """Train (or continue) a PPO MLP ego policy; returns the validation history (one dict per evaluation)."""
    from stable_baselines3.common.callbacks import BaseCallback

    from training.ego_episodes import ego_episodes, summarize

    data = data or {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    venv = wrap_env(cfg, make_env(cfg, cfg.num_envs, data, split))
    model = build_model(cfg, venv, out)
    done_steps = 0
    if resume:
        done_steps, saved = load_run(model, out)
        changed = sorted(k for k, v in cfg.to_json().items()
                         if saved.to_json().get(k) != v and k not in RESUMABLE_CHANGES)
        if changed:
            raise InvalidOptionError(f"--resume with other settings than the run's ({changed}); resume with the "
                                     "same options, or train into a new --out folder.")
    history: list[dict] = []
    start = time.time()

    def validate(step: int) -> dict:
        normalize = getattr(model.get_env(), "normalize_obs", None)  # VecNormalize's (statistics unchanged)

        def act(obs):  # the policy as the saved agent runs it: the env's own reward, normalised inputs
            return model.predict(obs if normalize is None else normalize(obs), deterministic=True)[0]

        stats = summarize(ego_episodes(act, scenes=cfg.eval_scenes, seed=cfg.seed, split=val_split,
                                       traffic=_traffic(cfg.traffic), obs=cfg.obs, **data))
        row = {"step": step, "wall_s": round(time.time() - start, 1), **{k: round(v, 4) for k, v in stats.items()}}
        history.append(row)
        with open(out / VAL_LOG, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    class Periodic(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next_eval = (done_steps // cfg.eval_every + 1) * cfg.eval_every
            self.last_good: Path | None = out / CHECKPOINT if resume else None

        def _on_rollout_start(self) -> None:  # after each update (train() logged its loss), before collecting
            check_finite(self.model, self.num_timesteps, self.last_good)
            if self.num_timesteps >= self.next_eval:  # evaluate the weights just updated, not mid-rollout
                self.next_eval = (self.num_timesteps // cfg.eval_every + 1) * cfg.eval_every
                row = validate(self.num_timesteps)
                for k in ("return", "collision", "offroad", "progress", "length"):
                    self.logger.record(f"val/{k}", row[k])
                self.last_good = save_run(self.model, cfg, out, sb3_zip=False)
                if progress:
                    print(json.dumps(row), flush=True)

        def _on_step(self) -> bool:
            return True

    remaining = max(cfg.total_steps - done_steps, 0)
    if remaining:
        model.learn(remaining, callback=Periodic(), reset_num_timesteps=not resume, progress_bar=progress,
                    tb_log_name="ppo")
    check_finite(model, model.num_timesteps, out / CHECKPOINT if (out / CHECKPOINT).exists() else None)
    row = validate(model.num_timesteps)  # the final weights (learn() ends with an update no rollout has seen)
    if progress:
        print(json.dumps(row), flush=True)
    save_run(model, cfg, out)
    venv.close()
    return history
