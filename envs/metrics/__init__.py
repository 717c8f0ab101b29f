"""Metrics: per-step metrics computed inside the simulation step (they feed rewards and ``info``) and episode
metrics for evaluation (R rollouts of a scene against its log: realism, BLM, planning families).
``STEP_METRICS`` / ``EPISODE_METRICS`` map a name to its definition."""

from envs.metrics.episode import (
    EPISODE_METRICS,
    RolloutError,
    Rollouts,
    compute_episode_metrics,
    episode_metric_names,
    register_episode_metric,
    rollouts_from_log,
)
from envs.metrics.step import (
    STEP_METRICS,
    StepMetric,
    collision_pairs,
    compute_step_metrics,
    compute_step_metrics_and_pairs,
    register_step_metric,
)

__all__ = ["EPISODE_METRICS", "STEP_METRICS", "RolloutError", "Rollouts", "StepMetric", "compute_episode_metrics",
           "collision_pairs", "compute_step_metrics", "compute_step_metrics_and_pairs", "episode_metric_names",
           "register_episode_metric", "register_step_metric", "rollouts_from_log"]
