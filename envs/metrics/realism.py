"""WOSAC-style realism: per-object histogram likelihoods of the log under the rollouts, the meta-metric, minADE.

Protocol (METHODS.md §5). For each evaluated object and feature, the object's ``R × T_future`` simulated values
(valid ones only) are pooled into a histogram on the feature's fixed range (values outside it are clipped into
the end bins), 0.1 is added to every bin, and each logged value (future steps where the log's feature is valid)
is scored by its bin's log-probability; the object's likelihood is ``exp(mean log-likelihood)``. Boolean
features use a 2-bin histogram of the any-over-time value per rollout, scored on the log's any-over-time value.
The scene's likelihood of a feature is the mean over objects that have at least one valid logged value (NaN if
none has). The meta-metric is ``Σ weight × likelihood`` (weights of a preset; features that are NaN for the
scene, e.g. map features on a map without road edges, are dropped and the remaining weights renormalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from envs.errors import UnknownNameError
from envs.metrics.episode import Rollouts, cpu_numpy, register_episode_metric
from envs.metrics.features import require_rollouts, scene_features
from envs.metrics.kernels import displacement, histogram_likelihoods

PSEUDOCOUNT = 0.1  # added to every histogram bin (WOSAC)


@dataclass(frozen=True)
class HistogramSpec:
    """A feature's fixed histogram: ``bins`` equal bins on ``[low, high]`` (units of the feature);
    ``bins = 0`` marks a boolean feature (2-bin histogram of the any-over-time value)."""

    low: float = 0.0
    high: float = 1.0
    bins: int = 0

    @property
    def boolean(self) -> bool:
        return self.bins == 0


REALISM_FEATURES: dict[str, HistogramSpec] = {
    "linear_speed": HistogramSpec(0.0, 25.0, 10),  # m/s
    "linear_accel": HistogramSpec(-12.0, 12.0, 11),  # m/s^2
    "angular_speed": HistogramSpec(-0.628, 0.628, 11),  # rad/s
    "angular_accel": HistogramSpec(-3.14, 3.14, 11),  # rad/s^2
    "distance_to_nearest_object": HistogramSpec(-5.0, 40.0, 10),  # m
    "collision": HistogramSpec(),
    "time_to_collision": HistogramSpec(0.0, 5.0, 10),  # s
    "distance_to_road_edge": HistogramSpec(-20.0, 40.0, 10),  # m
    "offroad": HistogramSpec(),
    "traffic_light_violation": HistogramSpec(),
}

META_WEIGHTS: dict[str, dict[str, float]] = {
    "wosac2024": {"linear_speed": 0.05, "linear_accel": 0.05, "angular_speed": 0.05, "angular_accel": 0.05,
                  "distance_to_nearest_object": 0.10, "collision": 0.25, "time_to_collision": 0.10,
                  "distance_to_road_edge": 0.10, "offroad": 0.25},
    "wosac2025": {"linear_speed": 0.05, "linear_accel": 0.05, "angular_speed": 0.05, "angular_accel": 0.05,
                  "distance_to_nearest_object": 0.10, "collision": 0.25, "time_to_collision": 0.10,
                  "distance_to_road_edge": 0.05, "offroad": 0.25, "traffic_light_violation": 0.05},
}


def histogram_log_likelihood(sim: torch.Tensor, sim_valid: torch.Tensor, log: torch.Tensor, log_valid: torch.Tensor,
                             spec: HistogramSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object likelihood of logged values under the histogram of simulated ones.

    Args:
        sim: ``(R, A, T)`` simulated values; sim_valid ``(R, A, T)`` bool.
        log: ``(A, T)`` logged values; log_valid ``(A, T)`` bool.
        spec: the feature's range and bin count (``bins = 0``: boolean, see ``bernoulli_log_likelihood``).
    Returns:
        ``(A,)`` likelihood ``exp(mean over valid logged steps of log p(bin))`` and ``(A,)`` bool, whether the
        object had any valid logged value (the likelihood is NaN where it had none).
    """
    if spec.boolean:
        return bernoulli_log_likelihood(sim, sim_valid, log, log_valid)
    r, a, t = sim.shape
    nb = spec.bins

    def bin_of(x: torch.Tensor) -> torch.Tensor:
        scaled = (x.float() - spec.low) / (spec.high - spec.low) * nb
        return scaled.floor().clamp(0, nb - 1).long()  # out-of-range values land in the end bins

    agent = torch.arange(a, device=sim.device)
    flat = torch.where(sim_valid, agent[None, :, None] * nb + bin_of(sim), a * nb)  # invalid: an extra bin
    counts = torch.bincount(flat.reshape(-1), minlength=a * nb + 1)[:a * nb].float()
    counts = counts.reshape(a, nb) + PSEUDOCOUNT
    log_prob = (counts / counts.sum(dim=-1, keepdim=True)).log()  # (A, nb)
    scores = log_prob.gather(1, bin_of(log))  # (A, T)
    n = log_valid.sum(dim=-1)
    mean = torch.where(log_valid, scores, torch.zeros_like(scores)).sum(dim=-1) / n.clamp(min=1)
    scored = n > 0
    return torch.where(scored, mean.exp(), torch.full_like(mean, float("nan"))), scored


def bernoulli_log_likelihood(sim: torch.Tensor, sim_valid: torch.Tensor, log: torch.Tensor, log_valid: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean features: per rollout the any-over-(valid)-time value, a 2-bin histogram over rollouts with
    ``PSEUDOCOUNT`` per bin, scored on the log's any-over-time value. Shapes as ``histogram_log_likelihood``;
    rollouts without any valid step do not count."""
    sim_any = (sim.bool() & sim_valid).any(dim=-1)  # (R, A)
    counted = sim_valid.any(dim=-1).float()
    true = (sim_any.float() * counted).sum(dim=0) + PSEUDOCOUNT
    total = counted.sum(dim=0) + 2 * PSEUDOCOUNT
    log_any = (log.bool() & log_valid).any(dim=-1)
    p = torch.where(log_any, true / total, 1 - true / total)
    scored = log_valid.any(dim=-1)
    return torch.where(scored, p, torch.full_like(p, float("nan"))), scored


def per_object_likelihoods(rollouts: Rollouts) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{feature: ((A,) likelihood, (A,) scored)}`` for every ``REALISM_FEATURES`` entry: every feature in one
    compiled loop (``kernels.histogram_likelihoods``), the same values as ``histogram_log_likelihood``."""
    require_rollouts(rollouts, 2, "realism (a histogram of simulated values)")
    f = scene_features(rollouts)
    names = list(REALISM_FEATURES)
    specs = [REALISM_FEATURES[n] for n in names]
    joint = [f.joint[n] for n in names]  # rollouts and log as one (R + 1, A, T) array per feature: no copies
    lik = histogram_likelihoods(
        tuple(cpu_numpy(x.value.to(torch.float32)) for x in joint), tuple(cpu_numpy(x.valid) for x in joint),
        rollouts.num_rollouts,
        np.array([sp.low for sp in specs], np.float32), np.array([sp.high - sp.low for sp in specs], np.float32),
        np.array([sp.bins for sp in specs], np.int64), PSEUDOCOUNT)
    lik = torch.from_numpy(lik).float()
    return {name: (lik[i], ~lik[i].isnan()) for i, name in enumerate(names)}


def realism_likelihoods(rollouts: Rollouts) -> dict[str, float]:
    """Scene likelihood of each feature: mean over objects with a valid logged value (NaN if there is none)."""
    out = {}
    for name, (lik, scored) in per_object_likelihoods(rollouts).items():
        out[name] = float(lik[scored].mean()) if scored.any() else float("nan")
    return out


def realism_meta(likelihoods: dict[str, float], preset: str = "wosac2024") -> float:
    """``Σ weight × likelihood`` with the weights of ``preset`` (``META_WEIGHTS``); NaN features are dropped and
    the remaining weights renormalised (the presets' weights sum to 1). ``UnknownNameError`` for other presets."""
    if preset not in META_WEIGHTS:
        raise UnknownNameError("realism preset", preset, META_WEIGHTS)
    weights = META_WEIGHTS[preset]
    total = value = 0.0
    for name, w in weights.items():
        lik = likelihoods[name]
        if lik == lik:  # not NaN
            total += w
            value += w * lik
    return value / total if total > 0 else float("nan")


@register_episode_metric(
    "realism", "likelihood in [0, 1]",
    "WOSAC-style realism (METHODS.md §5): realism_<feature> = mean over objects of exp(mean log-likelihood of the "
    "logged future values under the histogram of the R rollouts' values: fixed range/bins, 0.1 pseudocount, "
    "out-of-range values clipped to the end bins; booleans: 2-bin any-over-time); objects without a valid logged "
    "value are skipped. realism_meta_wosac2024 / _wosac2025: weighted sums. Needs R >= 2.",
    family="realism")
def realism(rollouts: Rollouts) -> dict[str, float]:
    lik = realism_likelihoods(rollouts)
    out = {f"realism_{k}": v for k, v in lik.items()}
    for preset in META_WEIGHTS:
        out[f"realism_meta_{preset}"] = realism_meta(lik, preset)
    return out


def displacement_errors(rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per rollout and agent: ADE (m, mean over future steps where sim and log are valid), FDE (m, at the last
    such step) and whether the agent had any such step; each ``(R, A)`` (errors are 0 where not valid)."""
    ade, fde, n = displacement(cpu_numpy(rollouts.sim), cpu_numpy(rollouts.sim_valid), cpu_numpy(rollouts.log),
                               cpu_numpy(rollouts.log_valid), rollouts.history_steps)
    dev, dtype = rollouts.sim.device, rollouts.sim.dtype
    return (torch.from_numpy(ade).to(dev, dtype), torch.from_numpy(fde).to(dev, dtype),
            torch.from_numpy(n > 0).to(dev))


def min_ade(rollouts: Rollouts) -> float:
    """Official minADE (m): min over rollouts of the mean over objects of their ADE (objects with no valid
    future step in a rollout are left out of that rollout's mean; NaN if no rollout has any)."""
    ade, _, ok = displacement_errors(rollouts)
    return _min_ade(ade, ok)


def _min_ade(ade: torch.Tensor, ok: torch.Tensor) -> float:
    per_rollout = (ade * ok).sum(dim=-1) / ok.sum(dim=-1).clamp(min=1)
    per_rollout = torch.where(ok.any(dim=-1), per_rollout, torch.full_like(per_rollout, float("inf")))
    best = float(per_rollout.min())
    return best if best != float("inf") else float("nan")


@register_episode_metric(
    "min_ade", "m",
    "min_ade: min over rollouts of the mean over objects of the ADE (mean L2 position error over future steps "
    "where both sim and log are valid). ade / fde: mean over rollouts and objects of the ADE and of the error at "
    "the last such step. Objects without such steps are skipped.", family="realism")
def min_ade_metric(rollouts: Rollouts) -> dict[str, float]:
    ade, fde, ok = displacement_errors(rollouts)
    n = ok.sum().clamp(min=1)
    mean = (lambda x: float((x * ok).sum() / n) if ok.any() else float("nan"))
    return {"min_ade": _min_ade(ade, ok), "ade": mean(ade), "fde": mean(fde)}
