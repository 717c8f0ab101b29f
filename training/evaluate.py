"""Closed-loop evaluation of sim agents: every agent valid at the start step is driven by the policy for the
rest of the scene (1.1 s history + 8 s at 10 Hz on the towns data), and per-step metrics are aggregated.

Rates are per agent-step over the agents the policy drives while they are in the scene:
collision rate (box overlap with any agent), off-road rate (vehicle box corner beyond the road edge),
ADE (mean distance to the logged position over steps where the log has one, m) and progress (distance along
the agent's own logged path at the end of the rollout, m, averaged over driven agents).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

METRIC_COLUMNS = ("collision_rate", "offroad_rate", "ade_m", "progress_m")


@dataclass
class _Totals:
    live: int = 0
    collisions: int = 0
    offroad: int = 0
    ade_sum: float = 0.0
    ade_count: int = 0
    progress_sum: float = 0.0
    progress_count: int = 0
    agent_steps_time: float = 0.0


@torch.inference_mode()
def evaluate_agent(agent_name: str, ds, num_scenes: int | None = None, batch_size: int = 32, start_step: int = 10,
                   seed: int = 0, checkpoint: str | None = None, progress_bar: bool = False) -> dict:
    """Roll ``agent_name`` out on the first ``num_scenes`` scenes of ``ds`` (an ``envs.data.SceneDataset``);
    returns the metric dict."""
    from agents.registry import make_agent
    from envs import sim
    from envs.metrics import compute_step_metrics

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    count = len(ds) if num_scenes is None else min(num_scenes, len(ds))
    agent = make_agent(agent_name, checkpoint=checkpoint)
    totals = _Totals()
    batches = range(0, count, batch_size)
    if progress_bar:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"eval {agent_name}", unit="batch")
    for first in batches:
        scenes = [ds[i] for i in range(first, min(first + batch_size, count))]
        maps = sorted({s.map_id for s in scenes})
        batch_maps = sim.stack_maps([ds.map(m) for m in maps], indices=[ds.map_index(m) for m in maps])
        state = sim.reset(scenes, start_step=start_step, controlled="all", maps=batch_maps)
        agent.reset(state, state.controlled, seed=seed + first)
        start = time.perf_counter()
        steps = int((state.end - state.t).max())
        for _ in range(steps):
            state = sim.step(state, agent(state, state.controlled), agent.dynamics)
            m = compute_step_metrics(state, ["collision", "offroad", "log_divergence"])
            live = state.controlled & state.current_valid & state.agent_mask
            totals.live += int(live.sum())
            totals.collisions += int((m["collision"] & live).sum())
            totals.offroad += int((m["offroad"] & live).sum())
            logged = live & state.at(state.log_valid)
            totals.ade_sum += float(m["log_divergence"][logged].sum())
            totals.ade_count += int(logged.sum())
        totals.agent_steps_time += time.perf_counter() - start
        final = compute_step_metrics(state, ["progress"])["progress"]
        driven = state.controlled & state.agent_mask
        totals.progress_sum += float(final[driven].sum())
        totals.progress_count += int(driven.sum())
    return {
        "agent": agent_name, "dataset": ds.dataset, "split": ds.split, "scenes": count,
        "collision_rate": totals.collisions / max(totals.live, 1),
        "offroad_rate": totals.offroad / max(totals.live, 1),
        "ade_m": totals.ade_sum / max(totals.ade_count, 1),
        "progress_m": totals.progress_sum / max(totals.progress_count, 1),
        "agent_steps": totals.live,
        "agent_steps_per_s": totals.live / max(totals.agent_steps_time, 1e-9),
    }


def format_table(rows: list[dict]) -> str:
    """A plain-text table of ``evaluate_agent`` results."""
    header = (f"{'agent':<20}{'collision rate':>16}{'off-road rate':>15}{'ADE m':>9}{'progress m':>12}"
              f"{'agent-steps/s':>15}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['agent']:<20}{r['collision_rate']:>16.4f}{r['offroad_rate']:>15.4f}{r['ade_m']:>9.2f}"
                     f"{r['progress_m']:>12.1f}{r['agent_steps_per_s']:>15,.0f}")
    return "\n".join(lines)


def to_json_ready(rows: list[dict]) -> list[dict]:
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]

