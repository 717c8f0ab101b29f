"""The latent diffusion policy as an agent (``latent_diffusion``): every 0.5 s it samples, for every agent it
drives, a latent by DDIM conditioned on that agent's context now, decodes it through the action VAE into the next
5.2 s of unicycle actions, and plays the first 0.5 s of them before planning again.

    agent = make_agent("latent_diffusion", checkpoint="runs/ldm/model.safetensors", ddim_steps=20, eta=0.3)

Batched over scenes and agents: one context pass over every agent of every row that replans, one DDIM chain over
all the agents it drives there. Agents it does not drive are the context only (their actual motion). Driven
agents whose next position lies past a map exit (where the lane graph ends at the map border) leave the scene, as
the logged vehicles do there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from agents.base import PlanningAgent
from agents.latent_diffusion.denoiser import DiffusionConfig, history_features
from agents.latent_diffusion.model import LatentDiffusionModel
from agents.latent_diffusion.schedule import check_eta, ddim_timesteps
from agents.latent_diffusion.vae import ActionVAE, VaeConfig
from agents.nn.map_encoder import encode_map_batch
from agents.registry import register_agent
from envs.dynamics import Unicycle, speed_along_heading
from envs.errors import CheckpointError, InvalidOptionError
from envs.map_index import lane_exits, passed_exit
from envs.types import Action

REPLAN_EVERY = 5  # steps (0.5 s at 10 Hz)
WEIGHTS = Path(__file__).parents[1] / "weights"
PRETRAINED = {name: WEIGHTS / file for name, file in (("towns-ldm", "ldm_nano_towns.safetensors"),)
              if (WEIGHTS / file).exists()}
VAE_AGENT = "action_vae"  # the checkpoint name of an action VAE (``trafficgym train vae``): not an agent


def load_vae(path) -> ActionVAE:
    """An ``ActionVAE`` from a ``trafficgym train vae`` checkpoint (``CheckpointError`` for anything else, e.g.
    a diffusion checkpoint)."""
    from agents.checkpoint import load_state_dict_strict

    cfg, tensors = _read(path, VAE_AGENT)
    vae = ActionVAE(VaeConfig(**cfg))
    load_state_dict_strict(vae, {k: v for k, v in tensors.items() if not k.startswith("optim.")}, path)
    return vae


def load_diffusion(path) -> LatentDiffusionModel:
    """A ``LatentDiffusionModel`` (with its VAE) from a ``trafficgym train diffusion`` checkpoint or a bundled
    name (``CheckpointError`` for anything else, e.g. a VAE checkpoint)."""
    from agents.checkpoint import load_state_dict_strict

    path = PRETRAINED.get(str(path), path)
    cfg, tensors = _read(path, LatentDiffusionAgent.name)
    try:
        vae, diffusion = ActionVAE(VaeConfig(**cfg["vae"])), DiffusionConfig(**cfg["diffusion"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a latent diffusion configuration ({e}).") from e
    weights = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    load_state_dict_strict(vae, {k[4:]: v for k, v in weights.items() if k.startswith("vae.")}, path)
    # the VAE's weights must be the ones the diffusion model was trained on (its fingerprint is in the config)
    model = LatentDiffusionModel(diffusion, vae)
    load_state_dict_strict(model, weights, path)
    return model


def _read(path, expected: str) -> tuple[dict, dict]:
    from agents.checkpoint import checkpoint_agent, load_checkpoint

    kinds = {VAE_AGENT: "an action VAE (trafficgym train vae)",
             "latent_diffusion": "a latent diffusion model (trafficgym train diffusion)"}
    if not Path(path).is_file():
        near = f" (bundled: {sorted(PRETRAINED)})" if expected == "latent_diffusion" else ""
        raise CheckpointError(f"No checkpoint file {path}{near}; {kinds[expected]} is expected.")
    agent = checkpoint_agent(path)  # None: load_checkpoint below names what is wrong with the file
    if agent in kinds and agent != expected:
        raise CheckpointError(f"{path} is {kinds[agent]}, but {kinds[expected]} is expected here.")
    cfg, tensors, _ = load_checkpoint(path, expected_agent=expected)
    return cfg, tensors


@register_agent("latent_diffusion")
class LatentDiffusionAgent(PlanningAgent):
    """The latent diffusion policy (see the module docstring). ``ddim_steps`` (20) denoising steps, ``eta`` (0.3)
    DDIM noise in [0, 1], ``temperature`` (1) of the mixture-component draws; ``replan_every`` (5 steps)."""

    dynamics = Unicycle()
    has_weights = True

    def __init__(self, model: LatentDiffusionModel | None = None, ddim_steps: int = 20, eta: float = 0.3,
                 temperature: float = 1.0, replan_every: int = REPLAN_EVERY):
        super().__init__()
        if model is None:
            raise CheckpointError("The latent_diffusion agent needs trained weights: make_agent('latent_diffusion', "
                                  "checkpoint=PATH) (train one with `trafficgym train vae` then `trafficgym train "
                                  "diffusion`)" + (f", or one of the bundled {sorted(PRETRAINED)}." if PRETRAINED
                                                   else "."))
        if not isinstance(model, LatentDiffusionModel):
            raise CheckpointError(f"latent_diffusion needs a LatentDiffusionModel, got {type(model).__name__}.")
        ddim_timesteps(model.cfg.train_steps, ddim_steps)  # raises for steps outside [1, train steps]
        self.eta = check_eta(eta)
        if not temperature > 0:
            raise InvalidOptionError(f"temperature must be > 0, got {temperature!r}.")
        if not isinstance(replan_every, int) or not 1 <= replan_every <= model.vae.cfg.horizon:
            raise InvalidOptionError(f"replan_every must be an integer in [1, {model.vae.cfg.horizon}] (the plan's "
                                     f"steps), got {replan_every!r}.")
        self.model = model.eval()
        self.ddim_steps, self.temperature = ddim_steps, temperature
        self.horizon, self.replan_every = model.vae.cfg.horizon, replan_every
        self._encoded: dict = {}

    @classmethod
    def from_checkpoint(cls, path, **config) -> LatentDiffusionAgent:
        return cls(load_diffusion(path), **config)

    @staticmethod
    def bundled_weights() -> dict:
        return PRETRAINED

    def reset(self, state, mask, seed=None, slots=None):
        super().reset(state, mask, seed, slots)
        if abs(float(state.dt) - self.model.vae.cfg.dt) > 1e-6:
            raise InvalidOptionError(f"This latent diffusion model plans at {self.model.vae.cfg.dt} s steps; the "
                                     f"scenes step at {float(state.dt)} s (resample them with --dt).")
        self._map = encode_map_batch(self.model.context.map_encoder, state.maps.sources, self._encoded,
                                     self.model.cfg.m2a_radius, state.device)
        self._exits = [torch.as_tensor(lane_exits(m), device=state.device) for m in state.maps.sources]

    def act(self, state, mask):
        action = super().act(state, mask)
        nxt = self.dynamics.forward(state.current.float(), action.data.float(), float(state.dt))
        gone = torch.zeros_like(mask)
        for u, exits in enumerate(self._exits):
            rows = state.map_idx == u
            if len(exits) and rows.any():
                gone[rows] = passed_exit(nxt[rows][..., :2], exits)
        return Action(action.data, action.valid, remove=gone & mask)

    @torch.no_grad()
    def plan(self, state, mask):
        live = state.current_valid & state.agent_mask
        drive = mask & live
        out = torch.zeros(*mask.shape, self.horizon, 2, device=state.device, dtype=state.current.dtype)
        if not drive.any():
            return out
        hist, pose = history_features(state.traj.float(), state.valid, state.t, self.model.cfg.history)
        map_enc = replace(self._map, rows=state.map_idx.to(state.device))
        ctx = self.model.context_of(map_enc, hist, pose, live, state.agent_type, state.extent.float())
        z = self.model.sample(ctx[drive], self.generator, self.ddim_steps, self.eta, self.temperature)
        v0 = speed_along_heading(state.current[drive].float())
        actions, _ = self.model.vae.decode(z.transpose(1, 2), v0)
        out[drive] = actions.to(out.dtype)
        return out
