"""The latent diffusion policy (BLM-style): an action VAE, a latent denoiser conditioned on each agent's context,
DDIM sampling, and the closed-loop agent that replans every 0.5 s. See ``agent.py`` and docs/latent_diffusion.md.
"""

from agents.latent_diffusion.agent import LatentDiffusionAgent, load_diffusion, load_vae
from agents.latent_diffusion.denoiser import DiffusionConfig
from agents.latent_diffusion.model import LatentDiffusionModel
from agents.latent_diffusion.vae import ActionVAE, VaeConfig

__all__ = ["ActionVAE", "DiffusionConfig", "LatentDiffusionAgent", "LatentDiffusionModel", "VaeConfig",
           "load_diffusion", "load_vae"]
