"""The action VAE of the latent diffusion policy: an agent's next ``horizon`` actions (acceleration, yaw rate) as a
short sequence of latent vectors, decoded back to actions that a bounded unicycle turns into positions.

Encoder: the normalised actions and their validity ``(3, H)`` -> Conv1d(k 7, stride 4) -> Conv1d(k 3) -> 1x1
heads for the mean and log-variance of a latent ``(C, L)``, ``L = H / 4`` (52 steps at 10 Hz -> 13 x 8, as
BLM). Decoder: the latent upsampled x4, joined to the agent's start speed (the only context it needs: the
unicycle starts there), two Conv1d layers -> actions squashed into the bounds (``|a| <= accel_bound``, ``|yaw
rate| <= yaw_rate_bound``), then the unicycle from the origin of the agent's frame at that speed, with the speed
kept in ``[0, v_max]`` (``bounded_actions``), -> positions ``(H, 2)``. The map and the neighbours are the
denoiser's context, not the decoder's: the latent says how the agent moves, the diffusion model says which
motion fits the scene.

Loss (``ActionVAE.loss``): the squared position error after the unicycle, averaged over the valid future steps,
plus ``beta`` times the KL divergence to N(0, I) per latent element, each element's KL floored at ``kl_floor``
(free bits: below it, no pressure toward the prior, so the latent keeps some information).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from envs.dynamics import Unicycle


@dataclass(frozen=True)
class VaeConfig:
    """The action VAE's shape and bounds. ``action_scale``: the per-channel scale that normalises (acceleration,
    yaw rate) at the encoder's input (measured on the training data by ``trafficgym train vae``)."""

    horizon: int = 52  # future steps encoded (5.2 s at 10 Hz)
    stride: int = 4  # horizon / latent_steps
    latent_dim: int = 8
    hidden: int = 64
    dt: float = 0.1
    accel_bound: float = 3.0  # m/s^2
    yaw_rate_bound: float = 1.0  # rad/s
    v_max: float = 30.0  # m/s
    action_scale: tuple[float, float] = (1.0, 0.2)

    def __post_init__(self):
        for name in ("horizon", "stride", "latent_dim", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"VaeConfig.{name} must be an integer >= 1, got {v!r}.")
        if self.horizon % self.stride:
            raise ValueError(f"VaeConfig.horizon ({self.horizon}) must be a multiple of stride ({self.stride}).")
        for name in ("dt", "accel_bound", "yaw_rate_bound", "v_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"VaeConfig.{name} must be > 0, got {getattr(self, name)!r}.")
        object.__setattr__(self, "action_scale", tuple(float(s) for s in self.action_scale))
        if len(self.action_scale) != 2 or not all(s > 0 for s in self.action_scale):
            raise ValueError(f"VaeConfig.action_scale must be two positive numbers, got {self.action_scale!r}.")

    @property
    def latent_steps(self) -> int:
        return self.horizon // self.stride

    def to_json(self) -> dict:
        return {**asdict(self), "action_scale": list(self.action_scale)}


def bounded_actions(raw: torch.Tensor, v0: torch.Tensor, cfg: VaeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Actions ``(..., H, 2)`` within the bounds, from unbounded network outputs ``raw`` ``(..., H, 2)``, and the
    positions ``(..., H, 2)`` the unicycle reaches with them from the origin, heading 0, speed ``v0`` ``(...)``.
    The acceleration is cut where it would take the speed outside ``[0, v_max]``, so ``envs.dynamics.Unicycle``
    (the agent's dynamics) replays the returned actions to the same positions."""
    uni = Unicycle()
    accel = cfg.accel_bound * torch.tanh(raw[..., 0])
    yaw = cfg.yaw_rate_bound * torch.tanh(raw[..., 1])
    state = torch.stack([torch.zeros_like(v0), torch.zeros_like(v0), torch.zeros_like(v0), v0,
                         torch.zeros_like(v0)], dim=-1)
    actions, positions = [], []
    for k in range(raw.shape[-2]):
        v = state[..., 3] * torch.cos(state[..., 2]) + state[..., 4] * torch.sin(state[..., 2])
        a = torch.minimum(torch.maximum(accel[..., k], -v / cfg.dt), (cfg.v_max - v) / cfg.dt)
        act = torch.stack([a, yaw[..., k]], dim=-1)
        state = uni.forward(state, act, cfg.dt)
        actions.append(act)
        positions.append(state[..., :2])
    return torch.stack(actions, dim=-2), torch.stack(positions, dim=-2)


class ActionVAE(nn.Module):
    """``encode(actions, mask) -> (mean, log_var)`` ``(N, C, L)``; ``decode(z, v0) -> (actions, positions)``
    ``(N, H, 2)`` each; ``loss(batch)`` for the trainer. Shapes: actions ``(N, H, 2)`` physical units, mask
    ``(N, H)`` (the steps whose logged action is known), v0 ``(N,)`` m/s."""

    def __init__(self, cfg: VaeConfig):
        super().__init__()
        self.cfg = cfg
        h, c = cfg.hidden, cfg.latent_dim
        self.enc = nn.Sequential(nn.Conv1d(3, h, 7, stride=cfg.stride, padding=3), nn.GELU(),
                                 nn.Conv1d(h, h, 3, padding=1), nn.GELU())
        self.enc_mean, self.enc_log_var = nn.Conv1d(h, c, 1), nn.Conv1d(h, c, 1)
        self.dec_in = nn.Linear(c + 1, h)
        self.dec = nn.Sequential(nn.GELU(), nn.Conv1d(h, h, 3, padding=1), nn.GELU(), nn.Conv1d(h, 2, 3, padding=1))
        self.register_buffer("beta", torch.tensor(0.0), persistent=False)  # set by the trainer's ramp
        self.kl_floor = 0.005

    def encode(self, actions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = actions.new_tensor(self.cfg.action_scale)
        x = torch.cat([(actions / scale) * mask[..., None], mask[..., None].to(actions.dtype)], dim=-1)
        f = self.enc(x.transpose(1, 2))
        return self.enc_mean(f), self.enc_log_var(f).clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor, v0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = z.repeat_interleave(self.cfg.stride, dim=-1).transpose(1, 2)  # (N, H, C)
        speed = (v0 / 10.0)[:, None, None].expand(-1, up.shape[1], 1)
        raw = self.dec(self.dec_in(torch.cat([up, speed], dim=-1)).transpose(1, 2)).transpose(1, 2)
        return bounded_actions(raw, v0, self.cfg)

    def loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Summed over the batch's sequences: the mean squared position error over each one's valid steps plus
        ``beta`` times its latent's KL (per element, floored at ``kl_floor``, summed); count = sequences."""
        mean, log_var = self.encode(batch.actions, batch.mask)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if self.training else mean
        _, pos = self.decode(z, batch.v0)
        m = batch.mask.to(pos.dtype)
        steps = m.sum(-1).clamp(min=1)
        sq = ((pos - batch.positions).square().sum(-1) * m).sum(-1) / steps  # (N,) m^2
        kl_el = 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var)  # (N, C, L)
        kl = kl_el.clamp(min=self.kl_floor).sum((1, 2))
        n = mean.shape[0]
        total = (sq + self.beta * kl).sum()
        ade = (((pos - batch.positions).norm(dim=-1) * m).sum(-1) / steps)
        return total, n, {"pos_mse": sq.mean().item(), "ade": ade.mean().item(),
                                        "kl": kl.mean().item(), "beta": float(self.beta)}
