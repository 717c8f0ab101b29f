"""Rewards: a weighted sum of per-step metric terms, per agent per step. Weights are a frozen dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class RewardConfig:
    """Weights of each term (reward = sum of weight × term). Defaults favour steady, safe progress:

    progress        +0.1 per metre travelled along the logged route this step
    collision       -5 per step in collision
    offroad         -5 per step with a box corner beyond the road edge (vehicles)
    jerk            -0.002 per m/s³ of |jerk| (comfort)
    log_divergence  0 per metre from the logged position (set > 0 magnitude, negative weight, to imitate)
    infeasible      -1 per step whose action was outside the physical bounds (with ``action_bounds="clip"``)
    """

    progress: float = 0.1
    collision: float = -5.0
    offroad: float = -5.0
    jerk: float = -0.002
    log_divergence: float = 0.0
    infeasible: float = -1.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"RewardConfig.{f.name} must be a finite number, got {value!r}.")


def compute_reward(cfg: RewardConfig, metrics: dict[str, torch.Tensor], progress_delta: torch.Tensor) -> torch.Tensor:
    """``(B, A)`` reward from the step's metrics and the progress made this step (m)."""
    r = cfg.progress * progress_delta
    r = r + cfg.collision * metrics["collision"].float() + cfg.offroad * metrics["offroad"].float()
    r = r + cfg.jerk * metrics["jerk"].abs() + cfg.log_divergence * metrics["log_divergence"]
    if "infeasible" in metrics:
        r = r + cfg.infeasible * metrics["infeasible"].float()
    return r
