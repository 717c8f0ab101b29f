"""Metrics: per-step metrics computed inside the simulation step (they feed rewards and ``info``) and, later,
episode metrics for evaluation. One registry: ``STEP_METRICS`` maps a name to its definition."""

from envs.metrics.step import STEP_METRICS, StepMetric, compute_step_metrics, register_step_metric

__all__ = ["STEP_METRICS", "StepMetric", "compute_step_metrics", "register_step_metric"]
