"""``ppo_mlp``: an MLP ego policy trained by PPO in ``trafficgym/Ego-v0`` (``trafficgym train ppo --policy mlp``).

The network is stable-baselines3's ``MlpPolicy`` actor, rebuilt here in plain torch so the weights load from
safetensors without stable-baselines3 and without unpickling: the flat, normalised ego observation (``ObsConfig
(flat=True, normalize=True)``) through ``net_arch`` hidden layers (tanh) to the mean of a diagonal Gaussian over
the normalised bicycle action (acceleration, curvature), with a learned state-independent ``log_std``. Driving
takes the mean (``deterministic=True``, default) or samples. It acts through ``ObservationPolicyAgent``, so it
drives wherever an agent can: ``trafficgym eval --setting ego --agent ppo_mlp --checkpoint towns-ppo-mlp``,
``trafficgym render``, ``AgentPolicy`` in an env, or as traffic.

Checkpoint config (JSON in the safetensors metadata): ``obs_dim``, ``action_dim``, ``net_arch``, ``obs`` (the
``ObsConfig`` fields), ``dynamics``, ``action_scale``. Tensor names are SB3's (``mlp_extractor.policy_net.*``,
``action_net.*``, ``log_std``).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agents.obs_policy import ObservationPolicyAgent
from agents.registry import register_agent
from envs.errors import CheckpointError, InvalidOptionError
from envs.observation import ObsConfig

OBS_EPS = 1e-8  # VecNormalize's epsilon
PRETRAINED = {"towns-ppo-mlp": Path(__file__).parent / "weights" / "ppo_mlp_towns.safetensors"}


class MlpActor(nn.Module):
    """SB3 ``MlpPolicy``'s actor: ``(N, obs_dim)`` -> action means ``(N, action_dim)``; ``log_std (action_dim,)``.

    ``standardize``: the policy was trained behind SB3's ``VecNormalize``; observations are standardised with its
    running statistics (buffers ``obs_mean`` / ``obs_var``) and clipped to ``±obs_clip`` first, as it does.
    """

    def __init__(self, obs_dim: int, action_dim: int, net_arch: tuple[int, ...] = (256, 256),
                 standardize: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in net_arch:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        self.mlp_extractor = nn.Module()
        self.mlp_extractor.policy_net = nn.Sequential(*layers)
        self.action_net = nn.Linear(width, action_dim)
        self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_var", torch.ones(obs_dim))
        self.obs_dim, self.action_dim, self.net_arch = obs_dim, action_dim, tuple(net_arch)
        self.obs_clip, self.standardize = 10.0, bool(standardize)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.standardize:  # as VecNormalize.normalize_obs
            obs = ((obs - self.obs_mean) / torch.sqrt(self.obs_var + OBS_EPS)).clamp(-self.obs_clip, self.obs_clip)
        return self.action_net(self.mlp_extractor.policy_net(obs))

    def upgrade_state_dict(self, tensors: dict) -> dict:
        """Checkpoints without normalisation statistics load as unnormalised."""
        tensors = dict(tensors)
        tensors.setdefault("obs_mean", torch.zeros(self.obs_dim))
        tensors.setdefault("obs_var", torch.ones(self.obs_dim))
        return tensors


def actor_tensors(state_dict: dict[str, torch.Tensor], obs_rms=None) -> dict[str, torch.Tensor]:
    """The ``MlpActor`` tensors of an SB3 ``ActorCriticPolicy`` state dict (the critic is left out), with the
    observation statistics of a ``VecNormalize`` (``obs_rms``: its ``RunningMeanStd``) if it was trained behind one."""
    keep = ("mlp_extractor.policy_net.", "action_net.", "log_std")
    out = {k: v for k, v in state_dict.items() if k.startswith(keep)}
    if obs_rms is not None:
        out["obs_mean"] = torch.as_tensor(obs_rms.mean, dtype=torch.float32)
        out["obs_var"] = torch.as_tensor(obs_rms.var, dtype=torch.float32)
    return out


def checkpoint_config(actor: MlpActor, obs: ObsConfig, dynamics: str = "bicycle",
                      action_scale: str = "normalized") -> dict:
    return {"obs_dim": actor.obs_dim, "action_dim": actor.action_dim, "net_arch": list(actor.net_arch),
            "standardize": actor.standardize,
            "obs": asdict(obs), "dynamics": dynamics, "action_scale": action_scale}


@register_agent("ppo_mlp")
class PpoMlpAgent(ObservationPolicyAgent):
    """The PPO-trained MLP ego policy (see the module docstring). ``make_agent("ppo_mlp", checkpoint=
    "towns-ppo-mlp" | DIR/model.safetensors, deterministic=True)``."""

    has_weights = True

    def __init__(self, actor: MlpActor | None = None, obs: ObsConfig | None = None, dynamics: str = "bicycle",
                 action_scale: str = "normalized", deterministic: bool = True):
        if actor is None:
            raise CheckpointError("The ppo_mlp agent needs trained weights: make_agent('ppo_mlp', checkpoint=PATH) "
                                  "(train one with `trafficgym train ppo --policy mlp`), or one of the bundled "
                                  f"{sorted(PRETRAINED)}.")
        super().__init__(self._act, obs or ObsConfig(flat=True, normalize=True), dynamics, action_scale)
        if not self.obs.flat:
            raise InvalidOptionError("ppo_mlp reads flat observations: its ObsConfig must have flat=True.")
        self.actor, self.deterministic = actor.eval(), bool(deterministic)

    @classmethod
    def from_checkpoint(cls, path, **config) -> PpoMlpAgent:
        from agents.checkpoint import load_checkpoint, load_state_dict_strict

        path = PRETRAINED.get(str(path), path)
        if not Path(path).exists():
            import difflib

            near = difflib.get_close_matches(str(path), PRETRAINED, n=1)
            raise CheckpointError(f"No checkpoint file {path} and no bundled ppo_mlp weights of that name (bundled: "
                                  f"{sorted(PRETRAINED)})" + (f". Did you mean {near[0]!r}?" if near else "."))
        cfg, tensors, _ = load_checkpoint(path, expected_agent=cls.name)
        try:
            known = {f.name for f in fields(ObsConfig)}
            obs = ObsConfig(**{k: v for k, v in cfg["obs"].items() if k in known})
            actor = MlpActor(int(cfg["obs_dim"]), int(cfg["action_dim"]), tuple(cfg["net_arch"]),
                             bool(cfg.get("standardize", False)))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a ppo_mlp configuration ({e}).") from e
        load_state_dict_strict(actor, tensors, path)
        return cls(actor, obs=obs, dynamics=cfg.get("dynamics", "bicycle"),
                   action_scale=cfg.get("action_scale", "normalized"), **config)

    @staticmethod
    def bundled_weights() -> dict:
        return PRETRAINED

    def check_observation_space(self, space) -> None:
        """Raise ``InvalidOptionError`` unless ``space`` (an env's observation space) is what the policy reads."""
        shape = getattr(space, "shape", None)
        if shape is None or tuple(shape[-1:]) != (self.actor.obs_dim,):
            raise InvalidOptionError(
                f"This ppo_mlp policy reads flat observations of {self.actor.obs_dim} features, but the env's "
                f"observation space is {space}. Make the env with the ObsConfig it was trained with: "
                f"obs={asdict(self.obs)} (and the same dataset's map chunk size).")

    @torch.no_grad()
    def predict(self, obs: np.ndarray) -> np.ndarray:
        """Env actions ``(N, action_dim)`` (or ``(action_dim,)``) for flat observations of the env it was trained
        in — to drive a ``gym.make`` env directly; ``InvalidOptionError`` if the observation size differs."""
        obs = np.asarray(obs, np.float32)
        if obs.shape[-1:] != (self.actor.obs_dim,):
            raise InvalidOptionError(f"Observation of shape {obs.shape}: this ppo_mlp policy reads "
                                     f"{self.actor.obs_dim} features (obs={asdict(self.obs)}).")
        return self._act(obs)

    def _act(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32)
        with torch.no_grad():
            mean = self.actor(x)
            if not self.deterministic:
                noise = torch.randn(mean.shape, generator=self.generator)
                mean = mean + noise * self.actor.log_std.exp()
        return mean.numpy()
