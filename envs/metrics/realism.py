"""WOSAC realism: the likelihoods of the log under the rollouts, the meta-metric and minADE, as the official Waymo
implementation computes them (Montali et al., "The Waymo Open Sim Agents Challenge", arXiv 2305.12032; the 2024
and 2025 challenge configurations). ``docs/metrics.md`` explains the method; ``benchmarks/wosac_crosscheck.py``
scores the same rollouts with the official code and prints the differences.

Objects are the evaluated agents valid at the current step (the last history step). For each time-series
feature and object, the object's simulated values of all rollouts and future steps are pooled into a histogram on
the feature's fixed range (values outside are clipped into the end bins, NaN — a difference past the end of the
scene — lands in the top bin), 0.1 is added to every bin, and each scored logged value contributes the
log-probability of its bin; the feature's likelihood is ``exp(Σ log-likelihoods / number of scored values)``
pooled over all objects and steps (so one badly matched object pulls it down). Boolean features (collision,
off-road, traffic-light violation) are any-over-time per rollout over the steps where the log is valid, scored
by a two-bin histogram with 0.001 per bin, ``exp(mean over objects)``. The meta-metric is ``Σ weight ×
likelihood`` with a preset's weights; features that are NaN for a scene (a map without road edges) are dropped
and the remaining weights renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from envs.errors import UnknownNameError
from envs.metrics.episode import Rollouts, cpu_numpy, register_episode_metric
from envs.metrics.features import Feature, has_road_edges, require_rollouts, scene_features
from envs.metrics.kernels import displacement, wosac_log_likelihoods
from envs.types import AgentType

PSEUDOCOUNT = 0.1  # added to every bin of a time-series histogram (WOSAC)
BERNOULLI_PSEUDOCOUNT = 0.001  # added to both bins of a boolean feature (WOSAC)


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


def wosac_objects(rollouts: Rollouts) -> torch.Tensor:
    """``(A,)`` bool: the evaluated agents that are WOSAC objects (``Rollouts.wosac_objects``: valid at the current
    step, and scored)."""
    return rollouts.wosac_objects


def realism_features(rollouts: Rollouts) -> dict[str, Feature]:
    """Every ``REALISM_FEATURES`` entry as a ``(R + 1, A, T_future)`` ``Feature``: rows ``< R`` the rollouts
    (``valid``: the value enters the histogram), row ``R`` the log (``valid``: the value is scored, by the
    official validity rules; for boolean features, also the steps at which rollouts count). Only the WOSAC objects
    (``wosac_objects``) are scored."""
    f = scene_features(rollouts).joint
    r = rollouts.num_rollouts
    log_valid = f["distance_to_nearest_object"].valid[r]  # (A, T_future): the log's own validity
    vehicle = (rollouts.agent_type == AgentType.VEHICLE).to(log_valid.device)

    def scored(x: Feature, log_ok: torch.Tensor) -> Feature:
        ok = x.valid.clone()
        ok[r] = log_ok
        return Feature(x.value, ok)

    edge = f["distance_to_road_edge"]
    out = {
        "linear_speed": f["wosac_linear_speed"], "linear_accel": f["wosac_linear_accel"],
        "angular_speed": f["wosac_angular_speed"], "angular_accel": f["wosac_angular_accel"],
        "distance_to_nearest_object": f["distance_to_nearest_object"],
        "collision": f["collision"],
        "time_to_collision": scored(f["time_to_collision"], log_valid & vehicle[:, None]),
        "distance_to_road_edge": edge,
        "offroad": Feature(edge.valid & (edge.value > 0), edge.valid),  # every type (WOSAC)
        "traffic_light_violation": scored(f["traffic_light_violation"], log_valid & vehicle[:, None]),
    }
    return out


def realism_log_likelihoods(rollouts: Rollouts) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{feature: ((A,) summed log-likelihood, (A,) count)}`` per agent (``wosac_log_likelihoods``; 0 for agents
    that are no WOSAC objects): the feature's likelihood is ``exp(sum over objects / count over objects)``."""
    require_rollouts(rollouts, 2, "realism (a histogram of simulated values)")
    f = realism_features(rollouts)
    names = list(REALISM_FEATURES)
    specs = [REALISM_FEATURES[n] for n in names]
    total, count = wosac_log_likelihoods(
        tuple(cpu_numpy(f[n].value.to(torch.float32)) for n in names), tuple(cpu_numpy(f[n].valid) for n in names),
        rollouts.num_rollouts,
        np.array([sp.low for sp in specs], np.float32), np.array([sp.high - sp.low for sp in specs], np.float32),
        np.array([sp.bins for sp in specs], np.int64), PSEUDOCOUNT, BERNOULLI_PSEUDOCOUNT,
        cpu_numpy(wosac_objects(rollouts)))
    return {name: (total[i], count[i]) for i, name in enumerate(names)}


def realism_likelihoods(rollouts: Rollouts) -> dict[str, float]:
    """Scene likelihood of each feature, pooled over objects (NaN where nothing is scored, e.g. no road edges)."""
    out = {}
    for name, (total, count) in realism_log_likelihoods(rollouts).items():
        if name in ("distance_to_road_edge", "offroad") and not has_road_edges(rollouts.map_index):
            out[name] = float("nan")
        else:
            n = float(count.sum())
            out[name] = float(np.exp(total.sum() / n)) if n > 0 else float("nan")
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
    "WOSAC realism as the official implementation computes it (docs/metrics.md): realism_<feature> = exp(sum of "
    "the log-likelihoods of the scored logged future values under each object's histogram of its rollouts' values "
    "/ their number), pooled over the objects (agents valid at the current step); fixed ranges and bins, 0.1 "
    "pseudocount, values clipped into the end bins, NaN into the top bin; booleans: any-over-time per rollout, "
    "2 bins with 0.001 each, exp(mean over objects). realism_meta_wosac2024 / _wosac2025: weighted sums. Needs "
    "R >= 2.",
    family="realism", min_rollouts=2)
def realism(rollouts: Rollouts) -> dict[str, float]:
    lik = realism_likelihoods(rollouts)
    out = {f"realism_{k}": v for k, v in lik.items()}
    for preset in META_WEIGHTS:
        out[f"realism_meta_{preset}"] = realism_meta(lik, preset)
    return out


def displacement_errors(rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per rollout and WOSAC object (``wosac_objects``): ADE (m; the official definition: position errors summed
    over the steps where sim and log are valid, divided by the number of valid logged steps of the whole scene,
    history included, where the error is 0), FDE (m, the error at the last such future step) and whether the
    object has a valid future step; each ``(R, A_w)`` (errors are 0 where not valid)."""
    objs = cpu_numpy(wosac_objects(rollouts))
    ade, fde, n = displacement(cpu_numpy(rollouts.sim), cpu_numpy(rollouts.sim_valid), cpu_numpy(rollouts.log),
                               cpu_numpy(rollouts.log_valid), rollouts.history_steps)
    ade, fde, n = ade[:, objs], fde[:, objs], n[:, objs]
    dev, dtype = rollouts.sim.device, rollouts.sim.dtype
    return (torch.from_numpy(ade).to(dev, dtype), torch.from_numpy(fde).to(dev, dtype),
            torch.from_numpy(n > 0).to(dev))


def min_ade(rollouts: Rollouts) -> float:
    """Official minADE (m): min over rollouts of the mean over objects of their ADE (``displacement_errors``;
    objects with no valid future step in a rollout are left out of that rollout's mean; NaN if none has any)."""
    ade, _, ok = displacement_errors(rollouts)
    return _min_ade(ade, ok)


def _min_ade(ade: torch.Tensor, ok: torch.Tensor) -> float:
    per_rollout = (ade * ok).sum(dim=-1) / ok.sum(dim=-1).clamp(min=1)
    per_rollout = torch.where(ok.any(dim=-1), per_rollout, torch.full_like(per_rollout, float("inf")))
    best = float(per_rollout.min())
    return best if best != float("inf") else float("nan")


@register_episode_metric(
    "min_ade", "m",
    "min_ade: min over rollouts of the mean over objects (agents valid at the current step) of the official ADE "
    "(L2 position errors summed over the future steps where sim and log are valid / the number of valid logged "
    "steps, history included). ade / fde: mean over rollouts and objects of that ADE and of the error at the last "
    "such step. Objects without such steps are skipped.", family="realism")
def min_ade_metric(rollouts: Rollouts) -> dict[str, float]:
    ade, fde, ok = displacement_errors(rollouts)
    n = ok.sum().clamp(min=1)
    mean = (lambda x: float((x * ok).sum() / n) if ok.any() else float("nan"))
    return {"min_ade": _min_ade(ade, ok), "ade": mean(ade), "fde": mean(fde)}
