"""The latent diffusion model: the context encoder and latent denoiser (``denoiser.py``) over the latent space of
a frozen action VAE (``vae.py``), the cosine schedule and the DDIM sampler (``schedule.py``).

    model = LatentDiffusionModel(DiffusionConfig(...), vae)     # vae: a trained ActionVAE (frozen here)
    ctx = model.context_of(map_enc, hist, pose, valid, agent_type, extent)   # (B, A, D)
    z = model.sample(ctx[drive], generator, steps=20, eta=0.3)                # (N, L, C) VAE latents
    actions, positions = model.vae.decode(z.transpose(1, 2), v0)             # (N, H, 2) each

Each DDIM step predicts the clean latent as a mixture (``LatentDenoiser``), takes one component's mean (a draw
from the mixture's weights at ``temperature``) as ``x0``, and steps with DDIM's update and ``eta`` noise. The
reverse step is then a mixture of Gaussians with tractable log-probability, which the RL fine-tuning needs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from agents.latent_diffusion.denoiser import ContextEncoder, DiffusionConfig, LatentDenoiser, mixture_nll
from agents.latent_diffusion.schedule import add_noise, check_eta, cosine_alpha_bar, ddim_mean, ddim_timesteps
from agents.latent_diffusion.vae import ActionVAE
from agents.nn.map_encoder import MapEncoding
from envs.errors import CheckpointError, InvalidOptionError


def vae_fingerprint(vae: ActionVAE) -> str:
    """A short digest of the VAE's weights: a diffusion model is only meaningful on the latents of the VAE it was
    trained on."""
    from agents.checkpoint import checkpoint_checksum

    return checkpoint_checksum({}, dict(vae.state_dict()))[:23]


class LatentDiffusionModel(nn.Module):
    """Context encoder + latent denoiser + the frozen VAE. ``loss(batch)`` trains the first two (the mixture NLL
    of the clean latent at a uniform random diffusion step); ``sample`` runs DDIM."""

    def __init__(self, cfg: DiffusionConfig, vae: ActionVAE):
        super().__init__()
        fp = vae_fingerprint(vae)
        if cfg.vae_fingerprint and cfg.vae_fingerprint != fp:
            raise CheckpointError(f"This diffusion model was trained on the latents of another VAE "
                                  f"({cfg.vae_fingerprint} vs {fp}): its latents would be meaningless through this "
                                  "one. Train a diffusion model on this VAE (trafficgym train diffusion --vae ...).")
        if (cfg.latent_steps, cfg.latent_dim) != (vae.cfg.latent_steps, vae.cfg.latent_dim):
            raise InvalidOptionError(f"DiffusionConfig latent {cfg.latent_steps} x {cfg.latent_dim} does not match "
                                     f"the VAE's {vae.cfg.latent_steps} x {vae.cfg.latent_dim}.")
        self.cfg = replace(cfg, vae_fingerprint=fp)
        self.vae = vae.eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.context = ContextEncoder(self.cfg)
        self.denoiser = LatentDenoiser(self.cfg)
        self.register_buffer("alpha_bar", cosine_alpha_bar(cfg.train_steps).float(), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode (no posterior sampling)
        return self

    def config_json(self) -> dict:
        return {"diffusion": self.cfg.to_json(), "vae": self.vae.cfg.to_json()}

    def context_of(self, map_enc: MapEncoding, hist, pose, valid, agent_type, extent) -> torch.Tensor:
        """``ContextEncoder.forward``: ``(B, A, hidden)``."""
        return self.context(map_enc, hist, pose, valid, agent_type, extent)

    @torch.no_grad()
    def clean_latent(self, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's mean of action sequences ``(N, H, 2)`` / ``(N, H)``, scaled: ``(N, L, C)``."""
        mean, _ = self.vae.encode(actions, mask)
        return mean.transpose(1, 2) / self.cfg.latent_scale

    def loss(self, batch) -> tuple[torch.Tensor, int, dict]:
        """Summed over the batch's target agents: the mixture NLL of their clean latents per latent element
        (``batch``: a ``training.diffusion_data.DiffusionBatch``); count = target agents."""
        map_enc = self.context.map_encoder(batch.map_points, batch.map_pose, batch.map_type, batch.map_valid,
                                           nbr=batch.map_nbr, rows=batch.map_rows)
        ctx = self.context(map_enc, batch.hist, batch.pose, batch.valid, batch.agent_type, batch.extent)
        c = ctx.reshape(-1, ctx.shape[-1])[batch.target_rows]
        z0 = self.clean_latent(batch.actions, batch.mask)
        n = z0.shape[0]
        if n == 0:
            return 0.0 * ctx.sum(), 0, {"nll_per_dim": 0.0}
        t = torch.randint(self.cfg.min_train_step, self.cfg.train_steps + 1, (n,), device=z0.device)
        z_t = add_noise(z0, t, self.alpha_bar, torch.randn_like(z0))
        logits, mean, log_std = self.denoiser(z_t, t, c)
        nll = mixture_nll(logits, mean, log_std, z0)
        w = 1 - self.alpha_bar[t] if self.cfg.loss_weight == "noise" else torch.ones_like(nll)
        # per latent element (nats): the gradient's scale does not grow with the latent's size
        return (w * nll).sum() / z0[0].numel(), n, {"nll_per_dim": float(nll.detach().mean()) / z0[0].numel()}

    @torch.no_grad()
    def sample(self, context: torch.Tensor, generator: torch.Generator, steps: int = 20, eta: float = 0.3,
               temperature: float = 1.0) -> torch.Tensor:
        """DDIM from pure noise to VAE latents ``(N, L, C)`` (unscaled) for contexts ``(N, D)``; deterministic
        given ``generator``'s state (CPU generator; the draws are moved to the context's device)."""
        ts = ddim_timesteps(self.cfg.train_steps, steps)
        eta = check_eta(eta)
        if not temperature > 0:
            raise InvalidOptionError(f"temperature must be > 0, got {temperature!r}.")
        n, dev = context.shape[0], context.device
        shape = (n, self.cfg.latent_steps, self.cfg.latent_dim)
        z = torch.randn(shape, generator=generator).to(dev)
        rows = torch.arange(n, device=dev)
        for t, s in zip(ts[:-1], ts[1:], strict=True):
            logits, mean, _ = self.denoiser(z, torch.full((n,), t, device=dev), context)
            probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
            k = torch.multinomial(probs, 1, generator=generator)[:, 0].to(dev) if n else rows
            mu, sigma = ddim_mean(z, mean[rows, k], self.alpha_bar, t, s, eta)
            z = mu + sigma * torch.randn(shape, generator=generator).to(dev) if sigma > 0 else mu
        return z * self.cfg.latent_scale
