"""BLM's safety / distribution / diversity metrics (Wang et al., arXiv 2503.11771; docs/metrics.md), over the future
steps of the rollouts.

Rates and counts are computed per rollout and averaged over rollouts. Distribution metrics pool every valid
simulated value (all rollouts, agents, future steps) and every valid logged value into fixed histograms.
Unlike the BLM seed (which compared signed simulated acceleration with unsigned logged acceleration), the
simulated and logged acceleration and jerk are signed the same way (derivatives of speed, from the same
``kinematic_features`` function).
"""

from __future__ import annotations

import torch

from envs.metrics.episode import Rollouts, cpu_numpy, register_episode_metric
from envs.metrics.features import require_rollouts, scene_features
from envs.metrics.kernels import bin_counts, final_spread, safety_totals
from envs.metrics.realism import HistogramSpec
from envs.types import AgentType

# Fixed bins of the Jensen-Shannon divergences (values outside are clipped into the end bins).
JSD_BINS: dict[str, HistogramSpec] = {
    "linear_speed": HistogramSpec(0.0, 30.0, 30),  # m/s, 1 m/s bins
    "linear_accel": HistogramSpec(-10.0, 10.0, 40),  # m/s^2, 0.5 m/s^2 bins
    "jerk": HistogramSpec(-20.0, 20.0, 40),  # m/s^3, 1 m/s^3 bins
}
JSD_NAMES = {"linear_speed": "speed", "linear_accel": "accel", "jerk": "jerk"}


def histogram(values: torch.Tensor, valid: torch.Tensor, spec: HistogramSpec) -> torch.Tensor:
    """Normalised ``(bins,)`` histogram of the valid entries of ``values`` (any shape); zeros if none is valid."""
    counts = torch.from_numpy(bin_counts(cpu_numpy(values.to(torch.float32)).reshape(-1),
                                         cpu_numpy(valid).reshape(-1), spec.low, spec.high - spec.low, spec.bins))
    return counts / counts.sum().clamp(min=1)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence of two discrete distributions ``(K,)``, natural log: 0 for identical
    distributions, ``ln 2`` for disjoint supports. NaN if either is empty (all zeros)."""
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        nz = a > 0  # 0 log 0 = 0; where a > 0, m > 0 too
        return (a[nz] * (a[nz] / m[nz]).log()).sum()

    return float(0.5 * kl(p) + 0.5 * kl(q))


def _per_rollout_mean(x: torch.Tensor) -> float:
    return float(x.float().mean())


@register_episode_metric(
    "blm_safety", "rates (fraction), counts, s",
    "blm_collision_rate: overlapping box pairs (evaluated-evaluated pairs once, evaluated-context pairs) summed over "
    "future steps / number of valid evaluated agent-steps (N·T); blm_offroad_rate: fraction of valid vehicle "
    "agent-steps with a box corner beyond the road edge (NaN without road edges); blm_min_ttc (s): minimum over "
    "agents, objects and future steps of the closest-approach time at constant velocities (approaching pairs whose "
    "bounding circles would touch), capped at 5 s; blm_rss_longitudinal / blm_rss_lateral: agent-steps violating "
    "the RSS safe distance (rho 0.5 s, accel 2 / brake 4 m/s^2; lateral accel 1.5 / brake 2.5 m/s^2, mu 0.2 m) to "
    "the followed object / an object alongside. All per rollout, mean over rollouts.", family="blm")
def blm_safety(rollouts: Rollouts) -> dict[str, float]:
    sf = scene_features(rollouts)
    f = sf.sim
    c = lambda name: cpu_numpy(f[name].value)  # noqa: E731
    vehicle = cpu_numpy(rollouts.agent_type == AgentType.VEHICLE)
    steps, pairs, off, veh, min_ttc, rss_long, rss_lat = torch.from_numpy(safety_totals(
        cpu_numpy(sf.sim_valid), c("overlaps_agents"), c("overlaps_context"), c("offroad"),
        cpu_numpy(f["offroad"].valid), vehicle, c("closest_approach_ttc"), c("rss_longitudinal"),
        c("rss_lateral"))).unbind(-1)
    return {
        "blm_collision_rate": _per_rollout_mean(pairs / steps.clamp(min=1)),
        "blm_offroad_rate": _per_rollout_mean(off / veh.clamp(min=1)) if veh.any() else float("nan"),
        "blm_min_ttc": _per_rollout_mean(min_ttc.clamp(max=5.0)) if steps.any() else float("nan"),
        "blm_rss_longitudinal": _per_rollout_mean(rss_long),
        "blm_rss_lateral": _per_rollout_mean(rss_lat),
    }


@register_episode_metric(
    "blm_jsd", "nats in [0, ln 2]",
    "Jensen-Shannon divergence (natural log) between the histograms of simulated (all rollouts) and logged future "
    "values of speed (m/s, [0, 30], 30 bins), signed acceleration (m/s^2, [-10, 10], 40 bins) and signed jerk "
    "(m/s^3, [-20, 20], 40 bins), each from central differences, valid values only, clipped into the end bins.",
    family="blm")
def blm_jsd(rollouts: Rollouts) -> dict[str, float]:
    f = scene_features(rollouts)
    out = {}
    for name, spec in JSD_BINS.items():
        sim, log = f.sim[name], f.log[name]
        out[f"blm_jsd_{JSD_NAMES[name]}"] = jensen_shannon(histogram(sim.value, sim.valid, spec),
                                                           histogram(log.value, log.valid, spec))
    return out


def final_displacement_diversity(rollouts: Rollouts) -> float:
    """FDD (m): per agent, the mean pairwise distance between the rollouts' final positions (each rollout's last
    valid step), averaged over agents valid in at least two rollouts. Needs R >= 2."""
    require_rollouts(rollouts, 2, "final displacement diversity")
    spread, has = final_spread(cpu_numpy(rollouts.sim), cpu_numpy(rollouts.sim_valid), rollouts.history_steps)
    return float(spread[has].mean()) if has.any() else float("nan")


@register_episode_metric(
    "blm_fdd", "m", "blm_fdd: final displacement diversity, the mean over agents of the mean pairwise distance "
    "between the rollouts' final positions (last valid step). Needs R >= 2.", family="blm", min_rollouts=2)
def blm_fdd(rollouts: Rollouts) -> dict[str, float]:
    return {"blm_fdd": final_displacement_diversity(rollouts)}
