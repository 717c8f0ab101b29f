"""The noise schedule and the DDIM sampler of the latent diffusion policy.

Cosine schedule (Nichol & Dhariwal, arXiv 2102.09672) over ``T`` training steps: ``alpha_bar(t) = f(t) / f(0)``,
``f(t) = cos²((t / T + s) / (1 + s) · π / 2)``, ``s = 0.008``, with each step's ``beta`` capped at 0.999;
``alpha_bar(0) = 1``. Noising: ``z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) ε``.

DDIM (Song et al., arXiv 2010.02502) from ``t`` to an earlier ``s`` given a prediction ``x0`` of the clean latent:
``ε̂ = (z_t - sqrt(ā_t) x0) / sqrt(1 - ā_t)``, ``σ = η sqrt((1 - ā_s) / (1 - ā_t)) sqrt(1 - ā_t / ā_s)``,
``z_s = sqrt(ā_s) x0 + sqrt(1 - ā_s - σ²) ε̂ + σ ξ``. ``η = 0`` is deterministic; ``η = 1`` is DDPM's variance.
A sampler of ``K`` steps visits ``T = t_K > ... > t_1 > t_0 = 0`` evenly spaced.
"""

from __future__ import annotations

import math

import torch

from envs.errors import InvalidOptionError


def cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    """``(steps + 1,)`` float64: ``alpha_bar`` at t = 0 .. steps (``alpha_bar[0] = 1``)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InvalidOptionError(f"The number of diffusion steps must be an integer >= 1, got {steps!r}.")
    t = torch.arange(steps + 1, dtype=torch.float64)
    f = torch.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2
    a = f / f[0]
    beta = (1 - a[1:] / a[:-1]).clamp(max=0.999)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - beta, 0)])


def ddim_timesteps(train_steps: int, sample_steps: int) -> list[int]:
    """``[t_K, ..., t_1, 0]``: ``sample_steps`` evenly spaced steps from ``train_steps`` down to 0.
    ``InvalidOptionError`` unless ``1 <= sample_steps <= train_steps``."""
    if not isinstance(sample_steps, int) or isinstance(sample_steps, bool) or not 1 <= sample_steps <= train_steps:
        raise InvalidOptionError(f"DDIM steps must be an integer in [1, {train_steps}] (the model's diffusion "
                                 f"training steps), got {sample_steps!r}.")
    ts = torch.linspace(train_steps, 0, sample_steps + 1).round().long().tolist()
    return ts


def check_eta(eta: float) -> float:
    """``eta`` as a float in [0, 1]; ``InvalidOptionError`` otherwise."""
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0.0 <= float(eta) <= 1.0:
        raise InvalidOptionError(f"DDIM eta must be a number in [0, 1] (0: deterministic, 1: DDPM's noise), got "
                                 f"{eta!r}.")
    return float(eta)


def add_noise(z0: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``z_t`` for clean latents ``z0`` ``(N, ...)`` at steps ``t`` ``(N,)``."""
    a = alpha_bar.to(z0.device)[t].to(z0.dtype).view(-1, *([1] * (z0.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def ddim_coefficients(alpha_bar: torch.Tensor, t: int, s: int, eta: float
                      ) -> tuple[float, float, float, float, float]:
    """``(sqrt(ā_s), sqrt(1 - ā_s - σ²), σ, sqrt(ā_t), sqrt(1 - ā_t))`` of the step ``t -> s`` (floats)."""
    at, as_ = float(alpha_bar[t]), float(alpha_bar[s])
    sigma = eta * math.sqrt(max((1 - as_) / (1 - at), 0.0)) * math.sqrt(max(1 - at / as_, 0.0))
    return math.sqrt(as_), math.sqrt(max(1 - as_ - sigma * sigma, 0.0)), sigma, math.sqrt(at), math.sqrt(1 - at)


def ddim_mean(z_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor, t: int, s: int, eta: float
              ) -> tuple[torch.Tensor, float]:
    """The mean of ``z_s`` given ``z_t`` and the prediction ``x0`` (same shapes), and the step's ``σ``."""
    c_x0, c_eps, sigma, sqrt_at, sqrt_1m_at = ddim_coefficients(alpha_bar, t, s, eta)
    eps = (z_t - sqrt_at * x0) / sqrt_1m_at
    return c_x0 * x0 + c_eps * eps, sigma
