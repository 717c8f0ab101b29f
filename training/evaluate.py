"""Closed-loop evaluation.

``evaluate``: the full protocol — R rollouts per scene (WOSAC: 32), every episode metric (realism
likelihoods and meta-metrics, minADE, BLM's safety / diversity set, ego planning metrics), averaged over
scenes; shards scenes over processes under torchrun with results identical to one process.

``evaluate_agent``: quick single-rollout rates over the agents a policy drives (every agent valid at the
start step, for the rest of the scene):
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


def evaluate(agent_name: str, ds, *, num_rollouts: int = 32, setting: str = "sim_agents", traffic: str = "log",
             num_scenes: int | None = None, seed: int = 0, checkpoint: str | None = None, metrics=None,
             save_dir: str | None = None, progress_bar: bool = False, start_step: int = 10) -> dict | None:
    """Roll ``agent_name`` out ``num_rollouts`` times on each of the first ``num_scenes`` scenes of ``ds`` and
    compute the episode metrics. Returns ``{"agent", "setting", "scenes", "rollouts", "metrics": means over
    scenes, "per_scene": [...]}`` on rank 0 (None on other ranks). Scene i uses seed ``seed + i`` whichever
    rank runs it, so sharding does not change the result."""
    import math

    from agents.registry import make_agent
    from envs.metrics.episode import compute_episode_metrics
    from training.distributed import gather_to_rank0, init_from_env, shard
    from training.rollouts import save_rollouts, simulate_scene

    rank, world = init_from_env()
    count = len(ds) if num_scenes is None else min(num_scenes, len(ds))
    agent = make_agent(agent_name, checkpoint=checkpoint)
    other = None if traffic == "log" else make_agent(traffic)
    mine = shard(range(count), rank, world)
    if progress_bar and rank == 0:
        from tqdm import tqdm

        mine = tqdm(mine, desc=f"eval {agent_name} ({num_rollouts} rollouts)", unit="scene")
    rows = []
    for i in mine:
        start = time.perf_counter()
        rollouts = simulate_scene(agent, ds, i, num_rollouts, setting, other, start_step=start_step, seed=seed + i)
        if save_dir is not None:
            save_rollouts(rollouts, save_dir)
        middle = time.perf_counter()
        values = compute_episode_metrics(rollouts, metrics)
        rows.append({"scene_index": i, "scene_id": rollouts.scene_id, **{k: float(v) for k, v in values.items()},
                     "_rollout_s": middle - start, "_metrics_s": time.perf_counter() - middle})
    gathered = gather_to_rank0(rows, rank, world)
    if gathered is None:
        return None
    per_scene = sorted((r for part in gathered for r in part), key=lambda r: r["scene_index"])
    timing = {"rollout_s_per_scene": sum(r.pop("_rollout_s") for r in per_scene) / max(len(per_scene), 1),
              "metrics_s_per_scene": sum(r.pop("_metrics_s") for r in per_scene) / max(len(per_scene), 1)}
    keys = [k for k in per_scene[0] if k not in ("scene_index", "scene_id")] if per_scene else []
    means = {}
    for k in keys:
        finite = [r[k] for r in per_scene if k in r and math.isfinite(r[k])]
        means[k] = sum(finite) / len(finite) if finite else float("nan")
    return {"agent": agent_name, "dataset": ds.dataset, "split": ds.split, "setting": setting, "traffic": traffic,
            "scenes": count, "rollouts": num_rollouts, "metrics": means, "timing": timing, "per_scene": per_scene}


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


def format_metric_table(results: list[dict]) -> str:
    """Metrics as rows, agents as columns (means over scenes)."""
    keys = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    width = max([len(k) for k in keys] + [6]) + 2
    header = f"{'metric':<{width}}" + "".join(f"{r['agent']:>18}" for r in results)
    lines = [header, "-" * len(header)]
    for k in keys:
        lines.append(f"{k:<{width}}" + "".join(f"{r['metrics'].get(k, float('nan')):>18.4f}" for r in results))
    return "\n".join(lines)


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

